"""Epsilon from a history of mechanisms: Opacus' RDP accountant, composed over every round of every run.

A round is one subsampled Gaussian mechanism applied `steps` times. RDP composes by adding the curves, so
the lifetime epsilon of a data set is computed from the whole history at once; adding per-round epsilons
(what a fresh PrivacyEngine per round reports) would over-state it, reporting only the last round's would
under-state it.

Every computation here is bounded: a mechanism's fields are finite and within `SIGMA_MAX` / `STEPS_MAX`, Opacus'
open-ended series for fractional orders is used only where it converges quickly (sigma up to
`_EXACT_SIGMA_MAX`; above it each fractional order takes the next integer order's RDP, an upper bound since
RDP grows with the order), and the noise search runs a fixed number of steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp
from pydantic import BaseModel, ConfigDict, Field, model_validator

ACCOUNTANT = "rdp"
ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)
SIGMA_MIN = 1e-6  # below it (and not 0) a noise multiplier is a mistake; Opacus divides by zero near 1e-300
SIGMA_MAX = 1e6  # Opacus' own search limit: more noise than this is no model
STEPS_MAX = 10**9
_EXACT_SIGMA_MAX = 20.0  # Opacus' fractional-order series: < 0.5 s per curve up to here, minutes (or forever) far above
_SEARCH_STEPS = 64  # doublings plus bisections of the noise search: 2^-40 of the bracket is far below its tolerance


class Mechanism(BaseModel):
    """Poisson-sampled DP-SGD for one round: noise multiplier 0 means no noise (epsilon is infinite)."""

    model_config = ConfigDict(frozen=True)

    noise_multiplier: float = Field(ge=0.0, le=SIGMA_MAX, allow_inf_nan=False)
    sample_rate: float = Field(gt=0.0, le=1.0, allow_inf_nan=False)
    steps: int = Field(ge=1, le=STEPS_MAX)

    @model_validator(mode="after")
    def _noise_is_zero_or_real(self) -> Mechanism:
        if 0.0 < self.noise_multiplier < SIGMA_MIN:
            raise ValueError(f"noise multiplier {self.noise_multiplier:g} is neither 0 (no DP) nor at least {SIGMA_MIN:g}")
        return self


def poisson_schedule(records: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """Sample rate and steps of `epochs` passes with Opacus' Poisson loader (1/q batches per epoch)."""
    batches = math.ceil(records / batch_size)
    return 1.0 / batches, epochs * batches


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """One step's RDP curve; steps compose linearly, and a ledger repeats the same few mechanisms."""
    if noise_multiplier == 0.0:
        return np.full(len(ORDERS), math.inf)
    if not (SIGMA_MIN <= noise_multiplier <= SIGMA_MAX and 0.0 < sample_rate <= 1.0):  # Mechanism validates; this is the last guard
        raise ValueError(f"no RDP curve for noise multiplier {noise_multiplier!r} and sample rate {sample_rate!r}")
    if noise_multiplier <= _EXACT_SIGMA_MAX or sample_rate == 1.0:
        orders = list(ORDERS)
    else:
        orders = [float(math.ceil(a)) for a in ORDERS]
    curve = np.asarray(rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders))
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
    """The smallest noise multiplier (to Opacus' 0.01 tolerance in epsilon) whose `steps` steps spend at most the
    target: Opacus' `get_noise_multiplier` search (double from 20, then bisect), in at most `_SEARCH_STEPS` steps,
    so a target near 0 or near infinity ends too. Raises ValueError when even `SIGMA_MAX` spends more."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0.0):
        raise ValueError(f"target epsilon {target_epsilon!r} is not a positive finite number")

    def spends(sigma: float) -> float:
        return epsilon([Mechanism(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)], delta)

    low, high, eps_high, budget = 0.0, 20.0, spends(20.0), _SEARCH_STEPS
    while eps_high > target_epsilon:
        if high >= SIGMA_MAX or budget == 0:
            raise ValueError(f"target epsilon {target_epsilon:g} is too low: even noise multiplier {high:g} spends {eps_high:.3g}")
        high, budget = min(2.0 * high, SIGMA_MAX), budget - 1
        eps_high = spends(high)
    while target_epsilon - eps_high > 0.01 and budget > 0:
        mid, budget = max((low + high) / 2.0, SIGMA_MIN), budget - 1
        if (eps := spends(mid)) < target_epsilon:
            high, eps_high = mid, eps
        else:
            low = mid
    return high
