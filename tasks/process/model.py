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


class WindowStats(nn.Module):
    """Fixed features of a (variables, time) window, per variable: level (mean), spread (std), trend (least-squares
    rise over the window), recent level (mean of the last quarter), roughness (mean absolute step between samples)
    and range. Roughness and range catch the random-variation and sticky-valve faults that move no level. Signed
    log1p keeps faults that drive a variable hundreds of normal standard deviations away on the same scale as normal
    operation, so no single record dominates a clipped DP-SGD gradient. Nothing here is learnt: DP-SGD only trains
    the head after it."""

    STATISTICS = 6

    def __init__(self, length: int) -> None:
        super().__init__()
        t = torch.linspace(-0.5, 0.5, length)
        self.register_buffer("trend", t / (t * t).sum(), persistent=False)  # x @ trend: the fitted rise over the window
        self.recent = max(1, length // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1)
        std = (x - mean.unsqueeze(-1)).pow(2).mean(dim=-1).sqrt()
        slope = (x * self.trend).sum(dim=-1)
        recent = x[..., -self.recent :].mean(dim=-1)
        rough = (x[..., 1:] - x[..., :-1]).abs().mean(dim=-1)
        spread = x.amax(dim=-1) - x.amin(dim=-1)
        f = torch.cat([mean, std, slope, recent, rough, spread], dim=1)
        return torch.sign(f) * torch.log1p(f.abs())


class ProcessStatsNet(nn.Module):
    """A small head (linear, or one hidden ReLU layer) on `WindowStats`: a few thousand weights for DP-SGD to train."""

    def __init__(self, variables: int, length: int, num_classes: int, hidden: int = 0) -> None:
        super().__init__()
        self.features = WindowStats(length)
        dim = WindowStats.STATISTICS * variables
        layers: list[nn.Module] = [nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)] if hidden else [nn.Linear(dim, num_classes)]
        self.head = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
