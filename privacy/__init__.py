"""Plant-side differential privacy (DP-SGD with a lifetime ledger); see issue "Differential privacy the plant controls"."""
