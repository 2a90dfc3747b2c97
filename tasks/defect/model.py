"""A small CNN for images (64x64 EL cells and bring-your-own folders); GroupNorm instead of BatchNorm so that Opacus can train it."""

from __future__ import annotations

from torch import nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
        nn.GroupNorm(num_groups=min(8, c_out), num_channels=c_out),
        nn.ReLU(),  # not in place: per-record gradient hooks (DP-SGD) need the activations
        nn.MaxPool2d(2),
    )


class DefectCNN(nn.Module):
    def __init__(self, num_classes: int = 2, width: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(_block(in_channels, width), _block(width, 2 * width), _block(2 * width, 4 * width))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.head(self.features(x))
