"""ELPV shards on a plant's disk: writing the demo split and reading a plant's own shard."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from maxfl.atomic import atomic_path, atomic_write_text
from maxfl.errors import DataError
from tasks.base import PlantData
from tasks.features.backbones import Backbone
from tasks.features.cache import cached_features, to_inputs
from tasks.defect.split import holdout_split, split_plants

SHARD_FILE = "defect.npz"
IMAGE_SIZE = 64
TEST_FRACTION = 0.2
DEFECT_THRESHOLD = 0.5  # experts' defect probability >= 0.5 counts as defective


@dataclass(frozen=True)
class Elpv:
    """ELPV from its package (nothing is downloaded): the labels, and the images decoded when asked for. A demo of 80
    images per plant decodes 160 PNG files, not all 2,624 (seconds in every launch and test)."""

    files: np.ndarray  # each image's PNG file
    proba: np.ndarray  # the experts' defect probability
    types: np.ndarray  # cell type: mono or poly

    def images(self, indices: np.ndarray) -> np.ndarray:
        """The images at `indices`, uint8 (len(indices), 300, 300)."""
        def decode(path: str) -> np.ndarray:
            with Image.open(path) as image:
                return np.asarray(image)

        return np.stack([decode(str(self.files[i])) for i in indices]) if len(indices) else np.zeros((0, 300, 300), np.uint8)


def load_elpv() -> Elpv:
    """The package's label file, read as its own `elpv_dataset.utils.load_dataset` reads it."""
    import elpv_dataset

    labels = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    data = np.genfromtxt(labels, dtype=["|S19", "<f8", "|S4"], names=["path", "probability", "type"])
    files = np.array([str(labels.parent / name) for name in np.char.decode(data["path"])])
    return Elpv(files, data["probability"].astype(np.float32), np.char.decode(data["type"]).astype(str))


def demo_plant_indices(types: np.ndarray, n_plants: int, seed: int, limit: int | None) -> list[np.ndarray]:
    """Each demo plant's ELPV indices: the non-IID split (split_plants), at most `limit` drawn from each."""
    out = []
    for k, idx in enumerate(split_plants(types, n_plants, seed), start=1):
        if limit is not None and len(idx) > limit:
            idx = np.sort(np.random.default_rng(seed + k).choice(idx, size=limit, replace=False))
        out.append(idx)
    return out


def write_plant_shards(root: Path, n_plants: int, seed: int, limit: int | None = None) -> list[Path]:
    elpv = load_elpv()
    proba, types = elpv.proba, elpv.types
    dirs = []
    for k, idx in enumerate(demo_plant_indices(types, n_plants, seed, limit), start=1):
        plant_dir = root / f"plant-{k}"
        with atomic_path(plant_dir / SHARD_FILE) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, images=elpv.images(idx), defect_proba=proba[idx], cell_type=types[idx])
        summary = {
            "task": "defect",
            "source": "elpv-dataset (CC BY-NC-SA 4.0, Buerhop-Lutz et al. / Deitsch et al.)",
            "examples": int(len(idx)),
            "defect_rate": float((proba[idx] >= DEFECT_THRESHOLD).mean()),
            "cell_types": {t: int((types[idx] == t).sum()) for t in sorted(set(types[idx].tolist()))},
        }
        atomic_write_text(plant_dir / "shard.json", json.dumps(summary, indent=2))
        dirs.append(plant_dir)
    return dirs


def _read_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"no defect data at {path}: run `maxfl prepare-data` or point data-dir at the plant's shard")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not a readable defect shard (not an .npz archive); re-create it with `maxfl prepare-data`")
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, proba = npz["images"], npz["defect_proba"]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable defect shard ({exc}); re-create it with `maxfl prepare-data`") from None
    except KeyError as exc:
        raise DataError(f"{path} lacks the array {exc}; expected 'images' and 'defect_proba'") from None
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{path}: 'images' must be uint8 of shape (N, H, W), got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise DataError(f"{path} holds no images; a plant needs at least one labelled image per class")
    if len(proba) != len(images) or not np.all((proba >= 0) & (proba <= 1)):
        raise DataError(f"{path}: 'defect_proba' must hold one probability in [0, 1] per image")
    return images, proba


def preprocess(images: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Resize and standardise each image by its own statistics: no pooled statistics, robust to exposure."""
    out = []
    for start in range(0, len(images), 256):
        x = torch.from_numpy(images[start : start + 256]).float().unsqueeze(1) / 255.0
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True).clamp(min=1e-3)
        out.append((x - mean) / std)
    return torch.cat(out)


CACHE_VERSION = 1


def _cache_path(shard: Path) -> Path:
    """Keyed by the shard's size and mtime: a replaced shard is never served from a stale cache."""
    st = shard.stat()
    return shard.parent / ".cache" / f"defect-v{CACHE_VERSION}-{IMAGE_SIZE}-{st.st_size}-{st.st_mtime_ns}.pt"


def _preprocessed(shard: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Preprocessed tensors, cached beside the shard: every round's ClientApp would otherwise redo it."""
    if not shard.is_file():
        _read_shard(shard)  # raises the user-facing error
    cache = _cache_path(shard)
    if cache.is_file():
        try:
            cached = torch.load(cache, weights_only=True)
            return cached["x"], cached["y"], cached["fingerprint"]
        except Exception:  # a damaged cache is only a cache: rebuild it from the shard
            cache.unlink(missing_ok=True)
    images, proba = _read_shard(shard)
    x = preprocess(images)
    y = torch.from_numpy((proba >= DEFECT_THRESHOLD).astype(np.int64))
    fingerprint = hashlib.sha256(shard.read_bytes()).hexdigest()
    try:
        for stale in cache.parent.glob("defect-*.pt"):
            stale.unlink(missing_ok=True)
        with atomic_path(cache) as tmp:
            torch.save({"x": x, "y": y, "fingerprint": fingerprint}, tmp)
    except OSError:
        pass  # read-only data location: work without the cache
    return x, y, fingerprint


EXPORT_CHECK_RECORDS = 32  # test images the plant runs through the ONNX export of a feature pipeline


def load_plant_shard(data_dir: Path, seed: int, backbone: Backbone | None = None) -> PlantData:
    """The plant's shard as model inputs: 64x64 standardised images, or (with a backbone) their cached features."""
    shard = data_dir / SHARD_FILE
    x, y, fingerprint = _preprocessed(shard)
    train_idx, test_idx = holdout_split(y.numpy(), TEST_FRACTION, seed)
    if backbone is None:
        return PlantData(x[train_idx], y[train_idx], x[test_idx], y[test_idx], fingerprint=fingerprint)
    feats = cached_features(backbone, fingerprint, lambda: _read_shard(shard)[0], expected=len(y))

    def export_inputs() -> torch.Tensor:
        return to_inputs(_read_shard(shard)[0][test_idx[:EXPORT_CHECK_RECORDS]], backbone.input_size)

    return PlantData(feats[train_idx], y[train_idx], feats[test_idx], y[test_idx], fingerprint=fingerprint, export_inputs=export_inputs)
