"""Where a result came from: the git commit it ran at, and whether the tree had changes on top of it."""

from __future__ import annotations

import subprocess
from pathlib import Path

HERE = Path(__file__).parent


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=HERE).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""


def git_commit() -> str:
    """HEAD here; empty outside a git checkout (a copy of the tree: pass the commit by hand)."""
    return _git("rev-parse", "HEAD").strip()


def provenance() -> dict[str, object]:
    """`commit` and `modified`: tracked files that differ from it, results aside (a result from an uncommitted
    tree says so)."""
    changed = [line[3:] for line in _git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": git_commit(), "modified": sorted(p for p in changed if not p.startswith("experiments/results/"))}


def write_result(path: Path, fields: dict[str, object], commit: str = "") -> None:
    """A benchmark's JSON: its provenance, the command that ran it (this script and its arguments), when, and `fields`.
    `commit`: the commit a copy of the tree without .git was made from."""
    import json
    import sys
    import time

    from maxfl.atomic import atomic_write_text

    out = {**provenance(), "command": " ".join(["python", f"experiments/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
    if commit:
        out["commit"] = commit
    atomic_write_text(path, json.dumps(out, indent=2))
    print(f"results: {path}")
