"""Models over windows of process variables; GroupNorm, not BatchNorm, so DP-SGD can train them."""

from __future__ import annotations

import torch
from torch import nn


class ProcessCNN(nn.Module):
    """Temporal convolutions over a (variables, time) window, pooled over time."""

    def __init__(self, variables: int, num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(variables, width, kernel_size=5, padding=2),
            nn.GroupNorm(8, width),
            nn.ReLU(),
            nn.Conv1d(width, width, kernel_size=5, padding=2),
            nn.GroupNorm(8, width),
            nn.ReLU(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        # mean and last step: the window's level and where it is heading now
        return self.head(torch.cat([h.mean(dim=-1), h[..., -1]], dim=1))


class ProcessMLP(nn.Module):
    def __init__(self, variables: int, length: int, num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(variables * length, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
