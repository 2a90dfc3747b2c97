"""`maxfl edge ...`: the plant's edge model store and inference server, from the plant's own node config."""

from __future__ import annotations

import json
import logging
import signal
import sys
from typing import Annotated

import click
import typer
from rich.console import Console

from fl_client.config import PlantConfig
from maxfl.errors import ConfigError, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Plant side: the edge model store and server.")
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

NodeConfig = Annotated[str, typer.Option(help="The plant SuperNode's --node-config string (plant-id, data-dir, edge-store).")]
ModelName = Annotated[str | None, typer.Option("--model", help="Registered model name, e.g. maxfl-defect (default: the store's only one).")]


def _store(plant: PlantConfig):  # noqa: ANN202 - EdgeStore, imported lazily
    from edge.store import EdgeStore

    return EdgeStore(plant.edge_store_path())


@app.command()
def serve(
    node_config: NodeConfig,
    model: ModelName = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8600,
    threads: Annotated[int, typer.Option(help="onnxruntime intra-op threads per inference.")] = 1,
    max_batch: Annotated[int, typer.Option(help="Most instances in one request (more: 413).")] = 64,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body in MB (more: 413).")] = 8.0,
    max_image_pixels: Annotated[int, typer.Option(help="Largest image, width x height, read from its header before decoding (more: 413).")] = 25_000_000,
    max_image_side: Annotated[int, typer.Option(help="Longest image side in pixels (more: 413).")] = 10_000,
    max_in_model: Annotated[int, typer.Option(help="Requests decoded and inferred at once, one thread each.")] = 2,
    max_waiting: Annotated[int, typer.Option(help="Requests waiting for the model; more get 503 with Retry-After.")] = 16,
    request_timeout_s: Annotated[float, typer.Option(help="Seconds from a request's whole body to its answer (past it: 503 while waiting, 504 once in the model).")] = 10.0,
    head_timeout_s: Annotated[float, typer.Option(help="Seconds a connection has to send a request's headers (then 408 and closed).")] = 10.0,
    body_timeout_s: Annotated[float, typer.Option(help="Seconds a connection has to send a request's body after its headers.")] = 30.0,
    keep_alive_s: Annotated[int, typer.Option(help="Seconds an idle kept-alive connection stays open.")] = 5,
    max_connections: Annotated[int, typer.Option(help="Connections open at once (more: 503).")] = 256,
) -> None:
    """Serve the store's current model over HTTP; swaps to a newly installed or rolled-back version on the fly.

    Besides /health and /v1/predict: the Open Inference Protocol v2 under /v2, Prometheus metrics at /metrics, and the
    plant's page at /plant, whose URL with its token is printed at start."""
    from edge.server import MB, Limits
    from edge.server import serve as run

    if not max_body_mb > 0:
        raise ConfigError(f"--max-body-mb must be above 0, got {max_body_mb}")
    limits = Limits(max_batch=max_batch, max_body_bytes=int(max_body_mb * MB), max_image_pixels=max_image_pixels, max_image_side=max_image_side,
                    max_in_model=max_in_model, max_waiting=max_waiting, request_timeout_s=request_timeout_s, head_timeout_s=head_timeout_s,
                    body_timeout_s=body_timeout_s, keep_alive_s=keep_alive_s, max_connections=max_connections)
    logging.getLogger("maxfl.edge").setLevel(logging.INFO)
    run(PlantConfig.from_node_config(node_config), model, host, port, threads=threads, limits=limits,
        announce=lambda line: console.print(line, markup=False))


@app.command()
def status(node_config: NodeConfig, json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False) -> None:
    """Per model: the current version, its sha256, the history of current versions and what is installed.

    Exits non-zero, with one line per model saying what is wrong and how to fix it, when a current version's
    files are damaged or missing."""
    from rich import box
    from rich.table import Table

    from edge.store import describe

    plant = PlantConfig.from_node_config(node_config)
    store = _store(plant)
    rows = describe(store)
    problems = [f"{r['model']}: {r['problem']}" for r in rows if r["problem"]]
    if json_:
        console.print_json(json.dumps({"plant-id": plant.plant_id, "edge-store": str(store.root), "models": rows}))
        _fail_on(problems)
        return
    if not rows:
        console.print(f"edge store of {plant.plant_id} at {store.root} holds no model yet")
        return
    table = Table(box=box.SIMPLE, caption="history: the versions made current, oldest first; a rollback goes back one")
    for column in ("model", "current", "sha256", "task"):
        table.add_column(column, no_wrap=True)
    table.add_column("history")
    table.add_column("installed")
    for r in rows:
        history = " -> ".join(f"v{v}" for v in r["history"])  # type: ignore[attr-defined]
        installed = ", ".join(f"v{v}" for v in r["installed"])  # type: ignore[attr-defined]
        table.add_row(str(r["model"]), (f"v{r['current']}" if r["current"] else "-") + (" (damaged)" if r["problem"] else ""), str(r["sha256"] or "-")[:12], str(r["task"] or "-"),
                      history or "-", installed or "-")
    console.print(f"edge store of {plant.plant_id}: {store.root}")
    console.print(table)
    _fail_on(problems)


def _fail_on(problems: list[str]) -> None:
    if problems:
        from edge.store import EdgeStoreError

        raise EdgeStoreError("; ".join(problems))


@app.command()
def rollback(node_config: NodeConfig, model: ModelName = None) -> None:
    """Go back to the version that was current before; a running server swaps to it within a second."""
    plant = PlantConfig.from_node_config(node_config)
    outcome = _store(plant).rollback(model)
    console.print(f"{plant.plant_id}: {outcome.model_name} v{outcome.previous} -> v{outcome.version}")


@app.command()
def activate(
    node_config: NodeConfig,
    version: Annotated[int, typer.Option(help="An installed version to make current.")],
    model: ModelName = None,
) -> None:
    """Make an installed version current (re-verifying its bytes); a running server swaps to it within a second."""
    plant = PlantConfig.from_node_config(node_config)
    store = _store(plant)
    if model is None:
        names = store.models()
        if len(names) != 1:
            held = f"several models ({', '.join(names)})" if names else "no model"
            raise ConfigError(f"the edge store at {store.root} holds {held}: say which with --model")
        model = names[0]
    outcome = store.activate(model, version)
    was = f"v{outcome.previous}" if outcome.previous else "none"
    console.print(f"{plant.plant_id}: {outcome.model_name} {was} -> v{outcome.version}" + (" (already current)" if outcome.status == "already-current" else ""))


def main() -> None:
    """`python -m edge.cli`: the same commands without the rest of `maxfl`; user errors are one line."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: signal.default_int_handler(signal.SIGINT, None))
    try:
        app(standalone_mode=False)
    except UserError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(0)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
