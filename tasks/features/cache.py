"""Features computed once per (extractor, data set) and kept on the plant's disk, outside its data folder.

Keyed by the extractor's fingerprint and the data's SHA-256, so other weights, another input size or changed
images never hit a stale entry. Written atomically with a digest of the tensor; an entry that does not load
or whose digest does not match is recomputed, and that is said once in the plant's log.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from maxfl.atomic import atomic_path
from maxfl.cache import cache_root
from maxfl.progress import progress
from tasks.features.backbones import Backbone

log = logging.getLogger("maxfl")
BATCH = 32  # images through the extractor at once: bounds memory on a plant's small machine


def feature_dir() -> Path:
    return cache_root() / "features"


def cache_path(backbone: Backbone, data_fingerprint: str) -> Path:
    return feature_dir() / backbone.fingerprint() / f"{data_fingerprint}.pt"


def _digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()


def to_inputs(pixels: np.ndarray, size: int) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) uint8 -> (N, C, size, size) in [0, 1]: the one resize training and serving share."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).float() / 255.0
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


@torch.no_grad()
def extract(backbone: Backbone, pixels: np.ndarray) -> torch.Tensor:
    extractor = backbone.extractor()
    out = []
    with progress(f"computing {backbone.name} features of {len(pixels)} images (once per data set)", len(pixels)) as advance:
        for i in range(0, len(pixels), BATCH):
            out.append(extractor(to_inputs(pixels[i : i + BATCH], backbone.input_size)))
            advance(len(out[-1]))
    return torch.cat(out) if out else torch.zeros(0, backbone.dim)


def cached_features(backbone: Backbone, data_fingerprint: str, pixels: Callable[[], np.ndarray], expected: int) -> torch.Tensor:
    """(N, dim) features of the data set's images in file order; `pixels` is called only on a miss."""
    path = cache_path(backbone, data_fingerprint)
    if path.is_file():
        try:
            entry = torch.load(path, weights_only=True)
            x = entry["features"]
            if isinstance(x, torch.Tensor) and x.shape == (expected, backbone.dim) and entry["sha256"] == _digest(x):
                return x
            why = "its content does not match its digest"
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with a cache entry, it is rebuilt
            why = f"it does not load ({type(exc).__name__})"
        log.warning("feature cache %s is damaged (%s); recomputing it", path, why)
    x = extract(backbone, pixels())
    try:
        with atomic_path(path) as tmp:
            torch.save({"features": x, "sha256": _digest(x), "backbone": backbone.fingerprint()}, tmp)
    except OSError as exc:
        log.warning("cannot keep features in %s (%s); they will be recomputed next time", path, exc.strerror)
    return x
