"""The plant's privacy ledger: every DP round it ever trained, per data set, on its own disk.

One JSON file per plant. Each round's mechanism (noise multiplier, sample rate, steps, delta, clipping bound)
is appended with the data set's lifetime epsilon after it, inside an exclusive lock, and the file is replaced
atomically. The file carries an HMAC-SHA256 keyed with the plant's ledger key (`privacy.ledger_key`, a secret
only the plant holds) and bound to its plant id, so an edit, a recomputed plain digest or another plant's
ledger does not verify. Every round is also appended to a journal beside it (`privacy.journal`, HMAC-chained,
optionally mirrored elsewhere): a ledger that records less than its journal was deleted or restored from an
older copy, and is refused rather than believed, since a lost record would under-count. Every recorded
epsilon is recomputed from the mechanisms on load. `repair_from_journal` rebuilds a ledger from the journal;
it never lowers a spend.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from maxfl.atomic import atomic_write_text
from maxfl.errors import ConfigError, UserError, describe_validation_error
from privacy.accountant import ACCOUNTANT, SIGMA_MAX, SIGMA_MIN, STEPS_MAX, Mechanism, cumulative_epsilons, epsilon
from privacy.journal import Journal, JournalBroken
from privacy.ledger_key import LedgerKey

log = logging.getLogger(__name__)

FORMAT = "maxfl-privacy-ledger/2"
OLD_FORMAT = "maxfl-privacy-ledger/1"  # unkeyed SHA-256 digest: read once, for migration
_REL_TOLERANCE = 1e-6
_LEDGER, _JOURNAL = "privacy-ledger/2", "privacy-journal/1"  # MAC purposes: one sub-key each
REPAIR_COMMAND = ("rebuild it from its journal with `maxfl ledger --node-config '<this plant's node config>' --repair-from-journal` "
                  "(that restores the higher spend and never lowers one)")
REPAIR_HINT = f"{REPAIR_COMMAND}; a backup copy is accepted only if it holds every round the journal does"


class LedgerCorrupt(UserError):
    """The ledger cannot be trusted: the plant refuses to train until it is repaired."""

    def __init__(self, path: Path, why: str, fix: str = REPAIR_HINT) -> None:
        super().__init__(f"privacy ledger {path} {why}; this plant will not train against a ledger it cannot trust "
                         f"(a lost record would under-count epsilon): {fix}")


class LedgerBehind(LedgerCorrupt):
    """The journal records more than the ledger: the ledger was deleted or rolled back."""


class LedgerEntry(BaseModel):
    """One round trained on a data set; `epsilon` is the data set's lifetime epsilon after it, at `delta`."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

    run_id: int
    server_round: int = Field(ge=1)
    noise_multiplier: float = Field(ge=0.0, le=SIGMA_MAX, allow_inf_nan=False)
    sample_rate: float = Field(gt=0.0, le=1.0, allow_inf_nan=False)
    steps: int = Field(ge=1, le=STEPS_MAX)
    delta: float = Field(gt=0.0, lt=1.0, allow_inf_nan=False)
    max_grad_norm: float = Field(gt=0.0, allow_inf_nan=False)
    epsilon: float = Field(ge=0.0)  # inf: the data set was trained without DP
    recorded_at: datetime

    @model_validator(mode="after")
    def _noise_is_zero_or_real(self) -> LedgerEntry:
        if 0.0 < self.noise_multiplier < SIGMA_MIN:
            raise ValueError(f"noise multiplier {self.noise_multiplier:g} is neither 0 (no DP) nor at least {SIGMA_MIN:g}")
        return self

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

    format: Literal["maxfl-privacy-ledger/2"] = FORMAT
    plant_id: str
    accountant: Literal["rdp"] = ACCOUNTANT
    data_sets: dict[str, DataSetRecord] = Field(default_factory=dict)


class JournalRecord(BaseModel):
    """One journal line's record: a round, with what a rebuilt ledger needs to know about its data set."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    fingerprint: str
    task: str
    records: int = Field(ge=1)
    entry: LedgerEntry


def _canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def _digest(payload: dict[str, Any]) -> str:
    """The old format's unkeyed digest (migration only)."""
    return hashlib.sha256(_canonical(payload)).hexdigest()


def _same(a: float, b: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=_REL_TOLERANCE, abs_tol=1e-9)


Rounds = dict[str, DataSetRecord]  # a journal's rounds, grouped per data set as the ledger keeps them


class Ledger:
    """The ledger file of one plant. `transaction()` is the only way to add a round.

    `plant_id` None (reading someone's file to inspect it): the file's own plant id is accepted. `key`: the
    ledger key file (default `<ledger>.key`); `mirror`: a second copy of the journal (e.g. on another disk).
    """

    def __init__(self, path: Path, plant_id: str | None, key: Path | None = None, mirror: Path | None = None) -> None:
        self.path = path
        self.plant_id = plant_id
        self.key = LedgerKey(key or path.with_name(f"{path.name}.key"))
        self.journal_paths = [path.with_name(f"{path.name}.journal"), *([mirror] if mirror else [])]

    # ------------------------------------------------------------------ reading
    def read(self) -> LedgerState:
        """The verified ledger; an empty one if the plant never trained with DP. Refused if a journal copy
        records more rounds than it (deleted or restored ledger) or disagrees with it. Reads under a shared
        lock: a round being recorded (ledger first, then journal) is never seen half-way."""
        with self._lock(fcntl.LOCK_SH, required=False):
            return self._read()

    def _read(self) -> LedgerState:
        state, _ = self._load()
        for path, rounds in self._journals(state.plant_id):
            self._compare(state, path, rounds)
        return state

    def _check_owner(self, plant_id: object) -> str:
        if not isinstance(plant_id, str):
            raise LedgerCorrupt(self.path, "names no plant")
        if self.plant_id is not None and plant_id != self.plant_id:
            raise ConfigError(f"privacy ledger {self.path} belongs to {plant_id}, not {self.plant_id}: give each plant its own ledger path")
        return plant_id

    def _load(self) -> tuple[LedgerState, bool]:
        """The ledger file verified on its own (MAC, format, numbers); True if it is in the old format."""
        if not self.path.exists():
            if self.plant_id is None:
                raise ConfigError(f"there is no privacy ledger at {self.path}")
            return LedgerState(plant_id=self.plant_id), False
        try:
            payload = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LedgerCorrupt(self.path, f"is not readable JSON ({exc})") from None
        if not isinstance(payload, dict):
            raise LedgerCorrupt(self.path, "is not a ledger (not a JSON object)")
        old = payload.get("format") == OLD_FORMAT
        if old:
            self._verify_old(payload)
        elif payload.get("format") == FORMAT:
            self._verify_keyed(payload)
        else:
            raise LedgerCorrupt(self.path, f"does not match the ledger format (format {str(payload.get('format'))[:40]!r}, expected {FORMAT!r})")
        try:
            state = LedgerState.model_validate(payload)
        except ValidationError as exc:
            raise LedgerCorrupt(self.path, f"does not match the ledger format ({describe_validation_error(exc, 'ledger')})") from None
        self._check_numbers(state)
        return state, old

    def _verify_keyed(self, payload: dict[str, Any]) -> None:
        mac, key_id = payload.pop("hmac", None), payload.pop("key_id", None)
        plant_id = self._check_owner(payload.get("plant_id"))
        if not isinstance(mac, str):
            raise LedgerCorrupt(self.path, "has no MAC")
        if not self.key.exists():
            raise LedgerCorrupt(self.path, f"cannot be verified: its key {self.key.path} is missing",
                                fix="restore the key file from backup (node config ledger-key names it if it lives elsewhere)")
        if key_id != self.key.key_id(_LEDGER, plant_id):
            raise LedgerCorrupt(self.path, f"was not written with this plant's ledger key {self.key.path} for {plant_id} "
                                "(a copy of another plant's ledger, an edited plant id, or the wrong ledger-key)")
        if not hmac.compare_digest(mac, self.key.mac(_LEDGER, plant_id, _canonical(payload))):
            raise LedgerCorrupt(self.path, "was changed outside maxfl (its content does not match its MAC)")

    def _verify_old(self, payload: dict[str, Any]) -> None:
        recorded = payload.pop("digest", None)
        if not isinstance(recorded, str) or _digest(payload) != recorded:
            raise LedgerCorrupt(self.path, "was changed outside maxfl (its content does not match its digest)")
        self._check_owner(payload.get("plant_id"))
        if any(p.exists() for p in self.journal_paths):
            raise LedgerCorrupt(self.path, f"is in the old unkeyed format ({OLD_FORMAT}) although this plant already keeps a keyed "
                                "ledger and journal: an old backup or a hand-made file")
        log.warning("privacy ledger %s is in the old unkeyed format (%s); its digest verifies, and it is rewritten keyed (%s, key %s) "
                    "with a journal on this plant's next round", self.path, OLD_FORMAT, FORMAT, self.key.path)
        payload["format"] = FORMAT

    def _check_numbers(self, state: LedgerState, where: Path | None = None) -> None:
        for fingerprint, data_set in state.data_sets.items():
            expected = cumulative_epsilons(data_set.mechanisms(), [e.delta for e in data_set.entries])
            for i, (entry, eps) in enumerate(zip(data_set.entries, expected, strict=True)):
                if not _same(entry.epsilon, eps):
                    source = "" if where is None else f"'s journal {where}"
                    raise LedgerCorrupt(self.path, f"{source} records epsilon {entry.epsilon:.6g} for data set {fingerprint[:12]} entry {i + 1} "
                                        f"where its mechanisms give {eps:.6g}")

    def _journals(self, plant_id: str) -> list[tuple[Path, Rounds]]:
        """Every journal copy that exists, verified, with its rounds per data set."""
        out = []
        for path in self.journal_paths:
            if not path.exists():
                continue
            if not self.key.exists():
                raise LedgerCorrupt(self.path, f"has a journal {path} but its key {self.key.path} is missing",
                                    fix="restore the key file from backup (node config ledger-key names it if it lives elsewhere)")
            journal = Journal(path, lambda data, pid=plant_id: self.key.mac(_JOURNAL, pid, data))
            try:
                records = [JournalRecord.model_validate(r) for r in journal.read()]
            except JournalBroken as exc:
                raise LedgerCorrupt(self.path, f"has a journal {path} that does not verify: {exc}",
                                    fix="restore the journal from backup (or, only if the ledger is current, move it aside: it is rebuilt from the ledger)") from None
            except ValidationError as exc:
                raise LedgerCorrupt(self.path, f"has a journal {path} that does not match the journal format "
                                    f"({describe_validation_error(exc, 'journal line')})") from None
            rounds: Rounds = {}
            for r in records:
                rounds.setdefault(r.fingerprint, DataSetRecord(task=r.task, records=r.records)).entries.append(r.entry)
            out.append((path, rounds))
        return out

    def _compare(self, state: LedgerState, journal_path: Path, rounds: Rounds) -> None:
        """Refuse a ledger the journal contradicts or is ahead of; a journal behind is caught up on the next write."""
        for fingerprint, journaled in rounds.items():
            have = state.data_sets[fingerprint].entries if fingerprint in state.data_sets else []
            want = journaled.entries
            common = min(len(have), len(want))
            for i in range(common):
                if have[i] != want[i]:
                    raise LedgerCorrupt(self.path, f"and its journal {journal_path} disagree on data set {fingerprint[:12]} from entry {i + 1} "
                                        f"(round {have[i].server_round} of run {have[i].run_id} vs round {want[i].server_round} of run {want[i].run_id})")
            if len(want) > len(have):
                spent = f"{len(have)} round(s) (epsilon {have[-1].epsilon:.3g})" if have else "no round"
                what = "does not exist" if not self.path.exists() else "was restored from an older copy or rolled back"
                raise LedgerBehind(self.path, f"records {spent} on data set {fingerprint[:12]} where its journal {journal_path} records "
                                   f"{len(want)} (epsilon {want[-1].epsilon:.3g}): the ledger {what}", fix=REPAIR_COMMAND)

    # ------------------------------------------------------------------ writing
    def write(self, state: LedgerState) -> None:
        """Replace the ledger (MACed), then append the rounds the journal copies lack (fsynced)."""
        plant_id = self._check_owner(state.plant_id)
        if not self.key.exists():
            self.key.create()
        payload = state.model_dump(mode="json")
        payload["hmac"] = self.key.mac(_LEDGER, plant_id, _canonical(payload))
        payload["key_id"] = self.key.key_id(_LEDGER, plant_id)
        atomic_write_text(self.path, json.dumps(payload, indent=2, allow_nan=True) + "\n")
        self._catch_up_journals(state)

    def _catch_up_journals(self, state: LedgerState) -> None:
        existing = dict(self._journals(state.plant_id))
        for path in self.journal_paths:
            rounds = existing.get(path, {})
            missing = [
                JournalRecord(fingerprint=fp, task=ds.task, records=ds.records, entry=entry).model_dump(mode="json")
                for fp, ds in state.data_sets.items()
                for entry in ds.entries[len(rounds[fp].entries) if fp in rounds else 0:]
            ]
            if len(missing) > 1:  # more than this round: a new mirror, a migrated ledger, or a journal moved aside
                log.warning("privacy journal %s takes %d round(s) from the ledger %s", path, len(missing), self.path)
            missing.sort(key=lambda r: r["entry"]["recorded_at"])
            Journal(path, lambda data, pid=state.plant_id: self.key.mac(_JOURNAL, pid, data)).append(missing)

    @contextmanager
    def _lock(self, kind: int, required: bool = True) -> Iterator[None]:
        """The ledger's lock file; a reader without write access to the folder (inspecting a copy) reads unlocked."""
        try:
            if required:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(self.path.parent / f".{self.path.name}.lock", "a")  # noqa: SIM115 - held for the block
        except OSError:
            if required:
                raise
            yield
            return
        with lock:
            fcntl.flock(lock, kind)
            yield

    @contextmanager
    def _locked(self) -> Iterator[None]:
        assert self.plant_id is not None, "only a plant's own ledger (plant id known) can be written"
        with self._lock(fcntl.LOCK_EX):
            yield

    @contextmanager
    def transaction(self) -> Iterator[LedgerState]:
        """The verified ledger under an exclusive lock; written back atomically when the block succeeds
        (an old-format ledger is written keyed, with its journal)."""
        with self._locked():
            state = self._read()
            yield state
            self.write(state)

    def repair_from_journal(self) -> list[str]:
        """Rebuild the ledger from its journal copies and its own verified content, whichever holds more per
        data set: the result spends at least what each of them does. Returns one line per data set."""
        with self._locked():
            assert self.plant_id is not None
            journals = self._journals(self.plant_id)
            if not any(rounds for _, rounds in journals):
                raise ConfigError(f"there is no journal to repair privacy ledger {self.path} from (looked for "
                                  f"{', '.join(map(str, self.journal_paths))}); restore the ledger, its key and its journal from backup")
            try:
                current, _ = self._load()
                sources = [("ledger", current.data_sets)]
            except LedgerCorrupt as exc:
                log.warning("the ledger itself is not used in the repair: %s", exc)
                current, sources = None, []
            sources += [(f"journal {path}", rounds) for path, rounds in journals]
            repaired = LedgerState(plant_id=self.plant_id)
            lines = []
            for fingerprint in sorted({fp for _, data_sets in sources for fp in data_sets}):
                candidates = [(name, ds[fingerprint]) for name, ds in sources if fingerprint in ds]
                floor = min(e.delta for _, ds in candidates for e in ds.entries) if any(ds.entries for _, ds in candidates) else 0.5
                name, best = max(candidates, key=lambda c: (c[1].spent(floor), len(c[1].entries)))
                repaired.data_sets[fingerprint] = best
                before = current.data_sets[fingerprint] if current and fingerprint in current.data_sets else None
                was = f"{len(before.entries)} round(s), epsilon {before.spent(floor):.3g}" if before else "nothing"
                lines.append(f"data set {fingerprint[:12]}: {len(best.entries)} round(s), epsilon {best.spent(floor):.3g} "
                             f"at delta {floor:g} (from the {name}; the ledger held {was})")
            self._check_numbers(repaired)
            self.write(repaired)
            log.warning("privacy ledger %s rebuilt from its journal: %s", self.path, "; ".join(lines))
            return lines


def new_entry(mechanism: Mechanism, *, run_id: int, server_round: int, delta: float, max_grad_norm: float, epsilon_after: float) -> LedgerEntry:
    return LedgerEntry(run_id=run_id, server_round=server_round, delta=delta, max_grad_norm=max_grad_norm, epsilon=epsilon_after,
                       recorded_at=datetime.now(UTC), **mechanism.model_dump())
