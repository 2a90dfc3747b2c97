"""An append-only JSON-lines file whose lines are HMAC-chained: the ledger's second copy, one line per round.

Each line holds a record, its sequence number and the MAC of the line before it, and is MACed itself, so a
line cannot be removed, reordered or edited without breaking the chain from there on; a copy of the file
with its last lines cut off still verifies, which is why the ledger compares its own spend with it (a
journal that records more than the ledger means the ledger was deleted or rolled back). Appends are fsynced.
A last line without its newline is a write the process did not finish (killed mid-append): it is ignored,
and the next append replaces it.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from maxfl.atomic import fsync_dir

Mac = Callable[[bytes], str]


class JournalBroken(Exception):
    """The journal's chain does not verify: `str(exc)` says which line and why."""


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


class Journal:
    """One journal file. `read()` verifies it; `append()` adds records after what `read()` found."""

    def __init__(self, path: Path, mac: Mac) -> None:
        self.path = path
        self._mac = mac

    def exists(self) -> bool:
        return self.path.exists()

    def _scan(self) -> tuple[list[dict[str, Any]], str, int]:
        """The verified records, the last line's MAC and the byte length of the complete lines."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return [], "", 0
        except OSError as exc:
            raise JournalBroken(f"is not readable ({exc.strerror})") from None
        records: list[dict[str, Any]] = []
        prev, good = "", 0
        for number, line in enumerate(data.splitlines(keepends=True), start=1):
            if not line.endswith(b"\n"):
                break  # a torn last line: that append never completed
            try:
                item = json.loads(line)
                seq, line_prev, record, mac = item["seq"], item["prev"], item["record"], item["mac"]
            except (ValueError, TypeError, KeyError):
                raise JournalBroken(f"line {number} is not a journal line") from None
            if seq != number or line_prev != prev or not isinstance(mac, str) or not isinstance(record, dict):
                raise JournalBroken(f"line {number} does not follow line {number - 1} (a line was removed, reordered or edited)")
            if not hmac.compare_digest(mac, self._mac(_canonical({"seq": seq, "prev": line_prev, "record": record}))):
                raise JournalBroken(f"line {number} was changed outside maxfl or written with another key")
            records.append(record)
            prev, good = mac, good + len(line)
        return records, prev, good

    def read(self) -> list[dict[str, Any]]:
        return self._scan()[0]

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Add `records` after the verified lines (a torn last line is dropped first), then fsync."""
        if not records:
            return
        existed = self.exists()
        done, prev, good = self._scan()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+b") as fh:
            fh.truncate(good)
            fh.seek(good)
            seq = len(done)
            for record in records:
                seq += 1
                mac = self._mac(_canonical({"seq": seq, "prev": prev, "record": record}))
                fh.write(json.dumps({"seq": seq, "prev": prev, "record": record, "mac": mac}, sort_keys=True, allow_nan=True).encode() + b"\n")
                prev = mac
            fh.flush()
            os.fsync(fh.fileno())
        if not existed:
            fsync_dir(self.path.parent)
