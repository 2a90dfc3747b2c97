"""What a task provides, and the two-step agreement that precedes training.

Before the first round every plant describes its data (`DataProfile`: schema and sufficient statistics,
never rows); the anchor checks that the plants agree and merges the statistics into one `TaskSpec`
(classes, vocabularies, scaling) that travels with every round. A task is thus one module: fl_server and
fl_client only move profiles, specs and weights.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from maxfl.errors import ConfigError, DataError


class LocalTraining(Protocol):
    """How a plant turns its training records into optimizer steps: plain shuffled mini-batches
    (`MiniBatches`), or DP-SGD (`privacy.dpsgd.DPSGD`). Task code trains through it and never knows which."""

    def session(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, data: PlantData, settings: TrainSettings, gen: torch.Generator
    ) -> AbstractContextManager[tuple[nn.Module, torch.optim.Optimizer, Iterable[torch.Tensor]]]:
        """Yields the model and optimizer to step, and the index batches (into `data.x_train`) of all epochs."""
        ...

    def reduce(self, losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """A batch's loss from its per-record losses (already multiplied by `weights`)."""
        ...


class MiniBatches:
    """Shuffled mini-batches over all training records, each epoch; the loss is the weighted mean."""

    @contextmanager
    def session(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, data: PlantData, settings: TrainSettings, gen: torch.Generator
    ) -> Iterator[tuple[nn.Module, torch.optim.Optimizer, Iterable[torch.Tensor]]]:
        n = len(data.y_train)

        def batches() -> Iterator[torch.Tensor]:
            for _ in range(settings.epochs):
                order = torch.randperm(n, generator=gen)
                yield from order.split(settings.batch_size)

        yield model, optimizer, batches()

    def reduce(self, losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return losses.sum() / weights.sum()


@dataclass(frozen=True)
class TrainSettings:
    """Local-training knobs sent by the anchor each round."""

    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    local_training: LocalTraining = field(default_factory=MiniBatches)

    @classmethod
    def for_round(
        cls, epochs: int, batch_size: int, learning_rate: float, schedule: str, run_seed: int, plant: str, server_round: int, num_rounds: int
    ) -> TrainSettings:
        """One plant's settings for one round: the scheduled learning rate, and a seed of its own so that
        plants and rounds draw different batches and augmentations, reproducibly."""
        return cls(
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=scheduled_learning_rate(learning_rate, schedule, server_round, num_rounds),
            seed=zlib.crc32(f"{run_seed}/{plant}/{server_round}".encode()),
        )


@dataclass(frozen=True)
class PlantData:
    """One plant's tensors, already preprocessed; the test split is fixed by seed and never trained on."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    fingerprint: str  # SHA-256 of the plant's raw data, so runs and ledgers can name the data they used
    # Indices of training records that share no raw sample. DP's unit is one raw sample, so DP-SGD trains on
    # these only; None: every record is its own raw sample (an image, a table row).
    disjoint_train: torch.Tensor | None = None
    # The exported model's inputs for the first test records, when they are not `x_test` itself (a head trained on
    # cached features is exported behind its extractor, which takes images): the ONNX check compares the export on
    # these with the trained model on `x_test[:k]`, so it also catches features that drifted from their extractor.
    export_inputs: Callable[[], torch.Tensor] | None = None

    def private_records(self) -> torch.Tensor:
        """The training records DP-SGD may sample from."""
        return self.disjoint_train if self.disjoint_train is not None else torch.arange(len(self.y_train))


def scheduled_learning_rate(base: float, schedule: str, server_round: int, num_rounds: int) -> float:
    """The round's learning rate. Cosine decay over the run's rounds: late rounds refine instead of jumping
    around, so the final federated model is not a lucky or unlucky snapshot."""
    if schedule == "cosine" and num_rounds > 1:
        return base * 0.5 * (1.0 + math.cos(math.pi * (server_round - 1) / num_rounds))
    return base


@dataclass(frozen=True)
class TrainingDefaults:
    """Local epochs and learning rate a model trains well with; the run config's 0 means "the model's own".
    A head on frozen unit-norm features wants many cheap epochs at a high rate, an end-to-end CNN few at a low one."""

    local_epochs: int = 1
    learning_rate: float = 0.05
    validation_folds: int = 1  # folds a plant validates its personalisation choice on (fl_client.personalise)


HEAD_TRAINING = TrainingDefaults(local_epochs=5, learning_rate=0.5, validation_folds=5)


class TaskOptions(BaseModel):
    """The anchor's choices for a task, from the run config."""

    model_config = ConfigDict(frozen=True)

    model: str = ""  # empty: the task's default model
    image_size: int = Field(64, ge=8, le=512)


class DataProfile(BaseModel):
    """What one plant reports before training.

    `schema_` must be identical across plants (column -> type, target, ...); tasks add the sufficient
    statistics they need to build a spec without pooling data.
    """

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    task: str
    fingerprint: str
    examples: int = Field(ge=0)
    schema_: dict[str, str] = Field(default_factory=dict, alias="schema")

    def label_counts_or_none(self) -> dict[str, int] | None:
        """Training examples per label, for tasks with labels (the classification profiles' `class_counts`);
        None where there are none (regression). The anchor compares these vocabularies across plants."""
        counts = getattr(self, "class_counts", None)
        return {str(k): int(v) for k, v in counts.items()} if counts is not None else None


class TaskSpec(BaseModel):
    """What every plant needs to build the shared model and encode its data identically."""

    model_config = ConfigDict(frozen=True)

    task: str
    model: str
    num_classes: int = Field(ge=1)  # 1 for regression


class SchemaMismatch(DataError):
    """Plants disagree on the data schema; `problems` names each deviating plant and how it deviates."""

    def __init__(self, problems: Mapping[str, list[str]]) -> None:
        self.problems = dict(problems)
        listed = "; ".join(f"{plant}: {', '.join(found)}" for plant, found in sorted(self.problems.items()))
        super().__init__(f"plants disagree on the data schema, fix their manifests before training: {listed}")


def schema_fingerprint(profiles: Mapping[str, DataProfile]) -> str:
    """SHA-256 of what the plants agreed the data is: the task, its schema and the label vocabulary. Two runs with
    the same fingerprint train models that answer the same question on the same kind of rows or images, so one's
    champion is the other's reference; another fingerprint is other data (fl_server.release.chain)."""
    import hashlib
    import json

    first = profiles[min(profiles)]
    labels = sorted({label for prof in profiles.values() for label, n in (prof.label_counts_or_none() or {}).items() if n > 0})
    blob = json.dumps({"task": first.task, "schema": first.schema_, "labels": labels}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class LabelMismatch(DataError):
    """A plant has labels no other plant has (another spelling, another coding): named with both vocabularies."""

    def __init__(self, problems: Mapping[str, str]) -> None:
        self.problems = dict(problems)
        listed = "; ".join(f"{plant}: {found}" for plant, found in sorted(self.problems.items()))
        super().__init__(f"plants disagree on the labels, use the same label names at every plant before training: {listed}")


def _labels(labels: set[str] | list[str]) -> str:
    shown = sorted(labels)
    return ", ".join(repr(x) for x in shown[:8]) + (f" (+{len(shown) - 8} more)" if len(shown) > 8 else "") if shown else "none"


def check_labels(profiles: Mapping[str, DataProfile]) -> list[str]:
    """Compare the plants' label vocabularies before any training; returns warnings for the run's log.

    A plant whose labels are another vocabulary -- labels no other plant has, while it lacks labels the others
    share (`yes`/`no` at one plant, `0`/`1` at the others) -- raises LabelMismatch naming it with both
    vocabularies: training would make each spelling its own class. A plant that only lacks classes (it learns them
    from the federation) or only adds one (a defect type only it has seen) is a warning: that class is then scored
    at fewer plants, or at none but its own.
    """
    vocab = {p: {label for label, n in counts.items() if n > 0} for p, prof in profiles.items()
             if (counts := prof.label_counts_or_none()) is not None}
    if len(vocab) < 2:
        return []
    problems: dict[str, str] = {}
    warnings: list[str] = []
    everyone = set().union(*vocab.values())
    for plant, labels in sorted(vocab.items()):
        others = set().union(*(v for p, v in vocab.items() if p != plant))
        shared = set.intersection(*(v for p, v in vocab.items() if p != plant))
        own, lacking = labels - others, shared - labels
        if own and lacking:
            problems[plant] = f"labels {_labels(own)} are at no other plant (its labels: {_labels(labels)}; the others': {_labels(others)})"
            continue
        if own:
            warnings.append(f"only {plant} has examples of {_labels(own)}: no other plant can score the model on them")
        if missing := everyone - labels:
            warnings.append(f"{plant} has no training examples of {_labels(missing)} (other plants do): it learns those classes "
                            "only from the federation, and its test scores for them stay empty")
    if problems:
        raise LabelMismatch(problems)
    return warnings


def schema_mismatches(profiles: Mapping[str, DataProfile]) -> dict[str, list[str]]:
    """Per plant, each schema field where it differs from the majority of plants (ties: the first plant by id)."""
    plants = sorted(profiles)
    fields = sorted({f for p in plants for f in profiles[p].schema_})
    problems: dict[str, list[str]] = {}
    for field in fields:
        values = {p: profiles[p].schema_.get(field) for p in plants}
        counts = Counter(values.values())
        top = max(counts.values())
        majority = next(values[p] for p in plants if counts[values[p]] == top)
        holders = [p for p in plants if values[p] == majority]
        for plant in plants:
            if values[plant] == majority:
                continue
            have = "missing" if values[plant] is None else f"'{values[plant]}'"
            want = "missing" if majority is None else f"'{majority}'"
            problems.setdefault(plant, []).append(f"{field} is {have} ({', '.join(holders)}: {want})")
    return problems


def check_schemas(profiles: Mapping[str, DataProfile], task: str) -> None:
    """Raise SchemaMismatch naming every plant whose data does not fit the federation's schema."""
    problems: dict[str, list[str]] = {p: [f"task is '{prof.task}', the run trains '{task}'"] for p, prof in profiles.items() if prof.task != task}
    for plant, found in schema_mismatches({p: prof for p, prof in profiles.items() if prof.task == task}).items():
        problems.setdefault(plant, []).extend(found)
    if problems:
        raise SchemaMismatch(problems)


class BadInput(ValueError):
    """A request the model cannot take (wrong shape or type, not an image, a missing field).

    The edge server answers it with a 4xx and this message; it never reaches the model.
    """


class Serving(Protocol):
    """How a plant's edge server turns requests into model inputs and model outputs into answers.

    Built from the release's spec (and, where a task normalises by the plant's own statistics, the plant's
    data), with the same preprocessing code as training, so serving never drifts from what the model learnt.
    """

    kind: str  # "image" | "window" | "row": what one instance is

    def batch(self, instances: Sequence[Any]) -> np.ndarray:
        """Model inputs (float32, batch first) for the instances; raises BadInput naming the bad instance."""
        ...

    def answers(self, outputs: np.ndarray) -> list[dict[str, Any]]:
        """One JSON-ready answer per instance from the model's outputs (label, probabilities or value)."""
        ...


class Task(Protocol):
    name: str
    models: tuple[str, ...]  # the first is the default
    profile_type: type[DataProfile]
    spec_type: type[TaskSpec]

    def profile(self, data_dir: Path, seed: int) -> DataProfile:
        """Plant side: validate the plant's data and describe it (raises DataError naming file and field)."""
        ...

    def make_spec(self, profiles: Mapping[str, DataProfile], options: TaskOptions) -> TaskSpec:
        """Anchor side: check the plants agree (SchemaMismatch otherwise) and merge their statistics."""
        ...

    def build_model(self, spec: TaskSpec) -> nn.Module:
        """What plants train and send each round."""
        ...

    def deployable(self, spec: TaskSpec, model: nn.Module) -> nn.Module:
        """What the edge serves and MLflow logs: `model` itself, or the trained head behind its frozen extractor."""
        ...

    def training_defaults(self, spec: TaskSpec) -> TrainingDefaults:
        """What `local-epochs = 0` and `learning-rate = 0` in the run config stand for with this spec's model."""
        ...

    def input_example(self, spec: TaskSpec) -> np.ndarray:
        """A real-shaped batch of two for the deployable model, for model signatures and exports.

        Two, not one: torch.export fixes a dimension of size 1, so a batch of one would export a model
        that only ever accepts one input.
        """
        ...

    def load_plant_data(self, data_dir: Path, seed: int, spec: TaskSpec) -> PlantData: ...

    def prepare_plants(self, n_plants: int, root: Path, seed: int, limit: int | None = None) -> list[Path]:
        """Materialise a demo split of the task's public data set, one folder per plant."""
        ...

    def train(self, model: nn.Module, data: PlantData, settings: TrainSettings, spec: TaskSpec) -> dict[str, float]: ...

    def evaluate(self, model: nn.Module, data: PlantData, spec: TaskSpec) -> dict[str, float]: ...

    def serving(self, spec: TaskSpec, data_dir: Path) -> Serving:
        """The edge server's request adapter for a model trained under `spec`, at the plant whose data is in `data_dir`."""
        ...


def resolve_model(task: Task, options: TaskOptions) -> str:
    model = options.model or task.models[0]
    if model not in task.models:
        raise ConfigError(f"task {task.name} has no model {model!r}; choose one of: {', '.join(task.models)}")
    return model
