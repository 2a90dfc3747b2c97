"""The trainable part (a head on frozen features) and the served whole (extractor + head)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from tasks.features.backbones import Backbone, get_backbone


class FeatureHead(nn.Module):
    """Linear (hidden 0) or one hidden ReLU layer over a feature vector. This is all DP-SGD trains and all that
    travels each round; a few thousand weights take far less noise per useful signal than a whole CNN."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 0) -> None:
        super().__init__()
        if hidden:
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        else:
            self.net = nn.Sequential(nn.Linear(dim, num_classes))

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.net(x)


class Pipeline(nn.Module):
    """What the edge serves: preprocessed image -> frozen features -> head. The head is shared (not copied), so
    loading weights into the head updates the pipeline."""

    def __init__(self, extractor: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor
        self.head = head

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.head(self.extractor(x))


def head_hidden(model: str, backbone: Backbone) -> int:
    """`<backbone>-mlp` puts one hidden layer of 64 in the head; `<backbone>` alone is linear."""
    return 64 if model == f"{backbone.name}-mlp" else 0


def image_model(model: str, num_classes: int, end_to_end: Callable[[], nn.Module]) -> nn.Module:
    """What plants train for an image task's model name: a head on a backbone's features, or (`cnn`) the whole net."""
    backbone = get_backbone(model)
    if backbone is None:
        return end_to_end()
    return FeatureHead(backbone.dim, num_classes, head_hidden(model, backbone))


def deployable(model: str, trained: nn.Module) -> nn.Module:
    """The model the edge serves, taking the task's preprocessed image: the trained head behind its extractor."""
    backbone = get_backbone(model)
    return trained if backbone is None else Pipeline(backbone.extractor(), trained)
