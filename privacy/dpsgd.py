"""DP-SGD as a `LocalTraining`: Opacus' per-record clipping, Gaussian noise and Poisson sampling.

Task code trains through it unchanged. Three things it guarantees that a plain `make_private` call does not:
- sampling and noise draw from fresh OS entropy, never from the round's seed: the anchor knows that seed,
  and noise it can regenerate is noise it can subtract (and known batches void the subsampling bound);
- only `PlantData.private_records()` are sampled (records that share no raw sample);
- the steps Opacus' own accountant saw are compared with the mechanism the ledger recorded before training;
  if they differ the update is withheld.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from maxfl.errors import ConfigError, UserError
from maxfl.weights import trained_layers
from privacy.accountant import Mechanism
from tasks.base import PlantData, TrainSettings

GradSampleMode = Literal["hooks", "functorch", "ew", "ghost"]


def grad_sample_mode_for(model: nn.Module) -> GradSampleMode:
    """Ghost clipping for a model of linear layers (a head on frozen features): each record's gradient norm comes
    from its activations and output gradients, so the batch x weights per-record gradients are never stored.
    On the default head it measured within noise of per-record hooks up to batch 128 and faster at 256, the batch
    of plants with a thousand records or more (experiments/dp_cost.py). Hooks otherwise: faster on the CNNs."""
    trainable = trained_layers(model)
    return "ghost" if trainable and all(isinstance(m, nn.Linear) for m in trainable) else "hooks"


class PrivacyError(UserError):
    """DP-SGD did not run as recorded in the ledger; the update must not leave the plant."""


def secret_generator() -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63))


def check_model(model: nn.Module) -> None:
    """Opacus refuses layers that mix records within a batch (BatchNorm) or that it cannot clip per record."""
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        listed = "; ".join(str(p).strip().splitlines()[0] for p in problems)
        raise ConfigError(f"{type(model).__name__} cannot be trained with DP-SGD: {listed}")


class DPSGD:
    """One round of DP-SGD with the mechanism the plant's ledger already recorded."""

    def __init__(self, mechanism: Mechanism, max_grad_norm: float, grad_sample_mode: GradSampleMode | Literal["auto"] = "auto") -> None:
        self.mechanism = mechanism
        self.max_grad_norm = max_grad_norm
        self.requested_mode = grad_sample_mode  # "auto": grad_sample_mode_for the model of each session
        self.grad_sample_mode: GradSampleMode = "hooks" if grad_sample_mode == "auto" else grad_sample_mode
        self._net: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    @contextmanager
    def session(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, data: PlantData, settings: TrainSettings, gen: torch.Generator
    ) -> Iterator[tuple[nn.Module, torch.optim.Optimizer, Iterable[torch.Tensor]]]:
        with warnings.catch_warnings():
            # secure_mode needs torchcsprng, which cannot be installed here; noise is drawn from OS-seeded generators.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            # Inputs never require gradients; Opacus' hooks read what they need from module outputs.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield from self._session(model, optimizer, data, settings)

    def _session(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, data: PlantData, settings: TrainSettings
    ) -> Iterator[tuple[nn.Module, torch.optim.Optimizer, Iterable[torch.Tensor]]]:
        check_model(model)
        if self.requested_mode == "auto":
            self.grad_sample_mode = grad_sample_mode_for(model)
        records = data.private_records()
        batches_per_epoch = math.ceil(len(records) / settings.batch_size)
        if not math.isclose(1.0 / batches_per_epoch, self.mechanism.sample_rate) or settings.epochs * batches_per_epoch != self.mechanism.steps:
            raise PrivacyError(
                f"this round would sample {len(records)} records at rate 1/{batches_per_epoch} for {settings.epochs * batches_per_epoch} steps, "
                f"but the ledger recorded rate {self.mechanism.sample_rate:.6g} for {self.mechanism.steps} steps; nothing was trained"
            )
        loader = DPDataLoader.from_data_loader(DataLoader(TensorDataset(records), batch_size=settings.batch_size), generator=secret_generator())
        engine = PrivacyEngine(accountant="rdp")
        wrapped = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=self.mechanism.noise_multiplier,
            max_grad_norm=self.max_grad_norm, poisson_sampling=False,  # `loader` already is Opacus' Poisson loader
            noise_generator=secret_generator(), grad_sample_mode=self.grad_sample_mode,
            criterion=nn.CrossEntropyLoss(),  # only ghost clipping looks at it, and `reduce` replaces its output
        )
        net, dp_optimizer = wrapped[0], wrapped[1]
        net.forbid_grad_accumulation()
        self._net, self._optimizer = net, dp_optimizer

        def batches() -> Iterator[torch.Tensor]:
            # Opacus' Poisson sampler draws each batch; indexing the records once per batch skips the loader's
            # per-record fetch and collate, which cost a small model's DP epoch more than its gradients did.
            for _ in range(settings.epochs):
                for drawn in loader.batch_sampler:
                    yield records[torch.as_tensor(drawn, dtype=torch.long)]

        try:
            yield net, dp_optimizer, batches()
        finally:
            net._close()
            self._net = self._optimizer = None
        taken = [tuple(h) for h in engine.accountant.history]
        expected = [(self.mechanism.noise_multiplier, self.mechanism.sample_rate, self.mechanism.steps)]
        if len(taken) != 1 or taken[0][2] != expected[0][2] or not math.isclose(taken[0][0], expected[0][0]) or not math.isclose(taken[0][1], expected[0][1]):
            raise PrivacyError(f"Opacus accounted {taken} where the ledger recorded {expected}; the update is withheld")

    def reduce(self, losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The mean over the batch actually drawn: each record's gradient then depends on that record alone,
        which is what per-record clipping bounds (a weighted mean would couple the records of a batch)."""
        if self.grad_sample_mode == "ghost":
            assert self._net is not None and self._optimizer is not None
            return DPTensorFastGradientClipping(self._net, self._optimizer, losses, "mean")  # type: ignore[return-value]
        return losses.sum() / max(len(losses), 1)
