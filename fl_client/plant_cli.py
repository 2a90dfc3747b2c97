"""`maxfl plant ...`: a plant makes its key pair and joins a federation with the kit the anchor sent."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, help="Plant side: the plant's key pair, joining a federation.")
console = Console(highlight=False, soft_wrap=True)


@app.command()
def keygen(out: Annotated[Path, typer.Option(help="Folder for supernode.key (private, 0600) and supernode.pub.")]) -> None:
    """Make the plant's key pair for Flower's SuperNode authentication; send only the .pub file to the anchor."""
    from fl_client.join import keygen as make, short

    private, public, fp = make(out)
    console.print(f"private key: {private} (stays on this machine, readable only by you)")
    console.print(f"public key:  {public} -- send this file to the anchor; its sha256 is {fp} ({short(fp)})")


@app.command()
def join(
    kit: Annotated[Path, typer.Option(help="The join kit folder the anchor sent (kit.json, ca.crt, README.md).")],
    key: Annotated[Path, typer.Option(help="The plant's private key (supernode.key from `maxfl plant keygen`).")],
    node_config: Annotated[str, typer.Option(help="The plant's own node config: plant-id, data-dir, max-epsilon, ...")],
    federation: Annotated[str | None, typer.Option(help="The federation you mean to join (checked against the kit).")] = None,
    warm: Annotated[bool, typer.Option(help="Long-lived pre-imported ClientApp executor (--no-warm: one process per message).")] = True,
    runtime_port: Annotated[int | None, typer.Option(help="Port of the SuperNode's local runtime API (default: a free one).")] = None,
    log_dir: Annotated[Path | None, typer.Option(help="Where the SuperNode's logs go (default $MAXFL_HOME/logs/<plant-id>).")] = None,
    check: Annotated[bool, typer.Option("--check", help="Only run the checks (kit, key, CA, TLS handshake); start nothing.")] = False,
) -> None:
    """Check the kit, the key and the connection, then run the plant's SuperNode until Ctrl-C or SIGTERM."""
    from fl_client.join import prepare_join, run_plant

    plan = prepare_join(kit, key, node_config, federation)
    info = plan.kit.info
    if check:
        console.print(f"ok: kit for {info.plant_id} in '{info.federation}', key matches, CA valid until {plan.kit.ca.not_valid_after_utc:%Y-%m-%d}, "
                      f"TLS handshake with {info.superlink_address} verified by the federation CA")
        return
    run_plant(plan, node_config, warm=warm, runtime_port=runtime_port, log_dir=log_dir, echo=console.print)
