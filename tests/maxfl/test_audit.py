"""The append-only audit log: a hash chain that shows any edit, and whole lines under concurrent writers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from maxfl.audit import GENESIS, AuditError, AuditLog

MAXFL = str(Path(sys.executable).parent / "maxfl")


def _filled(path: Path, n: int = 4) -> AuditLog:
    log = AuditLog(path)
    for i in range(n):
        log.record("plant.joined", "anchor", plant=f"plant-{i}", node_id=i)
    return log


def test_events_chain_to_each_other_and_verify(tmp_path):
    log = _filled(tmp_path / "audit.jsonl")
    events = list(log.events())
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert events[0].prev == GENESIS and all(b.prev == a.hash for a, b in zip(events, events[1:], strict=False))
    assert events[2].details == {"plant": "plant-2", "node_id": 2}
    assert log.verify() == 4


@pytest.mark.parametrize("tamper", ["edit", "delete", "swap"])
def test_an_edited_removed_or_reordered_line_breaks_the_chain(tmp_path, tamper):
    path = tmp_path / "audit.jsonl"
    _filled(path)
    lines = path.read_text().splitlines()
    if tamper == "edit":
        lines[1] = lines[1].replace("plant-1", "plant-9")
    elif tamper == "delete":
        del lines[1]
    else:
        lines[1], lines[2] = lines[2], lines[1]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AuditError, match=r"audit.jsonl:2: the audit chain is broken"):
        AuditLog(path).verify()


def test_a_truncated_line_is_named_and_new_events_are_refused_after_it(tmp_path):
    path = tmp_path / "audit.jsonl"
    _filled(path, 2)
    path.write_text(path.read_text()[:-20])
    with pytest.raises(AuditError, match="not an audit event"):
        AuditLog(path).verify()
    with pytest.raises(AuditError, match="not an audit event"):
        AuditLog(path).record("run.started", "anchor")


_APPEND_MANY = "import sys; from pathlib import Path; from maxfl.audit import AuditLog; log = AuditLog(Path(sys.argv[1]))\n" \
               "for i in range(25): log.record('update.rejected', sys.argv[2], round=i)"


def test_concurrent_writers_interleave_whole_lines_and_keep_the_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    # Plain processes, not multiprocessing's: its spawn context leaves a resource tracker running for the rest of the worker.
    procs = [subprocess.Popen([sys.executable, "-c", _APPEND_MANY, str(path), f"writer-{i}"]) for i in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    assert AuditLog(path).verify() == 100
    assert {json.loads(line)["actor"] for line in path.read_text().splitlines()} == {f"writer-{i}" for i in range(4)}


def test_the_cli_shows_a_verified_log_and_reports_a_broken_one_in_one_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    _filled(path, 3)
    ok = subprocess.run([MAXFL, "audit", str(path), "--event", "plant."], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "chain verified, 3 event(s)" in ok.stdout
    path.write_text(path.read_text().replace("plant-0", "plant-7"))
    bad = subprocess.run([MAXFL, "audit", str(path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "audit chain is broken" in bad.stderr and "Traceback" not in bad.stderr
