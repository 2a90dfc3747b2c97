"""The anchor's record of what each plant says it has spent: a plant whose lifetime spend went down is refused.

A plant's ledger is its own (`privacy.ledger`) and only it can keep it honest on its disk; what the anchor can
see is each train reply's lifetime figures for a data set (`dp_epsilon` at the plant's `dp_delta`, and
`dp_rounds`). Both only ever grow: a lower epsilon at the same or a smaller delta, or fewer rounds, means
the plant's ledger was deleted or restored from an older copy, and its update is refused with the reason.
A larger delta legitimately lowers epsilon (the plant weakened its own guarantee), so epsilon is compared only
when delta did not grow; rounds are compared always. The record is kept per plant and data set fingerprint
in one JSON file under the anchor's state folder, replaced atomically under a lock, and keeps the highest
spend seen, so a refused plant stays refused until its ledger is repaired (`maxfl ledger --repair-from-journal`)
or the anchor's operator calls `forget` for it.

Use from the strategy, per train reply: `reason = watch.check(plant, fingerprint, epsilon, delta=..., rounds=...,
run=..., server_round=...)`; `None` accepts the reply, a string is the refusal to log, audit and send back.
"""

from __future__ import annotations

import fcntl
import json
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from maxfl.atomic import atomic_write_text
from maxfl.errors import UserError, describe_validation_error
from maxfl.messages import PRIVACY_PREFIX

FORMAT = "maxfl-spend-watch/1"
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
_REL_TOLERANCE = 1e-9  # a plant recomputes the same history to the same float; anything lower is a lower spend


class WatchCorrupt(UserError):
    """The anchor's own spend record cannot be read: the anchor does not guess at it."""


class Spend(BaseModel):
    """The highest lifetime spend a plant reported for one data set, and when."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    epsilon: float = Field(ge=0.0)  # inf: the data set was trained without DP
    delta: float = Field(gt=0.0, lt=1.0)
    rounds: int = Field(0, ge=0)  # 0: the plant did not report rounds
    run: str
    server_round: int
    recorded_at: datetime


class WatchState(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    format: Literal["maxfl-spend-watch/1"] = FORMAT
    plants: dict[str, dict[str, Spend]] = Field(default_factory=dict)  # plant id -> data set fingerprint -> spend


def default_path(state_dir: Path) -> Path:
    return state_dir / "privacy-watch.json"


class SpendWatch:
    """The spend record at `path` (e.g. `default_path(maxfl_home() / "anchor")`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> WatchState:
        if not self.path.exists():
            return WatchState()
        try:
            return WatchState.model_validate_json(self.path.read_bytes())
        except OSError as exc:
            raise WatchCorrupt(f"the anchor's spend record {self.path} is not readable ({exc.strerror})") from None
        except ValidationError as exc:
            raise WatchCorrupt(f"the anchor's spend record {self.path} is damaged ({describe_validation_error(exc, 'spend record')}); "
                               "restore it from backup: without it a plant's rolled-back ledger goes unnoticed") from None

    @contextmanager
    def _locked(self) -> Iterator[WatchState]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / f".{self.path.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.read()
            before = state.model_dump_json()
            yield state
            if state.model_dump_json() != before:
                atomic_write_text(self.path, json.dumps(state.model_dump(mode="json"), indent=2, allow_nan=True) + "\n")
                self.path.chmod(0o600)

    def check(self, plant: str, fingerprint: str, epsilon: float, *, delta: float, rounds: int | None = None,
              run: str = "", server_round: int = 0) -> str | None:
        """None if this report does not lower what `plant` spent on `fingerprint` (and record it); else the reason."""
        where = f"{plant}'s lifetime spend on data set {fingerprint[:12]}"
        if math.isnan(epsilon) or not 0.0 < delta < 1.0 or epsilon < 0.0:
            return f"{where} was reported as epsilon {epsilon!r} at delta {delta!r}, which is no spend; the update is refused"
        with self._locked() as state:
            seen = state.plants.setdefault(plant, {})
            old = seen.get(fingerprint)
            if old is not None:
                if rounds is not None and 0 < rounds < old.rounds:
                    return (f"{where} went down from {old.rounds} to {rounds} round(s) (epsilon {old.epsilon:.4g} -> {epsilon:.4g}; recorded "
                            f"in run {old.run} round {old.server_round}): its privacy ledger was deleted or restored from an older copy. "
                            "The anchor refuses its updates until the plant repairs its ledger (maxfl ledger --repair-from-journal)")
                lower = epsilon < old.epsilon * (1.0 - _REL_TOLERANCE) if math.isfinite(old.epsilon) else epsilon < old.epsilon
                if lower and delta <= old.delta:
                    return (f"{where} went down from epsilon {old.epsilon:.4g} (delta {old.delta:g}, run {old.run} round {old.server_round}) "
                            f"to {epsilon:.4g} (delta {delta:g}): its privacy ledger was deleted or restored from an older copy. "
                            "The anchor refuses its updates until the plant repairs its ledger (maxfl ledger --repair-from-journal)")
                if not lower and delta == old.delta and epsilon == old.epsilon and (rounds or 0) <= old.rounds:
                    return None  # nothing new (a retried round)
            seen[fingerprint] = Spend(epsilon=epsilon, delta=delta, rounds=max(rounds or 0, old.rounds if old else 0), run=run,
                                      server_round=server_round, recorded_at=datetime.now(UTC))
        return None

    def check_reply(self, plant: str, fingerprint: object, metrics: Mapping[str, object], *, run: str = "", server_round: int = 0) -> str | None:
        """`check` on a train reply: `plant` as the SuperLink identifies the node, `fingerprint` from its plant
        record, `dp_epsilon` / `dp_delta` / `dp_rounds` from its metrics. A reply without them is refused: every
        round a plant trains goes through its ledger, which reports them."""
        if not isinstance(fingerprint, str) or not _FINGERPRINT.match(fingerprint):
            return f"{plant}'s train reply names no data set fingerprint (64 hex digits) for its privacy spend; the update is refused"
        try:
            eps, delta = float(metrics[f"{PRIVACY_PREFIX}epsilon"]), float(metrics[f"{PRIVACY_PREFIX}delta"])  # type: ignore[arg-type]
            raw_rounds = metrics.get(f"{PRIVACY_PREFIX}rounds")
            rounds = None if raw_rounds is None else int(float(raw_rounds))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError, OverflowError):
            return f"{plant}'s train reply carries no readable {PRIVACY_PREFIX}epsilon and {PRIVACY_PREFIX}delta; the update is refused"
        return self.check(plant, fingerprint, eps, delta=delta, rounds=rounds, run=run, server_round=server_round)

    def forget(self, plant: str, fingerprint: str | None = None) -> int:
        """The operator's decision after checking a plant's recovery: drop its record (one data set, or all).
        Returns how many records were dropped."""
        with self._locked() as state:
            seen = state.plants.get(plant, {})
            dropped = [fp for fp in seen if fingerprint is None or fp == fingerprint]
            for fp in dropped:
                del seen[fp]
            if not seen:
                state.plants.pop(plant, None)
        return len(dropped)
