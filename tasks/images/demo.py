"""The images demo: ELPV solar-cell images as a class-per-folder PNG tree per plant.

Classes follow the experts' defect probability: good (0), minor (1/3), defective (2/3 or 1). Plants get the
defect task's non-IID split (whole modules, a preferred cell type), so the folders differ as real plants' would.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from maxfl.atomic import atomic_write_text
from tasks.defect.data import demo_plant_indices, load_elpv
from tasks.manifest import MANIFEST_FILE, Manifest, dump_manifest

DEMO_SIZE = 96
IMAGE_FOLDER = "images"


def elpv_class(proba: float) -> str:
    return "good" if proba < 1 / 6 else "minor" if proba < 1 / 2 else "defective"


def _write_folder(target: Path, images: np.ndarray, proba: np.ndarray, indices: np.ndarray) -> None:
    """Build the folder under a hidden temporary name, then swap it in: readers never see half a folder. `images` and
    `proba` are the plant's, in the order of their ELPV `indices` (which name the files)."""
    build = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for image, p, i in zip(images, proba, indices, strict=True):
            folder = build / elpv_class(float(p))
            folder.mkdir(exist_ok=True)
            img = Image.fromarray(image).resize((DEMO_SIZE, DEMO_SIZE), Image.Resampling.LANCZOS)
            img.save(folder / f"elpv-{int(i):04d}.png")
        old = target.with_name(f".{target.name}.old") if target.exists() else None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        build.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def write_image_plants(root: Path, n_plants: int, seed: int, limit: int | None = None) -> list[Path]:
    elpv = load_elpv()
    manifest = Manifest(kind="images", path=IMAGE_FOLDER, image_mode="L", image_size=(DEMO_SIZE, DEMO_SIZE))
    dirs = []
    for k, idx in enumerate(demo_plant_indices(elpv.types, n_plants, seed, limit), start=1):
        plant_dir = root / f"plant-{k}"
        plant_dir.mkdir(parents=True, exist_ok=True)
        _write_folder(plant_dir / IMAGE_FOLDER, elpv.images(idx), elpv.proba[idx], idx)
        atomic_write_text(plant_dir / MANIFEST_FILE, dump_manifest(manifest))
        dirs.append(plant_dir)
    return dirs
