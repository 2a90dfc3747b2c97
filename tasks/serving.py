"""Serving pieces the classification tasks share: request checks, image decoding and softmax answers.

The edge server hands a task's `Serving` the request's instances and, after onnxruntime, the model's logits.
Everything here mirrors what training and evaluation do (`logits.softmax(1)`, PIL decoding as in
`tasks.images.folder.read_image`), so an answer means what the evaluation metrics measured.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from tasks.base import BadInput

# PIL's ways of saying "not an image" (image folders read with it too); EOFError: some truncated formats sent as bytes
NOT_AN_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_NOT_AN_IMAGE = (*NOT_AN_IMAGE, EOFError)


def check_instances(instances: Sequence[Any]) -> None:
    """A request is a non-empty list of instances; one bare image or string is not a list of them."""
    if isinstance(instances, (str, bytes, bytearray, memoryview)) or not isinstance(instances, Sequence):
        raise BadInput(f"instances must be a list, got {type(instances).__name__}")
    if len(instances) == 0:
        raise BadInput("the request holds no instances; send at least one")


def decode_image(data: Any, index: int, mode: str) -> np.ndarray:
    """An image file's pixels in `mode` ("L": (H, W), "RGB": (H, W, 3)), uint8, fully decoded so that a
    truncated file is a BadInput here and not garbage in the model."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadInput(f"instance {index} is not an image file's bytes (got {type(data).__name__})")
    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            img.load()
            pixels = np.array(img if img.mode == mode else img.convert(mode))  # writable: torch warns on read-only
    except _NOT_AN_IMAGE as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise BadInput(f"instance {index} is not a readable image ({reason})") from None
    if pixels.dtype != np.uint8 or 0 in pixels.shape[:2]:
        raise BadInput(f"instance {index} is not a readable image (empty or not 8-bit after conversion to {mode})")
    return pixels


def check_outputs(outputs: np.ndarray, width: int) -> np.ndarray:
    """The model's outputs as (batch, width); another shape means the wrong model, a server error, not the client's."""
    out = np.asarray(outputs)
    if out.ndim != 2 or out.shape[1] != width:
        raise ValueError(f"model outputs must have shape (batch, {width}), got {out.shape}: is this the spec's model?")
    return out


def class_probabilities(outputs: np.ndarray, num_classes: int) -> np.ndarray:
    """Softmax over the logits, the same torch op evaluation uses, so probabilities match the reported metrics."""
    logits = torch.from_numpy(np.ascontiguousarray(check_outputs(outputs, num_classes), dtype=np.float32))
    return logits.softmax(1).numpy()


def class_answers(outputs: np.ndarray, labels: Sequence[str]) -> list[dict[str, Any]]:
    """Per instance: the most likely label and every label's probability."""
    proba = class_probabilities(outputs, len(labels))
    return [
        {"label": labels[int(p.argmax())], "probabilities": {label: float(q) for label, q in zip(labels, p, strict=True)}}
        for p in proba
    ]


@dataclass(frozen=True)
class ImageServing:
    """Image files in, class answers out; `to_inputs` is the task's own training preprocessing."""

    mode: str  # PIL mode the task trains on: "L" or "RGB"
    classes: tuple[str, ...]
    to_inputs: Callable[[np.ndarray], torch.Tensor]  # (1, H, W[, C]) uint8 -> (1, C, S, S) float32
    kind: str = "image"

    def batch(self, instances: Sequence[Any]) -> np.ndarray:
        check_instances(instances)
        # One image at a time: requests mix sizes, and training's preprocessing treats every image on its own.
        inputs = [self.to_inputs(decode_image(data, i, self.mode)[None]) for i, data in enumerate(instances)]
        return torch.cat(inputs).numpy().astype(np.float32, copy=False)

    def answers(self, outputs: np.ndarray) -> list[dict[str, Any]]:
        return class_answers(outputs, self.classes)
