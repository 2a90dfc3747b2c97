"""defect: is a solar cell defective, from its electroluminescence image (ELPV)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from torch import nn

from tasks.base import (
    HEAD_TRAINING, DataProfile, PlantData, Serving, TaskOptions, TaskSpec, TrainingDefaults, TrainSettings, check_schemas, resolve_model,
)
from tasks.classification import evaluate_classifier, train_classifier
from tasks.defect.data import IMAGE_SIZE, load_plant_shard, write_plant_shards
from tasks.defect.model import DefectCNN
from tasks.defect.serving import defect_serving
from tasks.features import deployable, get_backbone, image_model

CLASSES = ("good", "defective")


def flip_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Cells are symmetric under flips; a cheap augmentation that keeps defects defects."""
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(-1)
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(-2)
    return x


class DefectProfile(DataProfile):
    class_counts: dict[str, int] = Field(default_factory=dict)


class DefectSpec(TaskSpec):
    classes: tuple[str, ...] = CLASSES


class DefectTask:
    name = "defect"
    # Frozen ImageNet features + a DP-trained linear head (default), the same with a small hidden layer, wavelet
    # scattering features + linear head, and the end-to-end CNN (the baseline arm).
    models = ("effnet-lite0", "effnet-lite0-mlp", "scatnet", "cnn")
    profile_type = DefectProfile
    spec_type = DefectSpec

    def profile(self, data_dir: Path, seed: int) -> DefectProfile:
        data = load_plant_shard(data_dir, seed)
        counts = torch.bincount(data.y_train, minlength=len(CLASSES)).tolist()
        return DefectProfile(
            task=self.name,
            fingerprint=data.fingerprint,
            examples=len(data.y_train),
            schema={"image": f"grey {IMAGE_SIZE}x{IMAGE_SIZE} (resized)", "label": "defect probability >= 0.5"},
            class_counts=dict(zip(CLASSES, counts, strict=True)),
        )

    def make_spec(self, profiles: Mapping[str, DataProfile], options: TaskOptions) -> DefectSpec:
        check_schemas(profiles, self.name)
        return DefectSpec(task=self.name, model=resolve_model(self, options), num_classes=len(CLASSES))

    def build_model(self, spec: TaskSpec) -> nn.Module:
        return image_model(spec.model, spec.num_classes, lambda: DefectCNN(num_classes=spec.num_classes))

    def deployable(self, spec: TaskSpec, model: nn.Module) -> nn.Module:
        return deployable(spec.model, model)

    def training_defaults(self, spec: TaskSpec) -> TrainingDefaults:
        return HEAD_TRAINING if get_backbone(spec.model) else TrainingDefaults()

    def input_example(self, spec: TaskSpec) -> np.ndarray:
        backbone = get_backbone(spec.model)
        size = IMAGE_SIZE if backbone is None else backbone.input_size
        return np.zeros((2, 1, size, size), dtype=np.float32)

    def load_plant_data(self, data_dir: Path, seed: int, spec: TaskSpec) -> PlantData:
        return load_plant_shard(data_dir, seed, get_backbone(spec.model))

    def prepare_plants(self, n_plants: int, root: Path, seed: int, limit: int | None = None) -> list[Path]:
        return write_plant_shards(root, n_plants, seed, limit)

    def train(self, model: nn.Module, data: PlantData, settings: TrainSettings, spec: TaskSpec) -> dict[str, float]:
        augment = flip_augment if get_backbone(spec.model) is None else None  # features are computed once, unflipped
        return train_classifier(model, data, settings, spec.num_classes, augment=augment)

    def evaluate(self, model: nn.Module, data: PlantData, spec: TaskSpec) -> dict[str, float]:
        return evaluate_classifier(model, data, spec.num_classes)

    def serving(self, spec: TaskSpec, data_dir: Path) -> Serving:
        """Cell images of any format, size and colour; the plant's shard is not needed, preprocessing is per image."""
        assert isinstance(spec, DefectSpec)
        return defect_serving(spec.classes, get_backbone(spec.model))


TASK = DefectTask()
