"""`maxfl federation ...`: the anchor creates its federation's CA, runs its SuperLink, adds and revokes plants."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from maxfl.errors import ConfigError

app = typer.Typer(no_args_is_help=True, help="Anchor side: the federation's CA and SuperLink, onboarding and revoking plants.")
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

Dir = Annotated[Path, typer.Option("--dir", help="The federation folder (CA, SuperLink certificate, plants, kits, audit log).")]


def _fed(folder: Path):  # noqa: ANN202 - provision.Federation, imported lazily
    from fl_server.provision import load_federation

    return load_federation(folder)


@app.command()
def init(
    folder: Dir,
    name: Annotated[str, typer.Option(help="The federation's name (lower-case letters, digits, '-', '_').")],
    superlink_address: Annotated[str, typer.Option(help="HOST:PORT of the SuperLink as the plants reach it.")],
    san: Annotated[list[str], typer.Option("--san", help="Another name or IP the SuperLink answers to (repeatable).")] = [],  # noqa: B006
    ca_days: Annotated[int, typer.Option(help="Days the CA is valid.")] = 3650,
    days: Annotated[int, typer.Option(help="Days the SuperLink's certificate is valid (renew with `maxfl federation renew`).")] = 397,
    control_address: Annotated[str | None, typer.Option(help="HOST:PORT where the anchor's own CLI reaches the SuperLink (default 127.0.0.1:PORT).")] = None,
    contact: Annotated[str, typer.Option(help="Whom a plant's IT person contacts; printed in every join kit.")] = "",
) -> None:
    """Create the federation's CA, the SuperLink's TLS certificate, the anchor's Flower CLI config and an audit log."""
    from fl_client.join import short
    from fl_server.provision import init_federation

    fed = init_federation(folder, name, superlink_address, san, ca_days, days, control_address, contact)
    console.print(f"federation '{fed.info.name}' created in {fed.dir}")
    console.print(f"CA sha256 {fed.info.ca_fingerprint} ({short(fed.info.ca_fingerprint)}); keep {fed.ca_key} offline-safe")
    console.print(f"SuperLink certificate for: {', '.join(fed.info.sans)}")
    console.print(f"next: `maxfl federation superlink --dir {fed.dir}`, then `maxfl federation add-plant PLANT_ID --public-key FILE --dir {fed.dir}`")


@app.command()
def superlink(
    folder: Dir,
    port: Annotated[int | None, typer.Option(help="Port (default: the port of the federation's SuperLink address).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    database: Annotated[Path | None, typer.Option(help="SuperLink state (registered plants, runs); default DIR/superlink-state.db.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS, no node authentication: local demos only.")] = False,
    superexec_secret_file: Annotated[Path | None, typer.Option(help="Run ServerApps in process isolation: only a `flower-superexec "
                                     "--superexec-auth-secret-file` with this secret may pick them up (see compose/).")] = None,
) -> None:
    """Run the SuperLink in the foreground: TLS with the federation's certificate and SuperNode authentication."""
    from fl_client.join import split_address
    from fl_server.provision import QUIET_ENV, STATE_DB, superlink_argv

    fed = _fed(folder)
    bin_dir = Path(sys.executable).parent
    listen = port or split_address(fed.info.superlink_address)[1]
    if insecure:
        err_console.print("[yellow]warning:[/yellow] --insecure: no TLS and no SuperNode authentication -- any process that reaches "
                          f"port {listen} can join as a plant and read the traffic; local demos only")
    if superexec_secret_file is not None and not superexec_secret_file.is_file():
        raise ConfigError(f"--superexec-secret-file {superexec_secret_file} does not exist; write a long random secret there "
                          "(e.g. `openssl rand -hex 32`) and give the same file to flower-superexec")
    argv = superlink_argv(None if insecure else fed, bin_dir, host, listen, database or fed.dir / STATE_DB,
                          superexec_secret=superexec_secret_file)
    env = {**os.environ, **QUIET_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}  # it starts flower-superexec
    console.print(f"SuperLink of '{fed.info.name}' on {host}:{listen} ({'INSECURE' if insecure else 'TLS + SuperNode authentication'})")
    proc = subprocess.Popen(argv, env=env)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    raise typer.Exit(code)


@app.command("add-plant")
def add_plant(
    plant_id: Annotated[str, typer.Argument(help="The plant's id; its node config's plant-id must match.")],
    public_key: Annotated[Path, typer.Option(help="The plant's public key (the .pub file `maxfl plant keygen` wrote).")],
    folder: Dir,
) -> None:
    """Register the plant's public key with the running SuperLink and issue its join kit (DIR/kits/PLANT_ID)."""
    from fl_client.join import short
    from fl_server.provision import add_plant as add

    record, kit = add(_fed(folder), plant_id, public_key)
    console.print(f"{plant_id}: registered as node {record.node_id} (key sha256 {short(record.key_fingerprint)})")
    console.print(f"join kit: {kit} -- send the whole folder to {plant_id}'s IT person (nothing in it is secret)")


@app.command()
def revoke(plant_id: Annotated[str, typer.Argument(help="The plant to revoke.")], folder: Dir) -> None:
    """Withdraw the plant's key at the SuperLink: it is disconnected and cannot join again with that key."""
    from fl_server.provision import revoke_plant

    record = revoke_plant(_fed(folder), plant_id)
    console.print(f"{plant_id}: revoked (node {record.node_id}); the other plants are untouched")


@app.command()
def plants(folder: Dir, json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False) -> None:
    """Every plant ever added: status, node id, key fingerprint, when it joined or was revoked."""
    from fl_client.join import short

    fed = _fed(folder)
    book = fed.plants()
    if json_:
        console.print_json(json.dumps([r.model_dump(mode="json", exclude={"public_key"}) for r in book.plants.values()]))
        return
    if not book.plants:
        console.print(f"no plants in '{fed.info.name}' yet; add one with `maxfl federation add-plant`")
        return
    table = Table("plant", "status", "node id", "key sha256", "joined", "revoked", box=box.SIMPLE)
    for r in sorted(book.plants.values(), key=lambda r: r.plant_id):
        table.add_row(r.plant_id, r.status, str(r.node_id), short(r.key_fingerprint), f"{r.joined_at:%Y-%m-%d %H:%M}",
                      f"{r.revoked_at:%Y-%m-%d %H:%M}" if r.revoked_at else "-")
    console.print(f"federation '{fed.info.name}' ({sum(r.status == 'active' for r in book.plants.values())} active)")
    console.print(table)


@app.command()
def expiry(
    folder: Dir,
    warn_days: Annotated[int, typer.Option(help="Warn about certificates that expire within this many days.")] = 30,
) -> None:
    """Every certificate (CA, SuperLink, the CA in each kit) with its expiry date; non-zero exit if one has expired."""
    from fl_server.provision import ProvisionError
    from fl_server.provision import expiry as list_expiry

    rows = list_expiry(_fed(folder))
    table = Table("certificate", "subject", "not after (UTC)", "days left", "file", box=box.SIMPLE)
    for r in rows:
        left = "EXPIRED" if r.expired else str(r.days_left)
        table.add_row(r.what, r.subject, f"{r.not_after:%Y-%m-%d %H:%M}", left, str(r.path))
    console.print(table)
    expired = [r.what for r in rows if r.expired]
    if expired:
        raise ProvisionError(f"{len(expired)} certificate(s) expired: {', '.join(expired)}; renew the SuperLink's with "
                             "`maxfl federation renew`, an expired CA needs a new federation and new kits")
    soon = [f"{r.what} in {r.days_left} days" for r in rows if r.days_left <= warn_days]
    if soon:
        err_console.print(f"[yellow]warning:[/yellow] expiring within {warn_days} days: {', '.join(soon)}")


@app.command()
def renew(folder: Dir, days: Annotated[int, typer.Option(help="Days the new certificate is valid.")] = 397) -> None:
    """Issue a fresh SuperLink certificate from the same CA (kits stay valid); restart the SuperLink to use it."""
    from fl_server.provision import renew_superlink

    if days < 1:
        raise ConfigError("--days must be at least 1")
    cert = renew_superlink(_fed(folder), days)
    console.print(f"SuperLink certificate renewed, valid until {cert.not_valid_after_utc:%Y-%m-%d}; restart the SuperLink to use it")
