"""Preprocessed tensors cached beside the plant's data: every round's ClientApp would otherwise decode again.

Keyed by the data's fingerprint and the input size, so changed images or another size never hit a stale
entry; a read-only data location simply goes without the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from maxfl.atomic import atomic_path

CACHE_VERSION = 1
Tensors = dict[str, object]


def cached(data_dir: Path, fingerprint: str, size: int, build: Callable[[], Tensors]) -> Tensors:
    folder = data_dir / ".cache"
    prefix = f"images-v{CACHE_VERSION}-{size}-"
    path = folder / f"{prefix}{fingerprint}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a damaged cache is only a cache: rebuild it
            pass
    tensors = build()
    try:
        for stale in folder.glob(f"{prefix}*.pt"):
            stale.unlink(missing_ok=True)
        with atomic_path(path) as tmp:
            torch.save(tensors, tmp)
    except OSError:
        pass  # read-only data location: work without the cache
    return tensors
