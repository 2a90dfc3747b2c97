"""Epsilon from a history of mechanisms: Opacus' RDP accountant, composed over every round of every run.

A round is one subsampled Gaussian mechanism applied `steps` times. RDP composes by adding the curves, so
the lifetime epsilon of a data set is computed from the whole history at once; adding per-round epsilons
(what a fresh PrivacyEngine per round reports) would over-state it, reporting only the last round's would
under-state it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp
from opacus.accountants.utils import get_noise_multiplier
from pydantic import BaseModel, ConfigDict, Field

ACCOUNTANT = "rdp"
ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)


class Mechanism(BaseModel):
    """Poisson-sampled DP-SGD for one round: noise multiplier 0 means no noise (epsilon is infinite)."""

    model_config = ConfigDict(frozen=True)

    noise_multiplier: float = Field(ge=0.0)
    sample_rate: float = Field(gt=0.0, le=1.0)
    steps: int = Field(ge=1)


def poisson_schedule(records: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """Sample rate and steps of `epochs` passes with Opacus' Poisson loader (1/q batches per epoch)."""
    batches = math.ceil(records / batch_size)
    return 1.0 / batches, epochs * batches


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """One step's RDP curve; steps compose linearly, and a ledger repeats the same few mechanisms."""
    if noise_multiplier == 0.0:
        return np.full(len(ORDERS), math.inf)
    curve = np.asarray(rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(ORDERS)))
    curve.setflags(write=False)
    return curve


def _rdp(m: Mechanism) -> np.ndarray:
    return m.steps * _rdp_per_step(m.noise_multiplier, m.sample_rate)


def _epsilon_of(curve: np.ndarray, delta: float) -> float:
    if not np.all(np.isfinite(curve)):
        return math.inf
    eps, _ = rdp.get_privacy_spent(orders=list(ORDERS), rdp=curve, delta=delta)
    return float(eps)


def epsilon(history: Iterable[Mechanism], delta: float) -> float:
    """Epsilon at `delta` of all mechanisms in `history` together (0 for none)."""
    curve = np.zeros(len(ORDERS))
    for m in history:
        curve = curve + _rdp(m)
    return _epsilon_of(curve, delta) if curve.any() else 0.0


def cumulative_epsilons(history: Sequence[Mechanism], deltas: Sequence[float]) -> list[float]:
    """After each mechanism, the epsilon of everything up to it, at that entry's delta."""
    out, curve = [], np.zeros(len(ORDERS))
    for m, delta in zip(history, deltas, strict=True):
        curve = curve + _rdp(m)
        out.append(_epsilon_of(curve, delta))
    return out


@functools.lru_cache(maxsize=256)
def plan_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to Opacus' 0.01 tolerance) whose `steps` steps spend at most the target."""
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=ACCOUNTANT))
