"""Where maxfl keeps what it can always recompute (simulated recordings, image features): never in a plant's data folder."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$MAXFL_CACHE_DIR, else $XDG_CACHE_HOME/maxfl, else ~/.cache/maxfl."""
    root = os.environ.get("MAXFL_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "maxfl")
    return Path(root)
