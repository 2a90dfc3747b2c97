"""An image folder with one sub-folder per class, checked file by file against the manifest.

Hidden entries (names starting with a dot: .DS_Store, Thumbs-like editor files, our own .cache) are ignored
everywhere, as by the fingerprint; any other file that is not an image of the declared mode and size is a
DataError naming it, so that a stray file never silently becomes a training example or is silently dropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from maxfl.errors import DataError
from tasks.manifest import MANIFEST_FILE, Manifest
from tasks.serving import NOT_AN_IMAGE


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def scan_classes(root: Path) -> tuple[list[Path], np.ndarray]:
    """Image files and their class (the folder name), in a stable order."""
    entries = _visible(root)
    stray = [p for p in entries if not p.is_dir()]
    if stray:
        raise DataError(
            f"{stray[0]} is a stray file beside the class folders; {root} may hold only one sub-folder per class (move or delete it)"
        )
    if not entries:
        raise DataError(f"{root} has no class folders: put each class's images in a sub-folder named after the class")
    files: list[Path] = []
    labels: list[str] = []
    for folder in entries:
        items = _visible(folder)
        nested = [p for p in items if p.is_dir()]
        if nested:
            raise DataError(f"{nested[0]} is a folder inside class folder '{folder.name}'; put the images directly in the class folder")
        if not items:
            raise DataError(f"class folder {folder} holds no images; add the class's images or remove the folder")
        files += items
        labels += [folder.name] * len(items)
    return files, np.array(labels, dtype=object)


def read_image(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """The image's pixels (H, W) or (H, W, 3), uint8; decoding fully so that truncated files fail here, not in training."""
    try:
        with Image.open(path) as img:
            img.load()
            found_mode, found_size = img.mode, img.size
            pixels = np.asarray(img)
    except NOT_AN_IMAGE as exc:
        reason = " ".join(str(exc).split())
        raise DataError(f"{path} is not a readable image ({reason}); replace or delete it") from None
    if (found_mode, found_size) != (mode, tuple(size)):
        raise DataError(
            f"{path} is {found_mode} {found_size[0]}x{found_size[1]}, but {MANIFEST_FILE} says image-mode {mode} and "
            f"image-size {size[0]}x{size[1]}; convert the image or fix the manifest"
        )
    return pixels


def read_folder(data_dir: Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """All images as one uint8 array (N, H, W[, 3]) and their class names."""
    assert manifest.image_mode is not None and manifest.image_size is not None, "an images manifest has mode and size"
    files, labels = scan_classes(manifest.data_path(data_dir))
    pixels = np.stack([read_image(f, manifest.image_mode, manifest.image_size) for f in files])
    return pixels, labels
