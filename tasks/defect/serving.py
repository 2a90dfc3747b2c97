"""The defect task's edge adapter: any grey or colour cell image, preprocessed exactly as the training shards."""

from __future__ import annotations

import numpy as np
import torch

from tasks.defect.data import IMAGE_SIZE, preprocess
from tasks.serving import ImageServing


def _inputs(pixels: np.ndarray) -> torch.Tensor:
    return preprocess(pixels, IMAGE_SIZE)


def defect_serving(classes: tuple[str, ...]) -> ImageServing:
    """ELPV shards are 8-bit grey: requests are converted to grey ("L") and go through `preprocess` like them."""
    return ImageServing(mode="L", classes=classes, to_inputs=_inputs)
