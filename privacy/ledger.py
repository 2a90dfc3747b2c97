"""The plant's privacy ledger: every DP round it ever trained, per data set, on its own disk.

One JSON file per plant. Each round's mechanism (noise multiplier, sample rate, steps, delta, clipping bound)
is appended with the data set's lifetime epsilon after it, inside an exclusive lock, and the file is replaced
atomically. The file carries a SHA-256 digest of its content, and every recorded epsilon is recomputed from
the mechanisms on load: a file that does not parse, whose digest does not match (edited by hand), or whose
numbers do not add up is refused, never repaired or guessed at, since a lost record would under-count.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from maxfl.atomic import atomic_write_text
from maxfl.errors import ConfigError, UserError, describe_validation_error
from privacy.accountant import ACCOUNTANT, Mechanism, cumulative_epsilons, epsilon

FORMAT = "maxfl-privacy-ledger/1"
_REL_TOLERANCE = 1e-6


class LedgerCorrupt(UserError):
    """The ledger cannot be trusted: the plant refuses to train until a good copy is restored."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(
            f"privacy ledger {path} {why}; this plant will not train against a ledger it cannot trust "
            f"(a lost record would under-count epsilon): restore the last good copy of {path.name} from backup"
        )


class LedgerEntry(BaseModel):
    """One round trained on a data set; `epsilon` is the data set's lifetime epsilon after it, at `delta`."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

    run_id: int
    server_round: int = Field(ge=1)
    noise_multiplier: float = Field(ge=0.0)
    sample_rate: float = Field(gt=0.0, le=1.0)
    steps: int = Field(ge=1)
    delta: float = Field(gt=0.0, lt=1.0)
    max_grad_norm: float = Field(gt=0.0)
    epsilon: float = Field(ge=0.0)
    recorded_at: datetime

    def mechanism(self) -> Mechanism:
        return Mechanism(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=self.steps)


class DataSetRecord(BaseModel):
    """A data set (by fingerprint) and every round trained on it, across runs."""

    model_config = ConfigDict(extra="forbid")

    task: str
    records: int = Field(ge=1)  # training records when it was first used (for the delta check)
    entries: list[LedgerEntry] = Field(default_factory=list)

    def mechanisms(self) -> list[Mechanism]:
        return [e.mechanism() for e in self.entries]

    def spent(self, delta: float) -> float:
        return epsilon(self.mechanisms(), delta)

    def runs(self) -> list[int]:
        return sorted({e.run_id for e in self.entries})

    def spent_in_run(self, run_id: int, delta: float) -> float:
        return epsilon([e.mechanism() for e in self.entries if e.run_id == run_id], delta)


class LedgerState(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    format: Literal["maxfl-privacy-ledger/1"] = FORMAT
    plant_id: str
    accountant: Literal["rdp"] = ACCOUNTANT
    data_sets: dict[str, DataSetRecord] = Field(default_factory=dict)


def _digest(payload: dict[str, object]) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _same(a: float, b: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=_REL_TOLERANCE, abs_tol=1e-9)


class Ledger:
    """The ledger file of one plant. `transaction()` is the only way to change it.

    `plant_id` None (reading someone's file to inspect it): the file's own plant id is accepted.
    """

    def __init__(self, path: Path, plant_id: str | None) -> None:
        self.path = path
        self.plant_id = plant_id

    def read(self) -> LedgerState:
        """The verified ledger; an empty one if the plant never trained with DP."""
        if not self.path.exists():
            if self.plant_id is None:
                raise ConfigError(f"there is no privacy ledger at {self.path}")
            return LedgerState(plant_id=self.plant_id)
        try:
            payload = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LedgerCorrupt(self.path, f"is not readable JSON ({exc})") from None
        if not isinstance(payload, dict) or not isinstance(recorded := payload.pop("digest", None), str):
            raise LedgerCorrupt(self.path, "has no digest")
        if _digest(payload) != recorded:
            raise LedgerCorrupt(self.path, "was changed outside maxfl (its content does not match its digest)")
        try:
            state = LedgerState.model_validate(payload)
        except ValidationError as exc:
            raise LedgerCorrupt(self.path, f"does not match the ledger format ({describe_validation_error(exc, 'ledger')})") from None
        if self.plant_id is not None and state.plant_id != self.plant_id:
            raise ConfigError(f"privacy ledger {self.path} belongs to {state.plant_id}, not {self.plant_id}: give each plant its own ledger path")
        for fingerprint, data_set in state.data_sets.items():
            expected = cumulative_epsilons(data_set.mechanisms(), [e.delta for e in data_set.entries])
            for i, (entry, eps) in enumerate(zip(data_set.entries, expected, strict=True)):
                if not _same(entry.epsilon, eps):
                    raise LedgerCorrupt(self.path, f"records epsilon {entry.epsilon:.6g} for data set {fingerprint[:12]} entry {i + 1} "
                                        f"where its mechanisms give {eps:.6g}")
        return state

    def write(self, state: LedgerState) -> None:
        payload = state.model_dump(mode="json")
        payload["digest"] = _digest(payload)
        atomic_write_text(self.path, json.dumps(payload, indent=2, allow_nan=True) + "\n")

    @contextmanager
    def transaction(self) -> Iterator[LedgerState]:
        """The verified ledger under an exclusive lock; written back atomically when the block succeeds."""
        assert self.plant_id is not None, "only a plant's own ledger (plant id known) can be written"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / f".{self.path.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.read()
            yield state
            self.write(state)


def new_entry(mechanism: Mechanism, *, run_id: int, server_round: int, delta: float, max_grad_norm: float, epsilon_after: float) -> LedgerEntry:
    return LedgerEntry(run_id=run_id, server_round=server_round, delta=delta, max_grad_norm=max_grad_norm, epsilon=epsilon_after,
                       recorded_at=datetime.now(UTC), **mechanism.model_dump())
