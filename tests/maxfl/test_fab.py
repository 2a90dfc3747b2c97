"""maxfl.fab builds the FAB `flwr run` builds, byte for byte, without walking folders none of whose files are in it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from maxfl.errors import ConfigError
from maxfl.fab import build_fab, collect_app_files, fab_hash, stage_app
from tests.fl_client.test_app_policy import make_app


def _app(root: Path, include: str | None, gitignore: str = "") -> Path:
    """A Flower app (tests/fl_client/test_app_policy.make_app) in a folder with what a repository also holds: a .venv,
    caches, tests, docs, git-ignored data, a symlink."""
    app = make_app(root, "pkg")
    if include:
        pyproject = app / "pyproject.toml"
        pyproject.write_text(pyproject.read_text().replace('publisher = "acme"\n', f'publisher = "acme"\nfab-include = {include}\n'))
    for rel in ("pkg/sub/util.py", "pkg/sub/schema.json", "README.md", "tests/test_pkg.py", "docs/guide.md", "data/plant-1/manifest.toml",
                "data/plant-1/ledger.json", ".venv/lib/python3.11/site-packages/torch/__init__.py", ".venv/pyvenv.toml",
                "pkg/__pycache__/server.cpython-311.pyc", "build/lib/pkg/server.py", "notes/keep.md"):
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(f"# {rel}\n")
    (app / ".gitignore").write_text(gitignore)
    os.symlink(app / "pkg" / "server_app.py", app / "pkg" / "linked.py")  # Flower skips symlinks; so do we
    return app


@pytest.mark.parametrize("include, gitignore", [
    ('["pkg/**/*.py", "/README.md"]', "/data/\n.venv/\n"),  # anchored includes: other top-level folders are not walked
    (None, "/data/\n"),                                       # no fab-include: every folder but the excluded ones
    ('["**/*.py", "README.md"]', "notes/\n!notes/keep.md\n"),  # a negation in .gitignore: gitignore is not used to skip
])
def test_the_fab_is_byte_for_byte_the_one_flower_builds_from_the_folder(tmp_path, include, gitignore):
    app = _app(tmp_path, include, gitignore)
    flower = build_fab_from_disk(app)
    assert build_fab(app)[0] == flower
    assert fab_hash(app) == hashlib.sha256(flower).hexdigest()
    staged = stage_app(app, tmp_path / "work" / "app")
    assert build_fab_from_disk(staged) == flower  # what `flwr run STAGED` submits is what the plants allowed
    assert not any(p.startswith(".venv/") for p in collect_app_files(app, {}))  # the walk never entered it


def test_anchored_includes_keep_the_walk_to_their_folders(tmp_path):
    app = _app(tmp_path, '["pkg/**/*.py", "/README.md"]', "")
    config = {"tool": {"flwr": {"app": {"fab-include": ["pkg/**/*.py", "/README.md"]}}}}
    walked = collect_app_files(app, config)
    assert {p.split("/")[0] for p in walked if "/" in p} == {"pkg"}


def test_staging_replaces_what_an_earlier_run_staged(tmp_path):
    app = _app(tmp_path, '["pkg/**/*.py", "/README.md"]', "")
    dest = stage_app(app, tmp_path / "work" / "app")
    (app / "pkg" / "sub" / "util.py").unlink()
    stage_app(app, dest)
    assert not (dest / "pkg" / "sub" / "util.py").exists() and build_fab_from_disk(dest) == build_fab_from_disk(app)


def test_a_folder_that_is_no_app_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no pyproject.toml"):
        stage_app(tmp_path, tmp_path / "work" / "app")
