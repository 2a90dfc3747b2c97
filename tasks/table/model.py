"""Table models. No BatchNorm: per-sample gradients (DP-SGD with Opacus) need layers without batch statistics."""

from __future__ import annotations

from torch import nn

HIDDEN = 64


def build_table_model(name: str, n_features: int, n_outputs: int, hidden: int = HIDDEN) -> nn.Module:
    """"mlp": two hidden ReLU layers, for the nonlinear process windows of real lines; "linear": a baseline."""
    if name == "linear":
        return nn.Sequential(nn.Linear(n_features, n_outputs))
    if name == "mlp":
        return nn.Sequential(
            nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_outputs)
        )
    raise ValueError(f"unknown table model {name!r}")

