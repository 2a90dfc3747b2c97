"""`maxfl federation ...`: the anchor creates its federation's CA, runs its SuperLink, adds and revokes plants."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
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
    from fl_server.federation.provision import load_federation

    return load_federation(folder)


@app.command()
def init(
    folder: Dir,
    name: Annotated[str, typer.Option(help="The federation's name (lower-case letters, digits, '-', '_').")],
    superlink_address: Annotated[str, typer.Option(help="HOST:PORT of the SuperLink as the plants reach it.")],
    san: Annotated[list[str], typer.Option("--san", help="Another name or IP the SuperLink answers to (repeatable).")] = [],  # noqa: B006
    ca_days: Annotated[int, typer.Option(help="Days the CA is valid.")] = 3650,
    days: Annotated[int, typer.Option(help="Days the SuperLink's certificate is valid (renew with `maxfl federation renew`).")] = 397,
    control_address: Annotated[str | None, typer.Option(help="HOST:PORT where the SuperLink itself listens and the anchor's own CLI "
                                                        "reaches it (default 127.0.0.1:PORT+1; plants reach PORT through the proxy).")] = None,
    contact: Annotated[str, typer.Option(help="Whom a plant's IT person contacts; printed in every join kit.")] = "",
) -> None:
    """Create the federation's CA, the SuperLink's TLS certificate, the anchor's Flower CLI config and an audit log."""
    from fl_client.join import short
    from fl_server.federation.provision import init_federation

    fed = init_federation(folder, name, superlink_address, san, ca_days, days, control_address, contact)
    console.print(f"federation '{fed.info.name}' created in {fed.dir}")
    console.print(f"CA sha256 {fed.info.ca_fingerprint} ({short(fed.info.ca_fingerprint)}); keep {fed.ca_key} offline-safe")
    console.print(f"SuperLink certificate for: {', '.join(fed.info.sans)}")
    console.print(f"next: `maxfl federation superlink --dir {fed.dir}`, then `maxfl federation add-plant PLANT_ID --public-key FILE --dir {fed.dir}`"
                  f" and `maxfl federation allow-serverapp APP_DIR --dir {fed.dir}` (the anchor runs no other ServerApp)")


@app.command()
def superlink(
    folder: Dir,
    port: Annotated[int | None, typer.Option(help="The plants' port, where the proxy listens (default: the port of the federation's SuperLink address).")] = None,
    host: Annotated[str, typer.Option(help="Address the proxy listens on for plants.")] = "0.0.0.0",
    superlink_port: Annotated[int | None, typer.Option(help="The SuperLink's own port on 127.0.0.1 (default: the port of the "
                                                       "federation's control address, where the anchor's CLI reaches it).")] = None,
    admin_port: Annotated[int | None, typer.Option(help="Also serve the Control API to remote admins on this port (same --host), "
                                                   "mutual TLS: only admins added with `maxfl federation add-admin`.")] = None,
    database: Annotated[Path | None, typer.Option(help="SuperLink state (registered plants, runs); default DIR/superlink-state.db.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS, no node authentication, no proxy: local demos only.")] = False,
    superexec_secret_file: Annotated[Path | None, typer.Option(help="The SuperExec secret: only an executor holding it picks up "
                                     "ServerApps (default DIR/private/superexec.secret, made at init).")] = None,
    executor: Annotated[bool, typer.Option("--executor/--no-executor", help="Run the ServerApp executor (`maxfl-superexec`: only "
                        "ServerApps in DIR/allowed-serverapps) here; --no-executor: one started elsewhere with the same secret.")] = True,
    unknown_nodes: Annotated[str, typer.Option(help="Nodes at the SuperLink that are no plant in plants.json, found once it "
                                               "answers: unregister (default) or report.")] = "unregister",
) -> None:
    """Run the SuperLink on loopback, the proxy that admits plants (Fleet API only) and the ServerApp executor that
    runs only allowed ServerApps, in the foreground, until Ctrl-C."""
    from fl_client.join import is_ip, split_address
    from fl_server.federation.provision import QUIET_ENV, STATE_DB, proxy_config, superlink_argv
    from fl_server.federation.proxy import caddy_argv, caddy_binary, caddy_env, healthy, write_config
    from fl_server.federation.serverapp_policy import superexec_argv

    fed = _fed(folder)
    if unknown_nodes not in ("unregister", "report"):
        raise ConfigError(f"--unknown-nodes {unknown_nodes!r}: give unregister or report")
    bin_dir = Path(sys.executable).parent
    listen = port or split_address(fed.info.superlink_address)[1]
    secret = superexec_secret_file or fed.superexec_secret
    if not secret.is_file():
        raise ConfigError(f"the SuperExec secret {secret} does not exist; write a long random secret there (e.g. `openssl rand -hex 32 > "
                          f"{secret}`, mode 600), or give --superexec-secret-file")
    env = {**os.environ, **QUIET_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    plants = f"[{host}]:{listen}" if ":" in host else f"{host}:{listen}"
    commands = []
    if insecure:
        err_console.print("[yellow]warning:[/yellow] --insecure: no TLS, no SuperNode authentication and no proxy -- any process that "
                          f"reaches port {listen} can join as a plant, read the traffic and use the Control API; local demos only")
        _check_free(plants, "--port")
        argv = superlink_argv(None, bin_dir, host, listen, database or fed.dir / STATE_DB, superexec_secret=secret)
        console.print(f"SuperLink of '{fed.info.name}' on {plants} (INSECURE)")
        own, ca = f"127.0.0.1:{listen}", None
        commands.append(("SuperLink", argv, env, lambda: healthy(own, None)))
    else:
        own_host, own_port = split_address(fed.info.control_address)
        own = f"{own_host if is_ip(own_host) else '127.0.0.1'}:{superlink_port or own_port}"
        ca = fed.ca_cert
        if split_address(own)[1] == listen:
            raise ConfigError(f"the SuperLink's own port and the plants' port are both {listen}; give the SuperLink another with "
                              "--superlink-port (and set control_address in federation.json to 127.0.0.1:THAT_PORT)")
        _check_free(plants, "--port")
        _check_free(own, "--superlink-port")
        admin = None
        if admin_port is not None:
            admin = f"[{host}]:{admin_port}" if ":" in host else f"{host}:{admin_port}"
            if admin_port in (listen, split_address(own)[1]):
                raise ConfigError(f"--admin-port {admin_port} is already the plants' or the SuperLink's port; pick another")
            if not fed.admin_certs():
                raise ConfigError(f"--admin-port: no admins yet, so nobody could use it; add one with `maxfl federation add-admin NAME "
                                  f"--admin-address HOST:{admin_port} --dir {fed.dir}`")
            _check_free(admin, "--admin-port")
        proxy = proxy_config(fed, plants, upstream=own, admin_listen=admin, admin_certs=fed.admin_certs() if admin else ())
        caddy = caddy_argv(caddy_binary(), write_config(proxy))
        link = superlink_argv(fed, bin_dir, split_address(own)[0], split_address(own)[1], database or fed.dir / STATE_DB, superexec_secret=secret)
        console.print(f"SuperLink of '{fed.info.name}' on {own} (TLS + SuperNode authentication; Control API: here only)")
        console.print(f"proxy for plants on {plants}: Fleet API only (TLS with {fed.superlink_cert.name})")
        if admin:
            console.print(f"admin listener on {admin}: Control API, mutual TLS for {len(proxy.admin_certs)} admin(s) on record")
        commands.append(("SuperLink", link, env, lambda: healthy(own, fed.ca_cert) and _reconcile_once(fed, unknown_nodes == "unregister")))
        commands.append(("proxy (caddy)", caddy, caddy_env(proxy, env), lambda: healthy(plants, fed.ca_cert)))
    if executor:
        console.print(f"ServerApp executor: only the ServerApps in {fed.allowed_serverapps} ({_allowed_count(fed)} allowed now)")
        commands.append(("ServerApp executor", superexec_argv(bin_dir, own, secret, fed.dir, ca, parent_pid=os.getpid()), env, lambda: True))
    ready = f"ready: plants join at {plants if insecure else fed.info.superlink_address}"
    raise typer.Exit(_foreground(commands, ready))


def _allowed_count(fed) -> int:  # noqa: ANN001 - provision.Federation
    from fl_server.federation.serverapp_policy import read_allowed

    return len(read_allowed(fed.allowed_serverapps))


def _reconcile_once(fed, remove_unknown: bool) -> bool:  # noqa: ANN001 - provision.Federation
    """The SuperLink's nodes against plants.json as soon as it answers (fl_server.federation.reconcile); always True (ready)."""
    from fl_server.federation.provision import ProvisionError
    from fl_server.federation.reconcile import reconcile

    try:
        result = reconcile(fed, remove_unknown=remove_unknown)
    except ProvisionError as exc:
        err_console.print(f"[yellow]warning:[/yellow] node check skipped: {exc}")
        return True
    (console if result.clean else err_console).print(f"node check: {result.summary()}")
    return True


@app.command()
def proxy(
    folder: Dir,
    upstream: Annotated[str | None, typer.Option(help="HOST:PORT of the SuperLink (default: the federation's control address), e.g. "
                                                 "superlink:9092 in the compose stack; its certificate must name HOST (`init --san`).")] = None,
    port: Annotated[int | None, typer.Option(help="The plants' port (default: the port of the federation's SuperLink address).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on for plants.")] = "0.0.0.0",
    admin_port: Annotated[int | None, typer.Option(help="Also the mutual-TLS admin listener (Control API) on this port.")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Caddy's config and state (default DIR/proxy).")] = None,
) -> None:
    """Only the proxy, for a SuperLink that runs elsewhere (its own container): the Fleet API for plants, until Ctrl-C."""
    from fl_client.join import JoinError, split_address
    from fl_server.federation.provision import proxy_config
    from fl_server.federation.proxy import caddy_argv, caddy_binary, caddy_env, healthy, write_config

    fed = _fed(folder)
    target = upstream or fed.info.control_address
    try:
        up_host, _ = split_address(target)
    except JoinError as exc:
        raise ConfigError(f"--upstream: {exc}".replace("SuperLink address", "address")) from None
    listen = port or split_address(fed.info.superlink_address)[1]
    plants = f"[{host}]:{listen}" if ":" in host else f"{host}:{listen}"
    if up_host.lower() not in fed.info.sans:
        raise ConfigError(f"--upstream {target}: the SuperLink certificate does not name {up_host} (it names {', '.join(fed.info.sans)}); "
                          "init the federation with --san " + up_host)
    _check_free(plants, "--port")
    admin = None
    if admin_port is not None:
        admin = f"[{host}]:{admin_port}" if ":" in host else f"{host}:{admin_port}"
        if not fed.admin_certs():
            raise ConfigError("--admin-port: no admins yet; add one with `maxfl federation add-admin NAME`")
        _check_free(admin, "--admin-port")
    cfg = proxy_config(fed, plants, upstream=target, admin_listen=admin, admin_certs=fed.admin_certs() if admin else ())
    cfg = cfg.model_copy(update={"upstream_server_name": up_host,
                                 **({"state_dir": state_dir} if state_dir is not None else {})})
    caddy = caddy_argv(caddy_binary(), write_config(cfg))
    console.print(f"proxy for plants on {plants}: Fleet API only, to the SuperLink at {target}")
    code = _foreground([("proxy (caddy)", caddy, caddy_env(cfg), lambda: healthy(plants, fed.ca_cert))],
                       f"ready: plants join at {fed.info.superlink_address}")
    raise typer.Exit(code)


def _check_free(address: str, flag: str) -> None:
    from fl_server.federation.proxy import port_free

    if not port_free(address):
        raise ConfigError(f"{address} is already in use (another SuperLink or proxy running?); stop it, or pick another port with {flag}")


def _foreground(commands: list[tuple[str, list[str], dict[str, str], Callable[[], bool]]], ready_line: str) -> int:
    """Start each process once the one before it answers; run until one exits, Ctrl-C or SIGTERM; stop all by PID."""
    import time

    def _interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _interrupt)
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def _exited() -> int | None:
        for name, proc in procs:
            if proc.poll() is not None:
                err_console.print(f"error: the {name} exited with code {proc.returncode}; stopping the rest (its output is above)")
                return proc.returncode or 1
        return None

    try:
        for name, argv, env, ready in commands:
            try:
                procs.append((name, subprocess.Popen(argv, env=env)))
            except OSError as exc:
                raise ConfigError(f"cannot start the {name} ({argv[0]}): {exc.strerror}") from None
            while not ready():
                if (code := _exited()) is not None:
                    return code
                time.sleep(0.3)
        console.print(ready_line)
        while (code := _exited()) is None:
            time.sleep(0.5)
        return code
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        for _, proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        signal.signal(signal.SIGTERM, previous)


@app.command("add-admin")
def add_admin(
    name: Annotated[str, typer.Argument(help="The admin's name (lower-case letters, digits, '-', '_').")],
    admin_address: Annotated[str, typer.Option(help="HOST:PORT of the proxy's admin listener as the admin reaches it "
                                               "(`maxfl federation superlink --admin-port PORT`).")],
    folder: Dir,
    days: Annotated[int, typer.Option(help="Days the admin's certificate is valid.")] = 397,
) -> None:
    """Issue a client certificate from the federation CA for a remote admin (DIR/admins/NAME); restart the SuperLink to let it in."""
    from fl_client.join import short
    from fl_server.federation.provision import add_admin as add

    record, bundle = add(_fed(folder), name, admin_address, days)
    console.print(f"admin '{name}': client certificate sha256 {short(record.cert_fingerprint)}, valid until {record.not_after:%Y-%m-%d}")
    console.print(f"bundle: {bundle} -- it holds the admin's private key: hand it over as a secret; the admin runs "
                  f"`maxfl federation admin-tunnel --admin {bundle.name}`")
    console.print("restart `maxfl federation superlink --admin-port ...` so its admin listener lets this admin in")


@app.command("remove-admin")
def remove_admin(name: Annotated[str, typer.Argument(help="The admin to take off the record.")], folder: Dir) -> None:
    """Take a remote admin off the record; restart the SuperLink command so its admin listener refuses them."""
    from fl_server.federation.provision import remove_admin as remove

    remove(_fed(folder), name)
    console.print(f"admin '{name}' removed; restart `maxfl federation superlink --admin-port ...` to refuse their certificate")


@app.command("admin-tunnel")
def admin_tunnel(
    admin: Annotated[Path, typer.Option("--admin", help="The admin bundle `maxfl federation add-admin` made (admin.json, admin.crt, admin.key, ca.crt).")],
    port: Annotated[int, typer.Option(help="Local port (127.0.0.1) your `flwr` CLI talks to.")] = 9190,
) -> None:
    """On an admin's machine: the Control API of the anchor's SuperLink on 127.0.0.1:PORT, over mutual TLS, until Ctrl-C."""
    from fl_server.federation.provision import ADMIN_CERT, ADMIN_KEY, CA_CERT, load_admin_bundle
    from fl_server.federation.proxy import TunnelConfig, caddy_argv, caddy_binary, caddy_env, write_config
    from maxfl.atomic import atomic_write_text

    folder = admin.resolve()
    bundle = load_admin_bundle(folder)
    for needed in (ADMIN_CERT, ADMIN_KEY, CA_CERT):
        if not (folder / needed).is_file():
            raise ConfigError(f"{folder / needed} is missing; ask the anchor for the whole bundle (`maxfl federation add-admin`)")
    listen = f"127.0.0.1:{port}"
    _check_free(listen, "--port")
    tunnel = TunnelConfig(listen=listen, remote=bundle.admin_address, server_name=bundle.server_name, cert=folder / ADMIN_CERT,
                          key=folder / ADMIN_KEY, ca=folder / CA_CERT, state_dir=folder / "tunnel")
    caddy = caddy_argv(caddy_binary(), write_config(tunnel))
    home = folder / "flwr-home"
    # Plain HTTP only between this machine's own flwr CLI and the tunnel, on loopback; mutual TLS from there on.
    atomic_write_text(home / "config.toml", f'[superlink]\ndefault = "{bundle.federation}"\n\n[superlink.{bundle.federation}]\n'
                                            f'address = "{listen}"\ninsecure = true\n')
    console.print(f"tunnel to {bundle.admin_address} (mutual TLS as '{bundle.name}') on {listen}")
    env = {**os.environ}
    code = _foreground([("tunnel (caddy)", caddy, caddy_env(tunnel, env), lambda: _listening(listen))],
                       f"ready: FLWR_HOME={home} flwr supernode ls {bundle.federation}")
    raise typer.Exit(code)


def _listening(address: str) -> bool:
    import socket

    from fl_client.join import split_address

    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@app.command("add-plant")
def add_plant(
    plant_id: Annotated[str, typer.Argument(help="The plant's id; its node config's plant-id must match.")],
    public_key: Annotated[Path, typer.Option(help="The plant's public key (the .pub file `maxfl plant keygen` wrote).")],
    folder: Dir,
) -> None:
    """Register the plant's public key with the running SuperLink and issue its join kit (DIR/kits/PLANT_ID)."""
    from fl_client.join import short
    from fl_server.federation.provision import add_plant as add

    record, kit = add(_fed(folder), plant_id, public_key)
    console.print(f"{plant_id}: registered as node {record.node_id} (key sha256 {short(record.key_fingerprint)})")
    console.print(f"join kit: {kit} -- send the whole folder to {plant_id}'s IT person (nothing in it is secret)")


@app.command()
def revoke(plant_id: Annotated[str, typer.Argument(help="The plant to revoke.")], folder: Dir) -> None:
    """Withdraw the plant's key at the SuperLink: it is disconnected and cannot join again with that key."""
    from fl_server.federation.provision import revoke_plant

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
    from fl_server.federation.provision import ProvisionError
    from fl_server.federation.provision import expiry as list_expiry

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
    from fl_server.federation.provision import renew_superlink

    if days < 1:
        raise ConfigError("--days must be at least 1")
    cert = renew_superlink(_fed(folder), days)
    console.print(f"SuperLink certificate renewed, valid until {cert.not_valid_after_utc:%Y-%m-%d}; restart the SuperLink to use it")


App = Annotated[str, typer.Argument(help="The ServerApp: the app folder you pass to `flwr run`, a .fab file, or its SHA-256.")]


@app.command("allow-serverapp")
def allow_serverapp(app_: App, folder: Dir) -> None:
    """Let the anchor run this ServerApp (its FAB hash into DIR/allowed-serverapps); no restart needed."""
    from fl_server.federation.serverapp_policy import allow_serverapp as allow

    fed = _fed(folder)
    with fed.locked():
        fab_hash, added = allow(fed.dir, app_, fed.audit)
    console.print(f"ServerApp sha256 {fab_hash} " + ("allowed" if added else "was already allowed") + f" ({fed.allowed_serverapps})")


@app.command("disallow-serverapp")
def disallow_serverapp(app_: App, folder: Dir) -> None:
    """Stop running this ServerApp: its later runs are refused (a run already going finishes)."""
    from fl_server.federation.serverapp_policy import disallow_serverapp as disallow

    fed = _fed(folder)
    with fed.locked():
        fab_hash, removed = disallow(fed.dir, app_, fed.audit)
    if not removed:
        raise ConfigError(f"ServerApp sha256 {fab_hash} is not in {fed.allowed_serverapps}; nothing to take off")
    console.print(f"ServerApp sha256 {fab_hash} no longer allowed")


@app.command()
def page(
    folder: Annotated[Path | None, typer.Option("--dir", "--federation-dir", help="The federation folder: registered plants, and the "
                                                "SuperLink's node list through its Control API.")] = None,
    workdir: Annotated[Path | None, typer.Option(help="A `maxfl federate` workdir: its federation folder, audit log and spend record.")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="The MLflow tracking server (default $MLFLOW_TRACKING_URI).")] = None,
    mlflow_ui: Annotated[str, typer.Option(help="MLflow's UI as a browser reaches it, for the page's links (default: the tracking URI).")] = "",
    audit_log: Annotated[Path | None, typer.Option(help="The runs' audit log: deployments (default $MAXFL_HOME/anchor/audit.jsonl).")] = None,
    privacy_watch: Annotated[Path | None, typer.Option(help="The anchor's spend record (default $MAXFL_HOME/anchor/privacy-watch.json).")] = None,
    token_file: Annotated[Path | None, typer.Option(help="The page's token, made if missing (default DIR/private/page-token, else "
                                                   "the anchor's state folder).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback: only this host's users reach the page).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8050,
    refresh: Annotated[float, typer.Option(min=0.5, max=600.0, help="Seconds between updates of the page's live parts.")] = 2.0,
) -> None:
    """Serve the federation page until Ctrl-C: plants, runs, privacy budgets, model versions, what each plant's edge
    serves, and Prometheus metrics at /metrics. Prints its URL with the token once."""
    from fl_server.federation.page.app import default_token_file, resolve_sources, serve

    sources = resolve_sources(folder, workdir, tracking_uri, mlflow_ui, audit_log, privacy_watch)
    serve(sources, token_file or default_token_file(sources, workdir), host, port, refresh, echo=lambda line: console.print(line, markup=False))
