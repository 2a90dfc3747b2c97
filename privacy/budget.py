"""Whether a round fits under the plant's ceiling; if it does, the ledger records it before training starts.

Recording before training (not after) means a plant killed at any moment has already counted the round:
the ledger can over-count a round that never left the plant, never under-count one that did. The ceiling
and delta come from the plant's node config; nothing the anchor sends can raise them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import ValidationError

from maxfl.errors import ConfigError, UserError, describe_validation_error
from maxfl.messages import PRIVACY_PREFIX
from privacy.accountant import Mechanism, epsilon, plan_noise_multiplier, poisson_schedule
from privacy.ledger import DataSetRecord, Ledger, new_entry
from privacy.plan import PrivacyPlan

NO_CEILING_HINT = 'set max-epsilon in this SuperNode\'s --node-config (e.g. max-epsilon=8), or max-epsilon="inf" to allow training without differential privacy'


class CeilingReached(UserError):
    """The round would take the plant past its own ceiling; the plant declines it."""


@dataclass(frozen=True)
class PlantPrivacy:
    """The plant's own limits, from its node config."""

    ledger: Ledger
    max_epsilon: float | None  # None: not set, and the plant refuses to train
    delta: float


@dataclass(frozen=True)
class RoundGrant:
    """What the plant agreed to spend on one round, and what it reports to the anchor."""

    mechanism: Mechanism
    max_grad_norm: float
    metrics: dict[str, float]
    fingerprint: str  # the data set's; with dp_epsilon and dp_rounds the anchor's SpendWatch sees a spend go down

    @property
    def private(self) -> bool:
        return self.mechanism.noise_multiplier > 0.0

    def report(self, training_metrics: dict[str, float]) -> dict[str, float]:
        """The reply's metrics. Under DP the training loss and accuracy stay home: computed on the private
        records without noise, they would leak outside the accounted mechanism. Timings and the grant go."""
        kept = {k: v for k, v in training_metrics.items() if not self.private or k.endswith("_time_s")}
        return kept | self.metrics


def _noise_multiplier(plan: PrivacyPlan, data_set: DataSetRecord, run_id: int, delta: float, sample_rate: float, steps: int,
                      num_rounds: int) -> float:
    """The run's noise multiplier: planned once (up to a third of a second), then read back from the ledger."""
    for entry in data_set.entries:
        if (entry.run_id, entry.delta, entry.sample_rate, entry.steps) == (run_id, delta, sample_rate, steps):
            return entry.noise_multiplier
    if plan.privacy == "none":
        return 0.0
    if plan.target_epsilon > 0.0:
        try:
            return plan_noise_multiplier(plan.target_epsilon, delta, sample_rate, steps * num_rounds)
        except ValueError as exc:  # a target of 0+ or inf: the search is bounded and says so
            raise ConfigError(f"the run's target-epsilon cannot be planned on this plant: {exc}") from None
    return plan.noise_multiplier


def _mechanism(sigma: float, sample_rate: float, steps: int) -> Mechanism:
    try:
        return Mechanism(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)
    except ValidationError as exc:  # e.g. noise-multiplier = inf in the run config
        raise ConfigError(f"the run asks for a mechanism this plant cannot account for: {describe_validation_error(exc, 'mechanism')}") from None


def authorize_round(
    plant: PlantPrivacy, plan: PrivacyPlan, *, fingerprint: str, task: str, records: int,
    run_id: int, server_round: int, epochs: int, batch_size: int, num_rounds: int,
) -> RoundGrant:
    """Check the round against the ceiling and record it in the ledger, or raise (and record nothing)."""
    if plant.max_epsilon is None:
        raise ConfigError(f"this plant has no privacy ceiling and will not train: {NO_CEILING_HINT}")
    if plant.delta >= 1.0 / records:
        raise ConfigError(f"delta {plant.delta:g} is not below 1/{records} (one over this plant's {records} training records): "
                          f"set delta in the SuperNode's --node-config to at most {0.1 / records:.1g}")
    if plan.privacy == "none" and not math.isinf(plant.max_epsilon):
        raise CeilingReached(f"the run asks to train without differential privacy; this plant trains only with DP "
                             f"(its ceiling is epsilon {plant.max_epsilon:g}, set in its node config)")
    sample_rate, steps = poisson_schedule(records, batch_size, epochs)
    with plant.ledger.transaction() as state:
        data_set = state.data_sets.setdefault(fingerprint, DataSetRecord(task=task, records=records))
        sigma = _noise_multiplier(plan, data_set, run_id, plant.delta, sample_rate, steps, num_rounds)
        mechanism = _mechanism(sigma, sample_rate, steps)
        spent = data_set.spent(plant.delta)
        after = epsilon([*data_set.mechanisms(), mechanism], plant.delta)
        if after > plant.max_epsilon:
            raise CeilingReached(
                f"round {server_round} would take epsilon on data set {fingerprint[:12]} to {after:.3g}, over this plant's ceiling "
                f"{plant.max_epsilon:g} (delta {plant.delta:g}; {spent:.3g} spent in {len(data_set.runs())} run(s)); only the plant "
                f"can raise its ceiling (max-epsilon in its node config)"
            )
        data_set.entries.append(new_entry(mechanism, run_id=run_id, server_round=server_round, delta=plant.delta,
                                          max_grad_norm=plan.max_grad_norm, epsilon_after=after))
        spent_in_run = data_set.spent_in_run(run_id, plant.delta)
        rounds = len(data_set.entries)
    figures = {
        "epsilon": after,
        "epsilon_run": spent_in_run,
        "rounds": float(rounds),  # lifetime rounds on this data set: independent of delta, it only grows
        "epsilon_ceiling": plant.max_epsilon,
        "delta": plant.delta,
        "noise_multiplier": sigma,
        "sample_rate": sample_rate,
        "steps": float(steps),
        "max_grad_norm": plan.max_grad_norm,
    }
    metrics = {f"{PRIVACY_PREFIX}{k}": v for k, v in figures.items()}
    return RoundGrant(mechanism=mechanism, max_grad_norm=plan.max_grad_norm, metrics=metrics, fingerprint=fingerprint)
