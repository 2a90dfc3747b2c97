"""Plant side: the ClientApp and what runs next to a plant's SuperNode. Needs no MLflow."""
