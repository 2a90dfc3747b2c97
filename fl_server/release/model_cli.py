"""`maxfl model ...`: the anchor's view of its registered models, their gate results and where they are deployed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from fl_server.release.registry import CANDIDATE, CHAMPION, EdgeRecord, Registry, RegistryError
from maxfl.errors import ProcessError

app = typer.Typer(no_args_is_help=True, help="Anchor side: registered model versions, the gate, pushes to the plants.")
console = Console(highlight=False, soft_wrap=True)

TrackingUri = Annotated[str, typer.Option("--tracking-uri", help="The anchor's MLflow server (default: $MLFLOW_TRACKING_URI).")]
ModelName = Annotated[str, typer.Option("--model", "-m", help="Registered model name, e.g. maxfl-defect.")]


def _registry(tracking_uri: str, model: str) -> Registry:
    from fl_server.run.tracking import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    return Registry(uri, model)


@app.command("list")
def list_versions(model: ModelName = "maxfl-defect", tracking_uri: TrackingUri = "", json_: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every version with its aliases, gate result and lineage."""
    registry = _registry(tracking_uri, model)
    versions = registry.versions()
    if json_:
        console.print_json(json.dumps([v.model_dump(mode="json") for v in versions]))
        return
    table = Table("version", "aliases", "gate", "summary", "run", "plants", "created", box=box.SIMPLE)
    for v in versions:
        table.add_row(str(v.version), ",".join(v.aliases) or "-", v.gate, v.gate_summary, v.tags.get("flwr.run_id", "-"),
                      v.tags.get("maxfl.plants", "-"), v.created.strftime("%Y-%m-%d %H:%M"))
    console.print(f"registered model {model}")
    console.print(table)


@app.command()
def promote(version: Annotated[int, typer.Argument(help="The version that becomes champion.")], model: ModelName = "maxfl-defect",
            tracking_uri: TrackingUri = "") -> None:
    """Make a version the champion by hand, whatever its gate said (recorded on the version). Push it with `push`."""
    left = _registry(tracking_uri, model).promote(version)
    console.print(f"{model}: {CHAMPION} v{left if left else '-'} -> v{version}; run `maxfl model push` to deploy it")


@app.command()
def demote(model: ModelName = "maxfl-defect", tracking_uri: TrackingUri = "") -> None:
    """The champion steps down and the one before it returns. Push it with `push`."""
    old, new = _registry(tracking_uri, model).demote()
    console.print(f"{model}: {CHAMPION} v{old} -> {'v' + str(new) if new else 'none'}; run `maxfl model push` to deploy it")


@app.command()
def status(model: ModelName = "maxfl-defect", tracking_uri: TrackingUri = "", json_: Annotated[bool, typer.Option("--json")] = False,
           version: Annotated[int, typer.Option(help="Whose contribution per plant to show (0: the champion's).")] = 0) -> None:
    """Per plant: the version pushed, whether it is installed, pending or refused, and what its edge store serves; and
    what each plant's data bought in the run that trained the version."""
    from fl_server.run.contribution_view import footer, load_report, table as contribution_table

    registry = _registry(tracking_uri, model)
    champion, candidate, edge = registry.champion(), registry.alias(CANDIDATE), registry.edge()
    shown = registry.version(version) if version else champion
    report = load_report(registry.tracking_uri, shown.run_id) if shown is not None and shown.run_id else None
    if json_:
        console.print_json(json.dumps({"model": model, "champion": champion.version if champion else None,
                                       "candidate": candidate.version if candidate else None,
                                       "plants": [r.model_dump(mode="json") for r in edge.values()],
                                       "contributions": None if shown is None else {
                                           "version": shown.version, "run_id": shown.run_id,
                                           "report": report.model_dump(mode="json") if report is not None else None}}))
        return
    console.print(f"{model}: {CHAMPION} {'v' + str(champion.version) if champion else 'none'}, "
                  f"{CANDIDATE} {'v' + str(candidate.version) if candidate else 'none'}")
    table = Table("plant", "pushed", "status", "serving", "when", "detail", box=box.SIMPLE)
    for r in edge.values():
        behind = champion is not None and r.serving != champion.version
        table.add_row(r.plant, f"v{r.version}", r.status, "-" if r.serving is None else f"v{r.serving}" + (" (not the champion)" if behind else ""),
                      r.at.strftime("%Y-%m-%d %H:%M:%S"), r.detail)
    console.print(table if edge else "no push recorded yet")
    if shown is not None:
        if report is None:
            console.print(f"v{shown.version}: no contribution report in its run {shown.run_id}")
        else:
            console.print(contribution_table(report, title=f"v{shown.version}: contribution per plant to {report.metric} ({report.method})"))
            for line in footer(report):
                console.print(line)


def push_overrides(version: int, plants: list[str], wait_s: float, tracking_uri: str, model: str) -> dict[str, object]:
    return {"action": "push", "push-version": version, "push-plants": ",".join(plants), "push-wait-s": wait_s,
            "tracking-uri": tracking_uri, "registered-model": model}


@app.command()
def push(
    version: Annotated[int, typer.Option(help="Version to push (0: the champion).")] = 0,
    plant: Annotated[list[str], typer.Option("--plant", help="Push to this plant only (repeatable); default: every plant.")] = [],  # noqa: B006
    wait: Annotated[float, typer.Option(help="Seconds to wait for offline plants before leaving them pending.")] = 0.0,
    federation: Annotated[str, typer.Option(help="The SuperLink connection in $FLWR_HOME/config.toml.")] = "",
    app_dir: Annotated[Path | None, typer.Option(help="The maxfl Flower app (default: this project).")] = None,
    model: ModelName = "maxfl-defect",
    tracking_uri: TrackingUri = "",
) -> None:
    """Push a version to the plants' edge stores through the federation (a Flower run of the maxfl app)."""
    from launcher.federation import find_app_dir
    from maxfl.fab import stage_app

    registry = _registry(tracking_uri, model)
    champion = registry.champion()
    if not version and champion is None:
        raise RegistryError(f"'{model}' has no champion to push; name one with --version")
    registry.load_release(version or champion.version)  # type: ignore[union-attr]  # fails here, not in the ServerApp
    overrides = push_overrides(version, plant, wait, registry.tracking_uri, model)
    with tempfile.TemporaryDirectory(prefix="maxfl-push-") as tmp:
        # The FAB's files only: Flower's build walks every file it is given (a checkout's .venv: ~9 s a push).
        staged = stage_app(app_dir or find_app_dir(), Path(tmp) / "app")
        run_config = Path(tmp) / "run-config.toml"
        run_config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in overrides.items()))
        argv = [str(Path(sys.executable).parent / "flwr"), "run", str(staged), *([federation] if federation else []),
                "--stream", "--run-config", str(run_config)]
        code = subprocess.run(argv, env=os.environ.copy(), check=False).returncode
    if code != 0:
        raise ProcessError(f"`flwr run` exited with code {code}; is the SuperLink in '{federation or 'the default connection'}' up?")
    _print_records(list(registry.edge().values()))


def _print_records(records: list[EdgeRecord]) -> None:
    for r in records:
        console.print(f"{r.plant}: v{r.version} {r.status}" + (f" ({r.detail})" if r.detail and r.status != "installed" else ""))
