"""The defect task's edge adapter: any grey or colour cell image, preprocessed exactly as the training shards."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from tasks.defect.data import IMAGE_SIZE, preprocess
from tasks.features.backbones import Backbone
from tasks.features.cache import to_inputs
from tasks.serving import ImageServing


def _inputs(pixels: np.ndarray) -> torch.Tensor:
    return preprocess(pixels, IMAGE_SIZE)


def defect_serving(classes: tuple[str, ...], backbone: Backbone | None = None) -> ImageServing:
    """ELPV shards are 8-bit grey: requests are converted to grey ("L") and go through the same preprocessing as
    the shards (`preprocess` for the CNN, the backbone's resize for a feature pipeline)."""
    resize = _inputs if backbone is None else partial(to_inputs, size=backbone.input_size)
    return ImageServing(mode="L", classes=classes, to_inputs=resize)
