"""Plant side of a release: the edge model store (approved models, the one in use, the ones before it) and
the HTTP inference server that serves the store's current model with onnxruntime and swaps it without
dropping a request."""
