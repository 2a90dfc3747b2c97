"""Serving pieces the classification tasks share: request checks, image decoding and softmax answers.

The edge server hands a task's `Serving` the request's instances and, after onnxruntime, the model's logits.
Everything here mirrors what training and evaluation do (`logits.softmax(1)`, PIL decoding as in
`tasks.images.folder.read_image`), so an answer means what the evaluation metrics measured.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from tasks.base import BadInput

# PIL's ways of saying "not an image" (image folders read with it too); EOFError: some truncated formats sent as bytes
NOT_AN_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_NOT_AN_IMAGE = (*NOT_AN_IMAGE, EOFError)

# What a camera or a line's software sends. Not every format PIL knows: EPS would run Ghostscript, and
# the rarer plugins are parsers no one here has looked at.
SERVED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")

# Images whose short side is at least twice this are shrunk by a whole factor (a box average, on the 8-bit
# pixels) to a short side of at least this before the task's preprocessing: its antialiased resize then works
# on a float32 copy of a few megapixels, not of the whole image. Twice the largest model input
# (TaskOptions.image_size <= 512), so the result differs from resizing the full image by a fraction of a grey level.
WORKING_SIDE = 1024


class ImageTooLarge(BadInput):
    """The image's header asks for more pixels than the server takes: refused before a pixel is decoded (413)."""


@dataclass(frozen=True)
class ImageLimits:
    """Largest image a request may hold, checked from its header: decoding allocates width x height x channels."""

    max_pixels: int = 25_000_000  # a 20-megapixel line camera fits
    max_side: int = 10_000

    def check(self, size: tuple[int, int], index: int) -> None:
        width, height = size
        if width > self.max_side or height > self.max_side:
            raise ImageTooLarge(f"instance {index} is {width}x{height} pixels; this server takes at most {self.max_side} "
                                "pixels a side (--max-image-side); send a smaller image")
        if width * height > self.max_pixels:
            raise ImageTooLarge(f"instance {index} is {width}x{height} = {width * height:,} pixels; this server takes at most "
                                f"{self.max_pixels:,} (--max-image-pixels); send a smaller image")


def check_instances(instances: Sequence[Any]) -> None:
    """A request is a non-empty list of instances; one bare image or string is not a list of them."""
    if isinstance(instances, (str, bytes, bytearray, memoryview)) or not isinstance(instances, Sequence):
        raise BadInput(f"instances must be a list, got {type(instances).__name__}")
    if len(instances) == 0:
        raise BadInput("the request holds no instances; send at least one")


@contextmanager
def _opened(data: bytes, index: int, limits: ImageLimits) -> Iterator[Image.Image]:
    """The image opened lazily (PIL reads the header only) with its size checked against `limits`."""
    with warnings.catch_warnings():
        # Over PIL's own bomb threshold our limit (lower unless raised by hand) has spoken already.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=SERVED_FORMATS)
        except Image.DecompressionBombError:  # past twice PIL's own threshold (89 M pixels)
            raise ImageTooLarge(f"instance {index} asks for more pixels than this server takes (--max-image-pixels); "
                                "send a smaller image") from None
        with img:
            limits.check(img.size, index)
            yield img


def check_image_size(data: bytes, index: int, limits: ImageLimits) -> None:
    """Refuse (ImageTooLarge) an image whose header asks for more than `limits`, decoding nothing; bytes that are
    not an image pass, for the adapter to name."""
    try:
        with _opened(data, index, limits):
            pass
    except ImageTooLarge:
        raise
    except _NOT_AN_IMAGE:
        return


def decode_image(data: Any, index: int, mode: str, limits: ImageLimits | None = None) -> np.ndarray:
    """An image file's pixels in `mode` ("L": (H, W), "RGB": (H, W, 3)), uint8, fully decoded so that a
    truncated file is a BadInput here and not garbage in the model.

    The size is read from the header and checked against `limits` before anything is decoded: a 15 KB PNG
    can ask for gigabytes. Images far larger than any model input are shrunk on their 8-bit pixels (WORKING_SIDE)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadInput(f"instance {index} is not an image file's bytes (got {type(data).__name__})")
    try:
        with _opened(bytes(data), index, limits or ImageLimits()) as img:
            if img.format == "JPEG" and min(img.size) >= 2 * WORKING_SIDE:
                img.draft(mode, _working_size(img.size))  # decoded at 1/2, 1/4 or 1/8 scale, never below the working size
            img.load()
            converted = img if img.mode == mode else img.convert(mode)
            factor = min(converted.size) // WORKING_SIDE
            pixels = np.array(converted.reduce(factor) if factor >= 2 else converted)  # writable: torch warns on read-only
    except ImageTooLarge:
        raise
    except _NOT_AN_IMAGE as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise BadInput(f"instance {index} is not a readable image ({reason[:200]})") from None
    if pixels.dtype != np.uint8 or 0 in pixels.shape[:2]:
        raise BadInput(f"instance {index} is not a readable image (empty or not 8-bit after conversion to {mode})")
    return pixels


def _working_size(size: tuple[int, int]) -> tuple[int, int]:
    """The (w, h) with the image's aspect whose short side is WORKING_SIDE."""
    width, height = size
    scale = WORKING_SIDE / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


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
    limits: ImageLimits = field(default_factory=ImageLimits)  # the edge server replaces them with its own

    def batch(self, instances: Sequence[Any]) -> np.ndarray:
        check_instances(instances)
        # One image at a time: requests mix sizes, and training's preprocessing treats every image on its own.
        inputs = [self.to_inputs(decode_image(data, i, self.mode, self.limits)[None]) for i, data in enumerate(instances)]
        return torch.cat(inputs).numpy().astype(np.float32, copy=False)

    def answers(self, outputs: np.ndarray) -> list[dict[str, Any]]:
        return class_answers(outputs, self.classes)
