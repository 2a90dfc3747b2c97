"""Where maxfl keeps what it can always recompute (simulated recordings, image features): never in a plant's data folder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    """$MAXFL_CACHE_DIR, else $XDG_CACHE_HOME/maxfl, else ~/.cache/maxfl."""
    root = os.environ.get("MAXFL_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "maxfl")
    return Path(root)


def folder_digest(folder: Path) -> str:
    """Every file's path, size and modification time below `folder`: it changes when anyone edits, adds or removes one."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()
