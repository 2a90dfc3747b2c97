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
