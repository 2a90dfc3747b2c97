"""Personalisation at the plant: serve the best of {global, personalised, local-only} for this plant's own line.

When an approved global model arrives, the plant carves a validation split out of its *training* records (the
held-out test split is never read), fine-tunes the global model on the rest while pulling it towards the global
weights (personalised), trains the same model from scratch on the rest (local-only), and keeps whichever scores
best on validation, preferring the global model on ties; the chosen one is then trained again on all training
records. For a model whose only trained layer is linear (a head on fixed features), a blend of the global and the
local-only weights is personalised too: there it is exactly the ensemble of their logits (the mixture of APFL,
Deng et al. 2020, with the mixing weight picked on validation). None of this leaves the plant, so no privacy
budget is spent and the ledger is not touched: only the name of the chosen variant and its validation scores go
back in the deploy acknowledgement.
"""

from __future__ import annotations

import copy
import logging
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from maxfl.weights import trained_layers
from tasks.base import MiniBatches, PlantData, Task, TaskSpec, TrainSettings, scheduled_learning_rate
from tasks.defect.split import holdout_split

log = logging.getLogger("maxfl")

Variant = Literal["global", "personalised", "local"]
VALIDATION_FRACTION = 0.2
SCHEDULE_STEPS = 5  # the learning rate decays over the epochs in this many steps (cosine), like a run's rounds


@dataclass(frozen=True)
class PersonaliseSettings:
    """Non-private local training: the records never leave the plant, so it can train as long as it likes."""

    epochs: int = 25  # for the personalised and the local-only variant alike
    batch_size: int = 32
    learning_rate: float = 0.05
    # Personalised: fine-tuning pulled towards the global weights by (strength / 2) x ||w - w_global||^2 (Ditto, Li et
    # al. 2021); the strength is picked on validation too. Strong: close to the global model; weak: close to local-only.
    strengths: tuple[float, ...] = (0.1, 0.01)
    # Blends for a linear head: the global model's share of the served logits (the local-only model has the rest).
    blends: tuple[float, ...] = (0.75, 0.5, 0.25)
    # Stratified folds of the training split the choice is validated on (1: one 80/20 split). A head on cached
    # features trains in well under a second, so plants can afford 5 and a steadier choice; a whole CNN cannot.
    folds: int = 1
    seed: int = 0


@dataclass(frozen=True)
class Choice:
    variant: Variant
    model: nn.Module
    scores: dict[str, float]  # validation metric of every variant that was built
    metric: str
    strength: float | None = None  # the personalised variant's pull towards the global weights, if chosen
    blend: float | None = None  # or, for a linear head, the global model's share of the blend that was chosen


def validation_split(data: PlantData, seed: int) -> PlantData:
    """The training records split again, stratified by label: its `x_train` to fit, its `x_test` to validate.
    The plant's own test split is not part of it."""
    labels = data.y_train.numpy()
    fit_idx, val_idx = (torch.from_numpy(i) for i in holdout_split(_strata(labels), VALIDATION_FRACTION, seed))
    return _part(data, fit_idx, val_idx)


def validation_folds(data: PlantData, seed: int, folds: int) -> list[PlantData]:
    """`folds` > 1: stratified k-fold splits of the training records (each record validates once); 1: one split."""
    if folds <= 1:
        return [validation_split(data, seed)]
    strata = _strata(data.y_train.numpy())
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(strata), dtype=int)
    for c in np.unique(strata):
        idx = rng.permutation(np.flatnonzero(strata == c))
        fold_of[idx] = np.arange(len(idx)) % folds
    return [_part(data, torch.from_numpy(np.flatnonzero(fold_of != f)), torch.from_numpy(np.flatnonzero(fold_of == f))) for f in range(folds)]


def _strata(labels: np.ndarray) -> np.ndarray:
    return labels if labels.dtype.kind in "iub" else np.zeros(len(labels), dtype=int)  # regression: a plain random cut


def _part(data: PlantData, fit_idx: torch.Tensor, val_idx: torch.Tensor) -> PlantData:
    return PlantData(data.x_train[fit_idx], data.y_train[fit_idx], data.x_train[val_idx], data.y_train[val_idx], fingerprint=data.fingerprint)


@contextmanager
def _pulled_towards(model: nn.Module, anchor: nn.Module, strength: float) -> Iterator[None]:
    """While active, every gradient of `model` gains strength x (w - w_anchor): the proximal term of Ditto."""
    hooks = [p.register_hook(lambda g, p=p, a=a.detach().clone(): g + strength * (p.detach() - a))
             for p, a in zip(model.parameters(), anchor.parameters(), strict=True)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def is_linear_head(model: nn.Module) -> bool:
    """Exactly one layer with trained weights, and it is linear: blending two such models' weights blends their
    logits, whatever fixed features (parameter-free statistics, a frozen backbone) come before it."""
    trained = trained_layers(model)
    return len(trained) == 1 and isinstance(trained[0], nn.Linear)


def _blend(global_model: nn.Module, local: nn.Module, share: float) -> nn.Module:
    """`share` x the global weights + (1 - share) x the local-only ones, floating-point entries only."""
    blended = copy.deepcopy(global_model)
    mine = local.state_dict()
    blended.load_state_dict({k: share * v + (1 - share) * mine[k] if v.is_floating_point() else v
                             for k, v in global_model.state_dict().items()})
    return blended


def _train(task: Task, spec: TaskSpec, start: nn.Module, data: PlantData, s: PersonaliseSettings, salt: str,
           anchor: nn.Module | None = None, strength: float = 0.0) -> nn.Module:
    """`s.epochs` in `SCHEDULE_STEPS` stretches under a cosine-decayed rate, as a plant trains over a run's rounds."""
    model = copy.deepcopy(start)
    with _pulled_towards(model, anchor, strength) if anchor is not None and strength > 0 else nullcontext():
        for step in range(1, SCHEDULE_STEPS + 1):
            settings = TrainSettings(epochs=max(1, s.epochs // SCHEDULE_STEPS), batch_size=s.batch_size,
                                     learning_rate=scheduled_learning_rate(s.learning_rate, "cosine", step, SCHEDULE_STEPS),
                                     seed=zlib.crc32(f"{s.seed}/{salt}/{step}".encode()), local_training=MiniBatches())
            task.train(model, data, settings, spec)
    return model


def choose(task: Task, spec: TaskSpec, global_model: nn.Module, data: PlantData, metric: str, settings: PersonaliseSettings) -> Choice:
    """Pick a variant by validation `metric` (higher is better; the mean over `settings.folds` folds of the training
    split), then train the chosen one again on the whole training split: validation records were only needed to choose."""
    splits = [s for s in validation_folds(data, settings.seed, settings.folds) if len(s.y_train) and len(s.y_test)]
    if not splits:
        return Choice("global", global_model, {}, metric)
    torch.manual_seed(settings.seed)
    fresh = task.build_model(spec)
    Candidate = tuple[Variant, float | None, float | None]  # variant, Ditto strength, blend share
    candidates: dict[str, Candidate] = {"global": ("global", None, None), "local": ("local", None, None)}
    candidates |= {f"personalised@{k:g}": ("personalised", k, None) for k in settings.strengths}
    if is_linear_head(fresh):
        candidates |= {f"personalised@blend{b:g}": ("personalised", None, b) for b in settings.blends}
    trained_alone: dict[int, nn.Module] = {}  # local-only model per training set: the blends reuse it

    def local_only(on: PlantData) -> nn.Module:
        if id(on) not in trained_alone:
            trained_alone[id(on)] = _train(task, spec, fresh, on, settings, "local")
        return trained_alone[id(on)]

    def build(name: str, on: PlantData) -> nn.Module:
        variant, strength, blend = candidates[name]
        if variant == "global":
            return global_model
        if variant == "local":
            return local_only(on)
        if blend is not None:
            return _blend(global_model, local_only(on), blend)
        return _train(task, spec, global_model, on, settings, name, anchor=global_model, strength=strength or 0.0)

    def validated(name: str) -> float:
        values = [float(task.evaluate(build(name, split), split, spec).get(metric, float("nan"))) for split in splits]
        return float(np.mean(values))

    scores = {name: validated(name) for name in candidates}
    order = list(candidates)  # ties: global first, then local, then the strongest pull, then the most global blend
    best = max(order, key=lambda n: (scores[n] if scores[n] == scores[n] else float("-inf"), -order.index(n)))
    variant, strength, blend = candidates[best]
    log.info("personalisation: validation %s %s -> serving %s", metric, ", ".join(f"{n} {v:.4f}" for n, v in scores.items()), best)
    return Choice(variant, build(best, data), scores, metric, strength, blend)
