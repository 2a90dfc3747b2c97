"""Append-only audit log: one JSON object per line, each chained to the one before by its SHA-256.

The anchor records who joined or was revoked, which runs ran, which updates were rejected and which model
version went where; a plant records the apps it refused. The chain makes an edited or deleted line visible
(`verify`), and every append holds an exclusive lock, so concurrent writers (the ServerApp, the CLI) interleave
whole lines only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from maxfl.errors import UserError

GENESIS = "0" * 64


class AuditError(UserError):
    """The audit log cannot be read, or its chain is broken."""


class AuditEvent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: int = Field(ge=1)
    ts: str  # ISO 8601, UTC
    event: str = Field(pattern=r"^[a-z][a-z0-9_.-]*$")  # e.g. plant.joined, update.rejected, run.started
    actor: str  # who did it: "anchor", a plant id, a command
    details: dict[str, Any] = Field(default_factory=dict)
    prev: str  # hash of the line before (GENESIS for the first)
    hash: str  # sha256 over this event without `hash`

    @staticmethod
    def digest(fields: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, event: str, actor: str, **details: Any) -> AuditEvent:
        """Append one event (O_APPEND, under an exclusive lock, fsynced) and return it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            last = _last_line(fd)
            prev, seq = (GENESIS, 0) if last is None else (last.hash, last.seq)
            fields = {"seq": seq + 1, "ts": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event,
                      "actor": actor, "details": json.loads(json.dumps(details, default=str)), "prev": prev}
            entry = AuditEvent(**fields, hash=AuditEvent.digest(fields))
            os.write(fd, (entry.model_dump_json() + "\n").encode())
            os.fsync(fd)
            return entry
        finally:
            os.close(fd)

    def events(self) -> Iterator[AuditEvent]:
        """Every event, checking the chain as it goes: a line edited, removed or reordered is an AuditError."""
        if not self.path.exists():
            return
        prev, seq = GENESIS, 0
        with open(self.path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                entry = _parse(line, f"{self.path}:{number}")
                fields = entry.model_dump(exclude={"hash"})
                if entry.prev != prev or entry.seq != seq + 1 or AuditEvent.digest(fields) != entry.hash:
                    raise AuditError(f"{self.path}:{number}: the audit chain is broken here (a line was edited, removed or reordered); "
                                     "keep this file as evidence and start a new log")
                prev, seq = entry.hash, entry.seq
                yield entry

    def verify(self) -> int:
        """Number of events, once the whole chain checked out."""
        return sum(1 for _ in self.events())


def _parse(line: str, where: str) -> AuditEvent:
    try:
        return AuditEvent.model_validate_json(line)
    except ValueError:
        raise AuditError(f"{where}: not an audit event (truncated or edited); keep this file as evidence and start a new log") from None


def _last_line(fd: int) -> AuditEvent | None:
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0:
        return None
    block = min(size, 65_536)
    while True:
        data = os.pread(fd, block, size - block)
        lines = data.rstrip(b"\n").split(b"\n")
        if len(lines) > 1 or block == size:
            return _parse(lines[-1].decode(), "last line of the audit log")
        block = min(size, block * 4)
