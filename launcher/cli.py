"""`maxfl` command line: user errors end in one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from pydantic import ValidationError

from maxfl.errors import ConfigError, UserError, describe_validation_error

if TYPE_CHECKING:
    from tasks.base import Task

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated learning across manufacturing supply chains.")
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs, values as TOML scalars (numbers, true/false, quoted or bare strings)."""
    import tomllib

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"run config override {pair!r} is not key=value (e.g. --set num-server-rounds=5)")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw
    return out


@app.command()
def federate(
    plants: Annotated[int, typer.Option(help="Number of plant SuperNodes.")] = 3,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds (run config num-server-rounds).")] = None,
    task: Annotated[str | None, typer.Option(help="Task to train (run config task).")] = None,
    mode: Annotated[str, typer.Option(help="deployment (one SuperNode process per plant) or simulation.")] = "deployment",
    workdir: Annotated[Path, typer.Option(help="Plants' data, SuperLink state, MLflow store and logs.")] = Path(".maxfl"),
    set_: Annotated[list[str], typer.Option("--set", help="Run config override key=value (repeatable).")] = [],  # noqa: B006
    examples_per_plant: Annotated[int | None, typer.Option(help="Cap each plant's demo data (quick demos, tests).")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="Use this running MLflow server instead of starting one.")] = None,
    mlflow_backend: Annotated[str, typer.Option(help="Store of the MLflow server started here: sqlite (under --workdir) or "
                                                "postgresql (a local server under --workdir, or --backend-store-uri).")] = "sqlite",
    backend_store_uri: Annotated[str | None, typer.Option(help="Your PostgreSQL for that store: postgresql://USER[:PASSWORD]@HOST:PORT/DB "
                                                          "(with --mlflow-backend postgresql).")] = None,
    mlflow_port: Annotated[int | None, typer.Option(help="MLflow port (default: a free one).")] = None,
    superlink_port: Annotated[int | None, typer.Option(help="SuperLink port (default: a free one).")] = None,
    keep_mlflow: Annotated[bool, typer.Option(help="Keep MLflow running for browsing until Ctrl-C.")] = False,
    warm: Annotated[bool, typer.Option(help="Long-lived pre-imported ClientApp executors (process isolation).")] = True,
    max_epsilon: Annotated[float, typer.Option(help="Each demo plant's privacy ceiling (its node config max-epsilon).")] = 10.0,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS, no SuperNode authentication (default: both, with a fresh local CA).")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON here.")] = None,
    resume: Annotated[str | None, typer.Option(help="Resume this MLflow run after its last completed round (run config resume).")] = None,
    data: Annotated[list[str], typer.Option("--data", help="A plant's own data: PLANT_ID=DIR (repeatable; --plants then "
                                            "follows). Read, never written. Without it: demo data.")] = [],  # noqa: B006
    ray_address: Annotated[str | None, typer.Option(help="Simulation on this running Ray cluster (HOST:PORT of its GCS, "
                                                    "as `ray start --head` prints it) instead of a Ray of its own.")] = None,
    page: Annotated[bool, typer.Option(help="Serve the federation page (plants, runs, privacy, releases) on loopback while it runs.")] = True,
) -> None:
    """Start MLflow, a SuperLink and N plant SuperNodes on 127.0.0.1, train, and stop them all."""
    from launcher.federation import FederationSettings, LocalFederation, find_app_dir

    overrides = _parse_overrides(set_)
    if rounds is not None:
        overrides["num-server-rounds"] = rounds
    if task is not None:
        overrides["task"] = task
    if resume is not None:
        overrides["resume"] = resume
    try:
        settings = FederationSettings(
            app_dir=find_app_dir(), workdir=workdir, mode=mode, plants=len(data) if data else plants, run_overrides=overrides,  # type: ignore[arg-type]
            examples_per_plant=examples_per_plant, mlflow_port=mlflow_port, superlink_port=superlink_port,
            keep_mlflow=keep_mlflow, warm=warm, tracking_uri=tracking_uri, max_epsilon=max_epsilon, insecure=insecure,
            mlflow_backend=mlflow_backend, backend_store_uri=backend_store_uri,  # type: ignore[arg-type]
            data=_parse_data(data), ray_address=ray_address, page=page,
        )
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, "options")) from None
    result = LocalFederation(settings, echo=console.print).run()
    console.print(f"[green]done[/green]: Flower run {result.flwr_run_id} {result.status}")
    console.print(f"MLflow run id: {result.mlflow_run_id}")
    console.print(f"MLflow URL:    {result.mlflow_url}")
    for line in result.privacy:
        console.print(f"privacy ledger {line}")
    for line in result.release:
        console.print(line)
    if result.plants:
        console.print(_plants_table(result.plants))
    if json_out is not None:
        from maxfl.atomic import atomic_write_text

        atomic_write_text(json_out, json.dumps(result.__dict__, indent=2))
    if result.gate == "failed":
        from maxfl.errors import GateFailed

        raise GateFailed(f"the model did not pass the gate, so nothing new was released ({result.gate_summary}); see {result.mlflow_url}")


def _plants_table(rows: list[dict]) -> Table:
    """Per plant: this run's model scored on its held-out split, the epsilon spent, what its edge serves."""
    from launcher.federation import HEADLINE_METRICS

    metrics = [m for m in HEADLINE_METRICS if any(m in r for r in rows)]
    table = Table("plant", *(m.removeprefix("eval_") for m in metrics), "epsilon (run / lifetime)", "edge serves", box=box.SIMPLE,
                  title="this run's model at each plant (held-out split)")
    for r in rows:
        eps = " / ".join("-" if r.get(k) is None else f"{r[k]:.2f}" for k in ("epsilon_run", "epsilon_lifetime"))
        served = re.sub(r"^\S+ (?=v\d)", "", r.get("served") or "-")  # "v2 (personalised)": the model's name is in the lines above
        table.add_row(r["plant"], *("-" if m not in r else f"{r[m]:.3f}" for m in metrics), eps, served)
    return table


def _parse_data(items: list[str]) -> dict[str, Path]:
    """`--data PLANT=DIR` items: each plant once, each folder an existing directory."""
    found: dict[str, Path] = {}
    for item in items:
        plant, sep, folder = item.partition("=")
        if not sep or not plant or not folder:
            raise ConfigError(f"--data {item!r}: give PLANT_ID=DIR, e.g. --data plant-a=/srv/data/plant-a")
        if plant in found:
            raise ConfigError(f"--data: plant {plant!r} is given twice; give each plant once")
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise ConfigError(f"--data {plant}={folder}: no such folder; give the folder with the plant's manifest.toml and data")
        found[plant] = path
    return found


def _task(name: str) -> Task:
    from tasks import get_task, task_names

    if name not in task_names():
        raise ConfigError(f"unknown task {name!r}; choose one of: {', '.join(task_names())}")
    return get_task(name)


@app.command("prepare-data")
def prepare_data(
    out: Annotated[Path, typer.Option(help="Folder that receives plant-1, plant-2, ...")],
    plants: Annotated[int, typer.Option(min=1, help="Number of plants.")] = 3,
    task: Annotated[str, typer.Option(help="Task whose public data set is split.")] = "defect",
    seed: Annotated[int, typer.Option(help="Split seed.")] = 42,
    examples_per_plant: Annotated[int | None, typer.Option(help="Subsample each plant.")] = None,
) -> None:
    """Split a task's public data set into per-plant folders (a demo of plants' private data)."""
    try:
        dirs = _task(task).prepare_plants(plants, out, seed, examples_per_plant)
    except ValueError as exc:  # e.g. more plants than the data set has modules
        raise ConfigError(f"cannot split {task} data: {exc}") from None
    for d in dirs:
        console.print(str(d))


@app.command("check-data")
def check_data(
    data_dir: Annotated[Path, typer.Option(help="The plant's data folder (its SuperNode's data-dir).")],
    task: Annotated[str, typer.Option(help="Task the plant will train.")] = "defect",
    seed: Annotated[int, typer.Option(help="Run seed (fixes the held-out split).")] = 42,
) -> None:
    """Plant side: validate the data and show what the plant would tell the anchor (schema and statistics, no rows)."""
    profile = _task(task).profile(data_dir, seed)
    console.print(profile.model_dump_json(by_alias=True, indent=2))
    counts = profile.label_counts_or_none()
    if counts is not None and (absent := sorted(label for label, n in counts.items() if n == 0)):
        err_console.print(f"[yellow]warning:[/yellow] no training examples of {', '.join(absent)} in {data_dir}: this plant can join, "
                          "but learns those classes only from the other plants and cannot score them")
    if counts is not None and sum(1 for n in counts.values() if n > 0) < 2:
        present = [label for label, n in counts.items() if n > 0]
        err_console.print(f"[yellow]warning:[/yellow] one class only ({', '.join(present) or 'none'}) among the training examples: a model "
                          "trained here alone cannot tell classes apart; the federation needs other plants with the other classes")
    console.print(f"[green]ok[/green]: {profile.examples} training examples for task {task} in {data_dir}")


PERSONALISATION_NOTE = ("personalisation at this plant (fine-tuning an approved model, training a local-only one) spends no epsilon: "
                        "what it trains never leaves the plant, so it is not in this ledger")


@app.command()
def ledger(
    node_config: Annotated[str | None, typer.Option(help="The plant SuperNode's --node-config string (plant id, ceiling, delta, ledger).")] = None,
    path: Annotated[Path | None, typer.Option("--ledger", help="A ledger file to inspect (no ceiling known).")] = None,
    key: Annotated[Path | None, typer.Option("--ledger-key", help="With --ledger: its key file (default <ledger>.key).")] = None,
    repair_from_journal: Annotated[bool, typer.Option("--repair-from-journal", help="Rebuild the ledger from its journal (needs --node-config); never lowers a spend.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Plant side: what this plant has spent, per data set and run, against its ceiling."""
    from rich import box
    from rich.table import Table

    from privacy.ledger import Ledger
    from privacy.report import spending

    if node_config is not None:
        from fl_client.config import PlantConfig

        plant = PlantConfig.from_node_config(node_config)
        book = plant.privacy().ledger if path is None else Ledger(path, plant.plant_id, key=key or plant.ledger_key, mirror=plant.ledger_mirror)
        delta, ceiling = plant.delta, plant.max_epsilon
    elif path is not None:
        from fl_client.config import PlantConfig

        book, delta, ceiling = Ledger(path, None, key=key), PlantConfig.model_fields["delta"].default, None
    else:
        raise ConfigError("say whose ledger: --node-config '<the SuperNode's node config>' or --ledger PATH")
    if repair_from_journal:
        if node_config is None:
            raise ConfigError("--repair-from-journal rewrites a plant's own ledger: give --node-config '<the SuperNode's node config>'")
        for line in book.repair_from_journal():
            console.print(line)
        console.print(f"[green]repaired[/green]: {book.path} holds every round its journal does")
    state = book.read()
    spends = spending(state, delta, ceiling)
    if json_:
        console.print_json(json.dumps({"plant-id": state.plant_id, "ledger": str(book.path),
                                       "data-sets": [s.model_dump(mode="json") for s in spends],
                                       "personalisation-epsilon": 0.0}))
        return
    console.print(f"privacy ledger of {state.plant_id}: {book.path} (accountant: {state.accountant}, delta {delta:g})")
    if not spends:
        console.print("no DP training recorded yet")
        console.print(PERSONALISATION_NOTE)
        return
    table = Table("data set", "task", "runs", "rounds", "epsilon", "ceiling", "left", "last used", box=box.SIMPLE)
    for s in spends:
        table.add_row(s.fingerprint[:12], s.task, str(len(s.runs)), str(s.rounds), f"{s.epsilon:.3f}",
                      "-" if s.max_epsilon is None else f"{s.max_epsilon:g}", "-" if s.remaining is None else f"{s.remaining:.3f}",
                      s.last_used.strftime("%Y-%m-%d") if s.last_used else "-")
    console.print(table)
    runs = Table("data set", "Flower run", "rounds", "epsilon of the run alone", box=box.SIMPLE)
    for s in spends:
        for r in s.runs:
            runs.add_row(s.fingerprint[:12], str(r.run_id), str(r.rounds), f"{r.epsilon:.3f}")
    console.print(runs)
    console.print("epsilon spent composes every round of every run (RDP); per-run values do not add up to it")
    console.print(PERSONALISATION_NOTE)


@app.command()
def audit(
    path: Annotated[Path, typer.Argument(help="An audit log: the anchor's (run config audit-log, or <federation dir>/audit.jsonl) or a plant's.")],
    event: Annotated[str | None, typer.Option(help="Only events whose name starts with this (e.g. plant., update., model.).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the events as JSON lines.")] = False,
) -> None:
    """Verify an audit log's hash chain and show its events; a broken chain is an error (exit 2)."""
    from rich import box
    from rich.table import Table

    from maxfl.audit import AuditLog

    if not path.is_file():
        raise ConfigError(f"no audit log at {path}")
    events = [e for e in AuditLog(path).events() if event is None or e.event.startswith(event)]  # raises on a broken chain
    if json_:
        for e in events:
            console.print(e.model_dump_json(), highlight=False)
        return
    table = Table("#", "time (UTC)", "event", "actor", "details", box=box.SIMPLE)
    for e in events:
        table.add_row(str(e.seq), e.ts[:19].replace("T", " "), e.event, e.actor, " ".join(f"{k}={v}" for k, v in e.details.items()))
    console.print(table)
    console.print(f"{path}: chain verified, {len(events)} event(s) shown")


@app.command()
def contributions(
    run_id: Annotated[str, typer.Argument(help="The training run's MLflow run id (`maxfl federate` prints it).")],
    tracking_uri: Annotated[str, typer.Option("--tracking-uri", help="The anchor's MLflow server (default: $MLFLOW_TRACKING_URI).")] = "",
    json_: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Anchor side: what each plant's data bought in a training run (Shapley values, leave-one-out, share of the credit)."""
    from fl_server.run.contribution_view import footer, load_report, table, why_missing
    from fl_server.run.tracking import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    report = load_report(uri, run_id)
    if report is None:
        raise ConfigError(f"run {run_id} has no contribution report: {why_missing(uri, run_id)}")
    if json_:
        console.print_json(report.model_dump_json())
        return
    console.print(table(report))
    for line in footer(report):
        console.print(line)


def _add_role_commands() -> None:
    """`maxfl model|federation ...` (anchor) and `maxfl edge|plant ...` (plant): each role's commands live with its package."""
    from edge.cli import app as edge_app
    from fl_client.app_cli import app as app_app
    from fl_client.plant_cli import app as plant_app
    from fl_server.release.model_cli import app as model_app
    from fl_server.federation.provision_cli import app as federation_app

    app.add_typer(model_app, name="model")
    app.add_typer(edge_app, name="edge")
    app.add_typer(federation_app, name="federation")
    app.add_typer(plant_app, name="plant")
    app.add_typer(app_app, name="app")


_add_role_commands()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("maxfl.progress").setLevel(logging.INFO)  # long work says how far it got (maxfl.progress)
    # Ctrl-C and SIGTERM both unwind through the launcher's cleanup, so every started process is stopped.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: signal.default_int_handler(signal.SIGINT, None))
    try:
        # Not standalone: click turns Ctrl-C into exit code 130 and usage errors into ClickException.
        code = app(standalone_mode=False)
    except UserError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        code = 130
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    if code == 130:
        err_console.print("interrupted: every process maxfl started has been stopped")
    sys.exit(code if isinstance(code, int) else 0)
