"""defect: is a solar cell defective, from its electroluminescence image (ELPV)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.base import PlantData, TrainSettings
from tasks.classification import evaluate_classifier, train_classifier
from tasks.defect.data import IMAGE_SIZE, load_plant_shard, write_plant_shards
from tasks.defect.model import DefectCNN


def _flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Cells are symmetric under flips; a cheap augmentation that keeps defects defects."""
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(-1)
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(-2)
    return x


class DefectTask:
    name = "defect"
    num_classes = 2

    def build_model(self) -> nn.Module:
        return DefectCNN(num_classes=self.num_classes)

    def input_example(self) -> np.ndarray:
        return np.zeros((2, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)

    def load_plant_data(self, data_dir: Path, seed: int) -> PlantData:
        return load_plant_shard(data_dir, seed)

    def prepare_plants(self, n_plants: int, root: Path, seed: int, limit: int | None = None) -> list[Path]:
        return write_plant_shards(root, n_plants, seed, limit)

    def train(self, model: nn.Module, data: PlantData, settings: TrainSettings) -> dict[str, float]:
        return train_classifier(model, data, settings, self.num_classes, augment=_flip)

    def evaluate(self, model: nn.Module, data: PlantData) -> dict[str, float]:
        return evaluate_classifier(model, data, self.num_classes)


TASK = DefectTask()
