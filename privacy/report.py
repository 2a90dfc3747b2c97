"""What a plant has spent, per data set and per run: for its ledger command and the launcher's summary."""

from __future__ import annotations

import math
from datetime import datetime

from pydantic import BaseModel, ConfigDict

from privacy.ledger import LedgerState


class RunSpend(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="constants")

    run_id: int
    rounds: int
    epsilon: float  # this run's rounds alone, at the plant's current delta


class DataSetSpend(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="constants")

    fingerprint: str
    task: str
    records: int
    rounds: int
    epsilon: float  # lifetime, all runs composed, at `delta`
    delta: float
    max_epsilon: float | None
    remaining: float | None  # the ceiling minus what is spent; None without a ceiling
    last_used: datetime | None
    runs: list[RunSpend]


def spending(state: LedgerState, delta: float, max_epsilon: float | None) -> list[DataSetSpend]:
    out = []
    for fingerprint, data_set in sorted(state.data_sets.items(), key=lambda kv: kv[1].entries[-1].recorded_at.timestamp() if kv[1].entries else 0.0):
        spent = data_set.spent(delta)
        runs = [RunSpend(run_id=r, rounds=sum(e.run_id == r for e in data_set.entries), epsilon=data_set.spent_in_run(r, delta))
                for r in data_set.runs()]
        remaining = None if max_epsilon is None else (math.inf if math.isinf(max_epsilon) else max(0.0, max_epsilon - spent))
        out.append(DataSetSpend(
            fingerprint=fingerprint, task=data_set.task, records=data_set.records, rounds=len(data_set.entries), epsilon=spent,
            delta=delta, max_epsilon=max_epsilon, remaining=remaining,
            last_used=data_set.entries[-1].recorded_at if data_set.entries else None, runs=runs,
        ))
    return out


def one_line(plant_id: str, spends: list[DataSetSpend]) -> str:
    if not spends:
        return f"{plant_id}: no DP training recorded"
    parts = []
    for s in spends:
        ceiling = "no ceiling" if s.max_epsilon is None else f"of {s.max_epsilon:g}"
        parts.append(f"data set {s.fingerprint[:12]} ({s.task}) epsilon {s.epsilon:.3g} {ceiling} over {len(s.runs)} run(s), {s.rounds} round(s)")
    return f"{plant_id}: " + "; ".join(parts)
