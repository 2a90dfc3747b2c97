"""Plant-side differential privacy: DP-SGD (Opacus) under a lifetime ledger the plant owns.

`plan` holds the anchor's privacy request (lightweight, shared with the server); `accountant` turns
mechanism histories into epsilon; `ledger` is the plant's on-disk record; `budget` decides whether a
round fits under the plant's ceiling and writes the ledger before training; `dpsgd` is the training hook.
"""
