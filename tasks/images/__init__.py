"""images: classify a plant's images, given as one sub-folder per class (the class is the folder's name).

The plant's manifest.toml fixes the mode and size every image must have; plants report their class counts,
the anchor takes the union of classes, and every image is resized to the run's image size and standardised
on its own (per image and channel, like the defect task), so no pixel statistics need to be pooled.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from maxfl.errors import DataError
from tasks.base import (
    HEAD_TRAINING, DataProfile, PlantData, Serving, TaskOptions, TaskSpec, TrainingDefaults, TrainSettings, check_schemas, resolve_model,
)
from tasks.classification import evaluate_classifier, train_classifier
from tasks.defect import flip_augment
from tasks.defect.data import preprocess
from tasks.defect.split import holdout_split
from tasks.images.cache import cached
from tasks.images.demo import write_image_plants
from tasks.images.folder import read_folder, scan_classes
from tasks.defect.data import EXPORT_CHECK_RECORDS
from tasks.defect.model import DefectCNN
from tasks.features import deployable, get_backbone, image_model
from tasks.features.cache import cached_features, to_inputs
from tasks.manifest import MANIFEST_FILE, Manifest, fingerprint, load_manifest

__all__ = ["TASK", "ImagesProfile", "ImagesSpec", "ImagesTask", "standardise"]

CHANNELS = {"L": 1, "RGB": 3}


class ImagesProfile(DataProfile):
    image_mode: Literal["L", "RGB"]
    class_counts: dict[str, int] = Field(default_factory=dict)  # training split only


class ImagesSpec(TaskSpec):
    classes: tuple[str, ...]
    channels: int = Field(ge=1)
    image_size: int = Field(ge=8)


def standardise(pixels: np.ndarray, size: int) -> torch.Tensor:
    """(N, H, W[, C]) uint8 -> (N, C, size, size) float32 via the defect task's preprocessing, channel by channel."""
    if pixels.ndim == 3:
        return preprocess(pixels, size)
    n, h, w, c = pixels.shape
    planes = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)).reshape(n * c, h, w)
    return preprocess(planes, size).reshape(n, c, size, size)


def input_size(spec: ImagesSpec) -> int:
    """The deployable model's input side: the run's image size for the CNN, the backbone's own otherwise."""
    backbone = get_backbone(spec.model)
    return spec.image_size if backbone is None else backbone.input_size


def _train_mask(labels: np.ndarray, manifest: Manifest, seed: int) -> np.ndarray:
    """Stratified by class and fixed by seed: profile and training see the same split."""
    train_idx, _ = holdout_split(labels.astype(str), manifest.test_fraction, seed)
    mask = np.zeros(len(labels), dtype=bool)
    mask[train_idx] = True
    return mask


class ImagesTask:
    name = "images"
    models = ("effnet-lite0", "effnet-lite0-mlp", "scatnet", "cnn")  # as the defect task: frozen features first
    profile_type = ImagesProfile
    spec_type = ImagesSpec

    def profile(self, data_dir: Path, seed: int) -> ImagesProfile:
        manifest = load_manifest(data_dir, kind="images")
        assert manifest.image_mode is not None and manifest.image_size is not None
        _, labels = read_folder(data_dir, manifest)  # decodes every image: the profile vouches for the data
        train = _train_mask(labels, manifest, seed)
        width, height = manifest.image_size
        return ImagesProfile(
            task=self.name,
            fingerprint=fingerprint(manifest, data_dir),
            examples=int(train.sum()),
            schema={"image-mode": manifest.image_mode, "image-size": f"{width}x{height}"},
            image_mode=manifest.image_mode,
            class_counts=dict(sorted(Counter(labels[train].tolist()).items())),
        )

    def make_spec(self, profiles: Mapping[str, DataProfile], options: TaskOptions) -> ImagesSpec:
        check_schemas(profiles, self.name)
        if not profiles:
            raise DataError("no plant reported a profile; the federation needs at least one plant with data")
        typed = [p for p in profiles.values() if isinstance(p, ImagesProfile)]
        assert len(typed) == len(profiles), "profiles arrive as the task's profile_type"
        classes = tuple(sorted({c for p in typed for c, n in p.class_counts.items() if n > 0}))
        if len(classes) < 2:
            raise DataError(
                f"the plants' images form {len(classes)} class folder(s) ({', '.join(classes)}); a classifier needs at least two"
            )
        return ImagesSpec(
            task=self.name,
            model=resolve_model(self, options),
            num_classes=len(classes),
            classes=classes,
            channels=CHANNELS[typed[0].image_mode],
            image_size=options.image_size,
        )

    def build_model(self, spec: TaskSpec) -> nn.Module:
        assert isinstance(spec, ImagesSpec)
        return image_model(spec.model, spec.num_classes, lambda: DefectCNN(num_classes=spec.num_classes, in_channels=spec.channels))

    def deployable(self, spec: TaskSpec, model: nn.Module) -> nn.Module:
        return deployable(spec.model, model)

    def training_defaults(self, spec: TaskSpec) -> TrainingDefaults:
        return HEAD_TRAINING if get_backbone(spec.model) else TrainingDefaults()

    def input_example(self, spec: TaskSpec) -> np.ndarray:
        assert isinstance(spec, ImagesSpec)
        size = input_size(spec)
        return np.zeros((2, spec.channels, size, size), dtype=np.float32)

    def load_plant_data(self, data_dir: Path, seed: int, spec: TaskSpec) -> PlantData:
        assert isinstance(spec, ImagesSpec)
        manifest = load_manifest(data_dir, kind="images")
        assert manifest.image_mode is not None
        if CHANNELS[manifest.image_mode] != spec.channels:
            raise DataError(
                f"{data_dir}/{MANIFEST_FILE} says image-mode {manifest.image_mode}, the federation's spec has {spec.channels} "
                f"channel(s); restore the manifest or profile the plants again"
            )
        fp = fingerprint(manifest, data_dir)
        backbone = get_backbone(spec.model)
        if backbone is None:
            def build() -> dict[str, object]:
                pixels, labels = read_folder(data_dir, manifest)
                return {"x": standardise(pixels, spec.image_size), "labels": labels.tolist()}

            tensors = cached(data_dir, fp, spec.image_size, build)
            x, labels = tensors["x"], np.array(tensors["labels"], dtype=object)
            export_inputs = None
        else:
            # The labels come from the folder names: images are decoded only to compute features the cache lacks.
            _, labels = scan_classes(manifest.data_path(data_dir))
            x = cached_features(backbone, fp, lambda: read_folder(data_dir, manifest)[0], expected=len(labels))

            def export_inputs() -> torch.Tensor:
                test = np.flatnonzero(~_train_mask(labels, manifest, seed))[:EXPORT_CHECK_RECORDS]
                return to_inputs(read_folder(data_dir, manifest)[0][test], backbone.input_size)
        assert isinstance(x, torch.Tensor)
        index = {c: i for i, c in enumerate(spec.classes)}
        unknown = sorted(set(labels.tolist()) - index.keys())
        if unknown:
            folder = manifest.data_path(data_dir) / unknown[0]
            raise DataError(
                f"class folder {folder} is not one of the federation's classes ({', '.join(spec.classes)}); "
                f"rename or remove it, or profile the plants again so that the spec includes it"
            )
        y = torch.tensor([index[c] for c in labels], dtype=torch.int64)
        train = torch.from_numpy(_train_mask(labels, manifest, seed))
        return PlantData(x[train], y[train], x[~train], y[~train], fingerprint=fp, export_inputs=export_inputs)

    def prepare_plants(self, n_plants: int, root: Path, seed: int, limit: int | None = None) -> list[Path]:
        return write_image_plants(root, n_plants, seed, limit)

    def train(self, model: nn.Module, data: PlantData, settings: TrainSettings, spec: TaskSpec) -> dict[str, float]:
        augment = flip_augment if get_backbone(spec.model) is None else None  # features are computed once, unflipped
        return train_classifier(model, data, settings, spec.num_classes, augment=augment)

    def evaluate(self, model: nn.Module, data: PlantData, spec: TaskSpec) -> dict[str, float]:
        return evaluate_classifier(model, data, spec.num_classes)

    def serving(self, spec: TaskSpec, data_dir: Path) -> Serving:
        """Images of any format and size, converted to the federation's mode; standardisation is per image,
        so the plant's folder is not needed."""
        assert isinstance(spec, ImagesSpec)
        from tasks.images.serving import images_serving  # it imports this module's spec and standardise

        return images_serving(spec)


TASK = ImagesTask()
