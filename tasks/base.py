"""What a task provides: data loading for one plant, the model, local training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class TrainSettings:
    """Local-training knobs sent by the anchor each round."""

    epochs: int
    batch_size: int
    learning_rate: float
    seed: int


@dataclass(frozen=True)
class PlantData:
    """One plant's tensors, already preprocessed; the test split is fixed by seed and never trained on."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    fingerprint: str  # SHA-256 of the raw shard, so runs and ledgers can name the data they used


class Task(Protocol):
    name: str
    num_classes: int

    def build_model(self) -> nn.Module: ...

    def input_example(self) -> np.ndarray:
        """A real-shaped batch of two, for model signatures and exports.

        Two, not one: torch.export fixes a dimension of size 1, so a batch of one would export a model
        that only ever accepts one input.
        """
        ...

    def load_plant_data(self, data_dir: Path, seed: int) -> PlantData: ...

    def prepare_plants(self, n_plants: int, root: Path, seed: int, limit: int | None = None) -> list[Path]:
        """Materialise a demo split of the task's public data set, one folder per plant."""
        ...

    def train(self, model: nn.Module, data: PlantData, settings: TrainSettings) -> dict[str, float]: ...

    def evaluate(self, model: nn.Module, data: PlantData) -> dict[str, float]: ...
