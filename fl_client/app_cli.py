"""`maxfl app ...`: what a plant needs to decide which apps run on its node (fl_client.app_policy)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Plant side: the apps a plant allows on its node.")


@app.callback()
def _group() -> None:
    """Plant side: the apps a plant allows on its node (node config `allowed-apps`)."""


@app.command("hash")
def hash_(
    app_dir: Annotated[Path, typer.Argument(help="The Flower app folder given to `flwr run` (or a built .fab file).")] = Path("."),
    json_: Annotated[bool, typer.Option("--json", help="Print the hash, fab id and version as JSON.")] = False,
) -> None:
    """Print the SHA-256 hash `flwr run APP_DIR` gives this app's FAB: the value for the node config's allowed-apps.

    The FAB holds the folder's files as they are now (Flower's include rules, minus .gitignore'd ones), so
    any edit changes the hash: hash the exact version you reviewed, e.g. a clean checkout of a release tag.
    """
    from maxfl.fab import build_fab

    path = app_dir.expanduser()
    if path.is_file() and path.suffix == ".fab":
        fab, fab_id, fab_version = path.read_bytes(), "", ""
    else:
        fab, fab_id, fab_version = build_fab(path)
    digest = hashlib.sha256(fab).hexdigest()
    if json_:
        typer.echo(json.dumps({"fab-hash": digest, "fab-id": fab_id, "fab-version": fab_version}))
    else:
        typer.echo(digest)
