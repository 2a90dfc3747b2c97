"""The FAB (Flower App Bundle) `flwr run APP_DIR` submits: built by Flower's own builder, from the files Flower collects.

Flower's `collect_files` walks the whole app folder before its filters drop what is not in the FAB. maxfl's app folder
is the repository, whose `.venv` alone holds tens of thousands of files: every build took seconds, and a local
federation built the FAB three times (the plants' allowlist, the change check before a run, `flwr run`). Here the walk
skips folders none of whose files can be in the FAB, so it gives Flower's builder the same candidates that matter and
the FAB is byte for byte the one `flwr run` builds from the folder; `stage_app` copies exactly those files into a small
folder for `flwr run` to build from.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from maxfl.atomic import fsync_dir
from maxfl.errors import ConfigError

_PROBE = "__maxfl_probe__/__maxfl_probe__"  # a path under a folder that only whole-folder patterns match
_WILDCARDS = set("*?[")


def _top_folders(include: list[str] | None) -> set[str] | None:
    """The top-level folders `fab-include` can reach; None when a pattern can match at any depth."""
    if include is None:
        return None
    tops: set[str] = set()
    for pattern in include:
        anchored = pattern.startswith("/") or "/" in pattern.rstrip("/")
        first = pattern.lstrip("/").split("/", 1)[0]
        if pattern.startswith("!") or not anchored or _WILDCARDS & set(first):
            return None
        tops.add(first)
    return tops


def collect_app_files(app: Path, config: dict[str, Any]) -> dict[str, Path]:
    """What Flower's `collect_files(app)` returns, less folders whose files its filters would all drop: a folder that a
    built-in, publish, user or .gitignore exclude takes whole (`.venv/**`, `__pycache__`), or a top-level folder
    outside every anchored `fab-include` pattern. Symlinks are skipped and never followed, as Flower does."""
    from flwr.cli.build import FAB_EXCLUDE_PATTERNS, get_user_fab_patterns
    from flwr.cli.utils import APP_PUBLISH_EXCLUDE_PATTERNS, build_pathspec, load_gitignore_patterns

    include, exclude = get_user_fab_patterns(config)
    patterns = [*FAB_EXCLUDE_PATTERNS, *APP_PUBLISH_EXCLUDE_PATTERNS, *(exclude or [])]
    gitignore = load_gitignore_patterns(app / ".gitignore")
    if not any(p.startswith("!") for p in [*patterns, *gitignore]):  # a negation could take back a file under the folder
        patterns += gitignore
    whole = build_pathspec(patterns)
    tops = _top_folders(include)
    root = app.resolve()
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(app, followlinks=False):
        rel = Path(dirpath).relative_to(app).as_posix()
        prefix = "" if rel == "." else f"{rel}/"
        dirnames[:] = [d for d in dirnames if not whole.match_file(f"{prefix}{d}/{_PROBE}")
                       and (tops is None or prefix or d in tops)]
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink() and path.resolve().is_relative_to(root):
                files[f"{prefix}{name}"] = path
    return files


def _app_config(app_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The app folder, resolved as `flwr run` resolves it, and its validated pyproject.toml."""
    from flwr.cli.config_utils import load_and_validate

    app = app_dir.expanduser().resolve()
    if not (app / "pyproject.toml").is_file():
        raise ConfigError(f"{app} is not a Flower app folder (no pyproject.toml); give the folder you pass to `flwr run`")
    try:
        return app, load_and_validate(app / "pyproject.toml", check_module=False)[0]
    except ValueError as exc:
        raise ConfigError(f"cannot build {app} into a FAB: {' '.join(str(exc).split())}") from None


def build_fab(app_dir: Path) -> tuple[bytes, str, str]:
    """The FAB `flwr run APP_DIR` submits, with its fab id and version: built by Flower's own builder."""
    from flwr.cli.build import build_fab_from_files
    from flwr.cli.utils import AppPathDepthError
    from flwr.common.config import get_metadata_from_config

    app, config = _app_config(app_dir)
    try:
        fab = build_fab_from_files(collect_app_files(app, config))[0]
    except (AppPathDepthError, ValueError) as exc:
        raise ConfigError(f"cannot build {app} into a FAB: {' '.join(str(exc).split())}") from None
    fab_id, fab_version = get_metadata_from_config(config)
    return fab, fab_id, fab_version


def fab_hash(app_dir: Path) -> str:
    """SHA-256 of the FAB that `flwr run APP_DIR` builds (Flower's `fab.hash_str`); of a `.fab` file, its bytes."""
    path = app_dir.expanduser()
    if path.is_file() and path.suffix == ".fab":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return hashlib.sha256(build_fab(path)[0]).hexdigest()


def stage_app(app_dir: Path, dest: Path) -> Path:
    """A copy of the files of `app_dir`'s FAB in `dest` (replaced whole), for `flwr run dest`: Flower walks only them,
    and builds the same FAB, so the hash the plants and the anchor allowed is the one submitted."""
    from flwr.cli.build import get_filtered_fab_paths
    from flwr.cli.utils import AppPathDepthError, filter_paths_for_publish

    app, config = _app_config(app_dir)
    files = collect_app_files(app, config)
    try:
        kept = get_filtered_fab_paths(filter_paths_for_publish(files), config)
    except (AppPathDepthError, ValueError) as exc:
        raise ConfigError(f"cannot build {app} into a FAB: {' '.join(str(exc).split())}") from None
    staging = dest.with_name(f".{dest.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    for rel in {*kept, "pyproject.toml", ".gitignore"} & files.keys():
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(files[rel], target)
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    fsync_dir(dest.parent)
    return dest
