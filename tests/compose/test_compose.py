"""compose/: the anchor and plant stacks and their image, checked without a Docker engine.

Fast and process-free: both compose files are parsed (PyYAML) and interpolated with their .env.example the way
Compose does, and every command line in them is parsed by the real command's own parser -- maxfl through
typer/click introspection of `launcher.cli.app`, flower-superlink and flower-superexec through Flower's argparse
parsers, `mlflow server` through MLflow's click command, the healthchecks through compose/healthcheck.py --
so a flag that does not exist, or a command that is not there, fails here. The files are also validated
against the Compose Specification's JSON schema (compose-spec.json beside this file: compose-spec/compose-spec
schema/compose-spec.json at commit 170098ba07d9f53c383a41bfd4c5166b0a4529a6, Apache-2.0), and by
`docker compose config -q` where the Compose CLI is installed (skipped, saying so, where it is not).

The stacks' command lines run as plain processes in test_compose_processes.py (e2e).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import importlib.util
import json
import re
import shutil
import socket
import subprocess
import threading
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
STACKS = {"anchor": COMPOSE / "anchor", "plant": COMPOSE / "plant"}
SCHEMA = Path(__file__).with_name("compose-spec.json")


# ---------------------------------------------------------------- Compose semantics: .env files, interpolation
def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as Compose reads an .env file (comments, blank lines, optional quotes)."""
    env: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: {raw!r} is not KEY=VALUE"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


class MissingVariable(ValueError):
    pass


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err},
    ${VAR:+alt}, ${VAR+alt}; nested ${...} in a default is substituted too."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c != "$":
            out.append(c)
            i += 1
            continue
        if text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if text.startswith("${", i):
            depth, j = 1, i + 2
            while j < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            assert depth == 0, f"unclosed ${{ in {text!r}"
            out.append(_substitute(text[i + 2 : j - 1], env))
            i = j
            continue
        m = _NAME.match(text, i + 1)
        assert m, f"a lone $ in {text!r} (write $$ for a literal $)"
        out.append(env.get(m.group(0), ""))
        i = m.end()
    return "".join(out)


def _substitute(expr: str, env: Mapping[str, str]) -> str:
    m = _NAME.match(expr)
    assert m, f"${{{expr}}} does not start with a variable name"
    name, rest = m.group(0), expr[m.end() :]
    value, is_set = env.get(name), name in env
    if not rest:
        return value or ""
    for op in (":-", ":?", ":+", "-", "?", "+"):
        if rest.startswith(op):
            arg = rest[len(op) :]
            strict = op.startswith(":")  # ':' treats an empty value as unset
            present = is_set and (bool(value) or not strict)
            if op.endswith("-"):
                return value if present else interpolate(arg, env)  # type: ignore[return-value]
            if op.endswith("?"):
                if not present:
                    raise MissingVariable(f"{name}: {arg}")
                return value  # type: ignore[return-value]
            return interpolate(arg, env) if present else ""
    raise AssertionError(f"${{{expr}}}: unknown substitution")


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(v, env) for v in node]
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    return node


def variables_in(node: Any) -> dict[str, bool]:
    """Every variable a parsed compose file substitutes -> whether it is required (${VAR:?...} / ${VAR?...})."""
    found: dict[str, bool] = {}
    if isinstance(node, dict):
        for value in node.values():
            for name, required in variables_in(value).items():
                found[name] = found.get(name, False) or required
    elif isinstance(node, list):
        for value in node:
            for name, required in variables_in(value).items():
                found[name] = found.get(name, False) or required
    elif isinstance(node, str):
        for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?+])?|\$([A-Za-z_][A-Za-z0-9_]*)", node.replace("$$", "")):
            name = m.group(1) or m.group(3)
            found[name] = found.get(name, False) or (m.group(2) or "").endswith("?")
    return found


# ---------------------------------------------------------------- loading the stacks
def raw_text(stack: str) -> str:
    return (STACKS[stack] / "compose.yaml").read_text(encoding="utf-8")


@functools.cache
def raw(stack: str) -> dict[str, Any]:
    return yaml.safe_load(raw_text(stack))


@functools.cache
def env_example(stack: str) -> dict[str, str]:
    return read_env_file(STACKS[stack] / ".env.example")


@functools.cache
def resolved(stack: str) -> dict[str, Any]:
    """The stack as Compose sees it with .env.example as its .env (YAML anchors and merge keys applied)."""
    return interpolate_tree(raw(stack), env_example(stack))


def services(stack: str) -> dict[str, dict[str, Any]]:
    return resolved(stack)["services"]


def argv(service: dict[str, Any]) -> list[str]:
    entry, command = service.get("entrypoint") or [], service.get("command") or []
    assert isinstance(entry, list) and isinstance(command, list), "write entrypoint and command as lists (exec form): no shell parsing"
    return [str(a) for a in [*entry, *command]]


def flag(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"{name} must appear exactly once in {args}"
    return args[args.index(name) + 1]


def mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """Every volume entry in long form: type, source, target, read_only."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out.append({"read_only": bool(v.get("read_only", False)), **v})
            continue
        parts = v.split(":")
        source, target, mode = parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        out.append({"type": kind, "source": source, "target": target, "read_only": "ro" in mode.split(",")})
    return out


def mount_at(service: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The mount that holds `path` inside the container (the deepest one)."""
    best = None
    for m in mounts(service):
        target = m["target"].rstrip("/")
        if path == target or path.startswith(target + "/"):
            if best is None or len(target) > len(best["target"]):
                best = m
    return best


def healthcheck_argv(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] == "CMD", f"healthcheck must be exec form ['CMD', ...]: {test}"
    return [str(a) for a in test[1:]]


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def published(service: dict[str, Any]) -> dict[int, str]:
    """container port -> host side ('ip:port') of every published port."""
    out = {}
    for p in service.get("ports", []):
        host, _, container = str(p).rpartition(":")
        out[int(container)] = host
    return out


# ---------------------------------------------------------------- the real parsers
class ArgvError(AssertionError):
    pass


def _strict(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    def error(message: str) -> None:
        raise ArgvError(f"{parser.prog}: {message}")

    parser.error = error  # type: ignore[method-assign]
    return parser


def parse_flower_superlink(args: list[str]) -> argparse.Namespace:
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

    return _strict(_parse_args_run_superlink()).parse_args(args)


def parse_flower_superexec(args: list[str]) -> argparse.Namespace:
    from flwr.supercore.cli.flower_superexec import _parse_args

    return _strict(_parse_args()).parse_args(args)


@functools.cache
def healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("maxfl_healthcheck", COMPOSE / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_healthcheck(args: list[str]) -> argparse.Namespace:
    """`maxfl-healthcheck ...` (the image's probe, compose/healthcheck.py) parsed by its own parser."""
    assert args[0] == "maxfl-healthcheck", f"healthchecks use the image's probe, not {args[0]}"
    return _strict(healthcheck_module().parser()).parse_args(args[1:])


def parse_maxfl(args: list[str]) -> dict[str, Any]:
    """`maxfl ...` parsed by the real CLI (typer -> click) without running it; its parameters."""
    import click
    import typer

    from launcher.cli import app

    command: click.Command = typer.main.get_command(app)
    ctx = click.Context(command, info_name="maxfl")
    rest, path = list(args), ["maxfl"]
    while isinstance(command, click.Group):
        if not rest or rest[0].startswith("-"):
            raise ArgvError(f"`{' '.join(path)}` needs a sub-command here, got {rest[:1]}")
        name = rest.pop(0)
        sub = command.get_command(ctx, name)
        if sub is None:
            known = ", ".join(sorted(command.list_commands(ctx)))
            raise ArgvError(f"`{' '.join(path)} {name}` does not exist (yet): `{' '.join(path)}` has {known}")
        path.append(name)
        command, ctx = sub, click.Context(sub, info_name=name, parent=ctx)
    try:
        return command.make_context(" ".join(path), list(rest)).params
    except click.ClickException as exc:
        raise ArgvError(f"`{' '.join(path)}` refuses {rest}: {exc.format_message()}") from None


def parse_mlflow_server(args: list[str]) -> dict[str, Any]:
    pytest.importorskip("mlflow", reason="mlflow (the anchor's `server` extra) is not installed")
    import click
    from mlflow.cli import server

    try:
        return server.make_context("mlflow server", list(args)).params
    except click.ClickException as exc:
        raise ArgvError(f"`mlflow server` refuses {args}: {exc.format_message()}") from None


# ================================================================ the stacks' shape
def test_the_anchor_stack_has_its_services() -> None:
    assert {"postgres", "mlflow", "proxy", "superlink", "serverapp"} <= set(services("anchor"))
    assert services("anchor")["admin"]["profiles"] == ["tools"], "the CLI service runs on demand only"


def test_the_plant_stack_has_its_services() -> None:
    assert {"supernode", "edge"} <= set(services("plant"))
    assert services("plant")["cli"]["profiles"] == ["tools"], "the CLI service runs on demand only"


@pytest.mark.parametrize("stack", STACKS)
def test_nothing_runs_insecure(stack: str) -> None:
    for path in (STACKS[stack] / "compose.yaml", STACKS[stack] / ".env.example", COMPOSE / "Dockerfile"):
        assert "--insecure" not in path.read_text(encoding="utf-8"), f"{path} mentions --insecure"
    for name, svc in services(stack).items():
        args = argv(svc) + (healthcheck_argv(svc) if "healthcheck" in svc else [])
        assert not [a for a in args if a.startswith("--insecure")], f"{name} runs with --insecure"
        assert "http://" not in " ".join(a for a in args if "superlink" in a), f"{name} talks to the SuperLink without TLS"


@pytest.mark.parametrize("stack", STACKS)
def test_every_container_runs_as_non_root_and_restarts(stack: str) -> None:
    for name, svc in services(stack).items():
        assert "user" not in svc or not str(svc["user"]).startswith(("0", "root")), f"{name} runs as root"
        assert svc.get("privileged") is not True, name
        if "tools" not in svc.get("profiles", []):
            assert svc.get("restart") == "unless-stopped", f"{name}: a long-running service restarts after a crash or a reboot"


@pytest.mark.parametrize("stack", STACKS)
def test_env_example_defines_every_variable(stack: str) -> None:
    used = variables_in(raw(stack))
    used |= {s["environment"]: True for s in (raw(stack).get("secrets") or {}).values() if "environment" in s}
    example = env_example(stack)
    assert set(used) - set(example) == set(), f"{stack}/.env.example lacks {sorted(set(used) - set(example))}"
    assert set(example) - set(used) == set(), f"{stack}/.env.example sets variables compose.yaml never uses: {sorted(set(example) - set(used))}"
    empty = [name for name, required in used.items() if required and not example[name]]
    assert not empty, f"required variables left empty in .env.example: {empty}"


@pytest.mark.parametrize("stack", STACKS)
def test_a_missing_required_variable_stops_compose(stack: str) -> None:
    required = [name for name, req in variables_in(raw(stack)).items() if req]
    assert required
    for name in required:
        env = {k: v for k, v in env_example(stack).items() if k != name}
        with pytest.raises(MissingVariable, match=name):
            interpolate_tree(raw(stack), env)


def test_the_anchor_secrets_are_required() -> None:
    required = {name for name, req in variables_in(raw("anchor")).items() if req}
    assert "POSTGRES_PASSWORD" in required
    assert raw("anchor")["secrets"]["superexec_secret"] == {"environment": "SUPEREXEC_SECRET"}
    for value in (env_example("anchor")["POSTGRES_PASSWORD"], env_example("anchor")["SUPEREXEC_SECRET"]):
        assert value.startswith("replace-"), "the example secrets must read as placeholders"


@pytest.mark.parametrize("stack", STACKS)
def test_references_are_declared(stack: str) -> None:
    doc = resolved(stack)
    volumes, secrets, networks = set(doc.get("volumes") or {}), set(doc.get("secrets") or {}), set(doc.get("networks") or {}) | {"default"}
    for name, svc in doc["services"].items():
        for m in mounts(svc):
            if m["type"] == "volume":
                assert m["source"] in volumes, f"{name} mounts undeclared volume {m['source']}"
        for s in svc.get("secrets", []):
            source = s["source"] if isinstance(s, dict) else s
            assert source in secrets, f"{name} uses undeclared secret {source}"
        for n in svc.get("networks", []):
            assert n in networks, f"{name} joins undeclared network {n}"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in doc["services"], f"{name} depends on unknown service {dep}"
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in doc["services"][dep], f"{name} waits for {dep} to be healthy, which has no healthcheck"
    used = {m["source"] for svc in doc["services"].values() for m in mounts(svc) if m["type"] == "volume"}
    assert volumes == used, f"declared but unused volumes: {sorted(volumes - used)}"


@pytest.mark.parametrize("stack", STACKS)
def test_images_build_from_the_dockerfile_targets(stack: str) -> None:
    targets = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", (COMPOSE / "Dockerfile").read_text(), re.M | re.I))
    for name, svc in services(stack).items():
        if "build" not in svc:
            continue
        build = svc["build"]
        context = (STACKS[stack] / build["context"]).resolve()
        assert context == ROOT, f"{name}: the build context must be the repository root"
        assert (context / build["dockerfile"]).resolve() == COMPOSE / "Dockerfile"
        assert build["target"] == stack and stack in targets, f"{name} builds target {build['target']}"


# ================================================================ the anchor
def test_the_superlink_runs_what_maxfl_federation_superlink_runs_plus_process_isolation() -> None:
    """The command is the flower-superlink argv of `maxfl federation superlink --dir /federation --superexec-secret-file
    ...` (process isolation: the ServerApp in its own container): a change to fl_server.federation.provision.superlink_argv shows here."""
    try:
        from fl_server.federation.provision import Federation, FederationInfo, superlink_argv
    except ImportError as exc:  # pragma: no cover - the anchor's provisioning is part of the project
        pytest.fail(f"fl_server.federation.provision (maxfl federation) is needed to check the superlink service: {exc}")
    svc = services("anchor")["superlink"]
    args = argv(svc)
    assert args[0] == "flower-superlink"
    port, database = int(flag(args, "--port")), Path(flag(args, "--database"))
    fed = Federation(Path("/federation"), FederationInfo.model_construct(name="anchor"))
    expected = superlink_argv(fed, Path("/opt/maxfl/bin"), flag(args, "--host"), port, database,
                              superexec_secret=Path(flag(args, "--superexec-auth-secret-file")))
    assert args == [Path(expected[0]).name, *expected[1:]]
    ns = parse_flower_superlink(args[1:])
    assert ns.enable_supernode_auth and not ns.insecure and ns.isolation == "process"
    assert ns.runtime_dependency_install is False
    assert flag(args, "--host") == "0.0.0.0", "the SuperLink listens on the container's interface"
    # TLS material and state: mounted where the command reads them; the CA key is in no container.
    for path in (ns.ssl_certfile, ns.ssl_keyfile, ns.ssl_ca_certfile):
        m = mount_at(svc, path)
        assert m and m["type"] == "bind" and m["read_only"] and m["target"] == path, f"{path} is not mounted read-only"
        assert m["source"] == "./" + path.removeprefix("/"), f"{path} comes from elsewhere than the federation folder's {path}"
    state = mount_at(svc, str(database))
    assert state and state["type"] == "volume" and not state["read_only"], "the SuperLink's state DB must persist on a volume"
    assert "ports" not in svc, "the SuperLink is not published: plants reach the proxy (its Control API must stay inside)"
    assert svc["networks"] == ["link"] and resolved("anchor")["networks"]["link"]["internal"] is True


def test_the_proxy_is_the_only_published_way_to_the_superlink_and_forwards_to_it_over_tls() -> None:
    proxy, link = services("anchor")["proxy"], services("anchor")["superlink"]
    args = argv(proxy)
    assert args[:3] == ["maxfl", "federation", "proxy"]
    params = parse_maxfl(args[1:])
    host, port = params["upstream"].rsplit(":", 1)
    assert host == "superlink" and int(port) == int(flag(argv(link), "--port")), "the proxy forwards to the superlink service's port"
    assert params["host"] == "0.0.0.0" and params["admin_port"] is None
    env = env_example("anchor")
    assert published(proxy) == {params["port"]: f"{env['SUPERLINK_BIND']}:{env['SUPERLINK_PORT']}"}
    assert set(proxy["networks"]) == {"link", "default"} and proxy["depends_on"]["superlink"]["condition"] == "service_healthy"
    for name in ("federation.json", "ca.crt", "superlink.crt", "private/superlink.key"):
        m = mount_at(proxy, f"{params['folder']}/{name}")
        assert m and m["type"] == "bind" and m["read_only"] and m["source"] == f"./federation/{name}", name
    state = mount_at(proxy, str(params["state_dir"]))
    assert state and state["type"] == "volume" and not state["read_only"], "Caddy writes its config and state there"
    probe = parse_healthcheck(healthcheck_argv(proxy))
    url = urlsplit(probe.url)
    assert (url.scheme, url.hostname, url.port, url.path) == ("https", "127.0.0.1", params["port"], "/health")
    assert probe.cafile == f"{params['folder']}/ca.crt"
    # The containers that need the SuperLink itself are on its network; the admin CLI reaches nothing else.
    assert "link" in services("anchor")["serverapp"]["networks"]
    assert services("anchor")["admin"]["networks"] == ["link"] and "network_mode" not in services("anchor")["admin"]


def _secret_file(svc: dict[str, Any], args: list[str]) -> str:
    path = flag(args, "--superexec-auth-secret-file")
    (secret,) = [s for s in svc["secrets"] if s["target"] == path]
    assert secret["source"] == "superexec_secret"
    return secret["source"]


def test_the_serverapp_executor_runs_only_allowed_serverapps_and_attaches_to_the_superlink_over_tls() -> None:
    from fl_server.federation.serverapp_policy import superexec_argv

    link, app = services("anchor")["superlink"], services("anchor")["serverapp"]
    link_args, args = argv(link), argv(app)
    assert args[:3] == ["maxfl-superexec", "--federation-dir", "/federation"], "the executor that checks each FAB's hash"
    ns = parse_flower_superexec(args[3:])
    assert not ns.insecure and ns.runtime_dependency_install is False
    host, port = ns.runtime_api_address.rsplit(":", 1)
    assert host == "superlink" and int(port) == int(flag(link_args, "--port")), "the executor dials the superlink service's port"
    assert ns.root_certificates == flag(link_args, "--ssl-ca-certfile"), "it verifies the SuperLink with the federation CA"
    expected = superexec_argv(Path("/opt/maxfl/bin"), ns.runtime_api_address, Path(ns.superexec_auth_secret_file), Path("/federation"),
                              Path(ns.root_certificates))
    assert args[: len(expected)] == [Path(expected[0]).name, *expected[1:]], "what `maxfl federation superlink` runs beside its SuperLink"
    # The federation folder read-only (allowed-serverapps, plants.json), every private key hidden under a tmpfs.
    m = mount_at(app, "/federation/allowed-serverapps")
    assert m and m["type"] == "bind" and m["read_only"] and m["source"] == "./federation"
    for secret in ("/federation/private/ca.key", "/federation/private/superlink.key", "/federation/private/admins/alice/admin.key"):
        hidden = mount_at(app, secret)
        assert hidden and hidden["type"] == "tmpfs", f"{secret} is visible in the ServerApp container"
    assert app["environment"]["MAXFL_ANCHOR_AUDIT_LOG"].startswith(mount_at(app, "/var/lib/maxfl")["target"]), "refusals are audited on a volume"
    assert _secret_file(app, args) == _secret_file(link, link_args), "both sides hold the same SuperExec secret"
    assert app["depends_on"]["superlink"]["condition"] == "service_healthy"
    assert app["depends_on"]["mlflow"]["condition"] == "service_healthy"
    # Its healthcheck asks the health service the command starts.
    probe = parse_healthcheck(healthcheck_argv(app))
    assert probe.url == f"grpc://{ns.health_server_address}"


def test_the_serverapp_reaches_mlflow_by_its_service_port_and_mlflow_accepts_that_host() -> None:
    mlflow, app = services("anchor")["mlflow"], services("anchor")["serverapp"]
    uri = urlsplit(app["environment"]["MLFLOW_TRACKING_URI"])
    assert uri.scheme == "http" and uri.hostname == "mlflow"
    args = argv(mlflow)
    assert args[:2] == ["mlflow", "server"]
    params = parse_mlflow_server(args[2:])
    assert uri.port == params["port"] and params["host"] == "0.0.0.0"
    from mlflow.server.security_utils import is_allowed_host_header

    allowed = [h.strip() for h in params["allowed_hosts"].split(",")]
    assert is_allowed_host_header(allowed, uri.netloc), f"MLflow would refuse Host {uri.netloc} (--allowed-hosts {allowed})"
    assert is_allowed_host_header(allowed, f"localhost:{params['port']}")
    assert published(mlflow) == {params["port"]: f"{env_example('anchor')['MLFLOW_BIND']}:{env_example('anchor')['MLFLOW_PORT']}"}
    assert mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    probe = parse_healthcheck(healthcheck_argv(mlflow))
    assert urlsplit(probe.url).port == params["port"]
    # Artifacts: proxied by the server, stored on a volume.
    assert params["serve_artifacts"] is True
    store = mount_at(mlflow, params["artifacts_destination"])
    assert store and store["type"] == "volume" and not store["read_only"]


def test_mlflow_stores_its_metadata_in_the_postgres_service() -> None:
    postgres, mlflow = services("anchor")["postgres"], services("anchor")["mlflow"]
    params = parse_mlflow_server(argv(mlflow)[2:])
    db = urlsplit(params["backend_store_uri"])
    assert db.scheme in ("postgresql", "postgresql+psycopg2")
    assert db.hostname == "postgres" and (db.port or 5432) == 5432
    assert db.password is None, "the password stays out of the command line (libpq reads PGPASSWORD)"
    assert db.username == postgres["environment"]["POSTGRES_USER"] and db.path.lstrip("/") == postgres["environment"]["POSTGRES_DB"]
    assert mlflow["environment"]["PGPASSWORD"] == postgres["environment"]["POSTGRES_PASSWORD"] == env_example("anchor")["POSTGRES_PASSWORD"]
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    probe = healthcheck_argv(postgres)
    assert probe[0] == "pg_isready"
    assert flag(probe, "-U") == db.username and flag(probe, "-d") == postgres["environment"]["POSTGRES_DB"]
    data = mount_at(postgres, "/var/lib/postgresql/data")
    assert data and data["type"] == "volume"
    assert "ports" not in postgres, "PostgreSQL is not published"
    networks = resolved("anchor")["networks"]
    assert postgres["networks"] == ["backend"] and networks["backend"]["internal"] is True
    assert "backend" in mlflow["networks"]


def test_the_superlink_healthcheck_verifies_tls() -> None:
    svc = services("anchor")["superlink"]
    args, probe = argv(svc), parse_healthcheck(healthcheck_argv(services("anchor")["superlink"]))
    url = urlsplit(probe.url)
    assert url.scheme == "https" and url.port == int(flag(args, "--port")) and url.path == "/health"
    # 127.0.0.1 is in every SuperLink certificate `maxfl federation init` issues.
    assert url.hostname == "127.0.0.1"
    assert probe.cafile == flag(args, "--ssl-ca-certfile")


def test_the_admin_service_runs_the_real_maxfl_federation_commands() -> None:
    svc = services("anchor")["admin"]
    assert argv(svc)[0] == "maxfl"
    fed = mount_at(svc, "/federation")
    assert fed and fed["source"] == "./federation" and not fed["read_only"]
    incoming = mount_at(svc, "/incoming")
    assert incoming and incoming["read_only"]
    # The commands compose/README.md tells the anchor to run through it.
    for args in (
        ["federation", "init", "--dir", "/federation", "--name", "acme-suppliers", "--superlink-address", "fl.acme.example:9092", "--san", "superlink",
         "--control-address", "superlink:9092"],
        ["federation", "add-plant", "plant-7", "--public-key", "/incoming/plant-7.pub", "--dir", "/federation"],
        ["federation", "revoke", "plant-7", "--dir", "/federation"],
        ["federation", "plants", "--dir", "/federation"],
        ["federation", "expiry", "--dir", "/federation"],
        ["federation", "renew", "--dir", "/federation"],
        ["federation", "allow-serverapp", "/app", "--dir", "/federation"],
    ):
        parse_maxfl(args)


def test_only_the_admin_service_sees_the_federation_folders_private_keys() -> None:
    for name, svc in services("anchor").items():
        for m in mounts(svc):
            if name != "admin" and m.get("source") == "./federation":
                assert m["read_only"] and (mount_at(svc, "/federation/private") or {}).get("type") == "tmpfs", \
                    f"{name} mounts the federation folder with its private keys"
            assert "ca.key" not in m.get("source", ""), f"{name} mounts the CA key"


# ================================================================ the federation page and Prometheus
def test_the_federation_page_reads_what_the_serverapp_writes_behind_its_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from fl_server.run.config import RunConfig

    svc, app = services("anchor")["page"], services("anchor")["serverapp"]
    args = argv(svc)
    assert args[:3] == ["maxfl", "federation", "page"]
    params = parse_maxfl(args[1:])
    # MLflow where the ServerApp logs; the runs' audit log and spend record where the ServerApp's run config puts them
    assert params["tracking_uri"] == app["environment"]["MLFLOW_TRACKING_URI"]
    monkeypatch.setenv("MAXFL_HOME", app["environment"]["MAXFL_HOME"])
    assert Path(params["audit_log"]) == RunConfig().audit_log_path() and str(params["audit_log"]) == app["environment"]["MAXFL_ANCHOR_AUDIT_LOG"]
    assert Path(params["privacy_watch"]) == RunConfig().privacy_watch_path()
    for path in (params["audit_log"], params["privacy_watch"]):
        m, written = mount_at(svc, str(path)), mount_at(app, str(path))
        assert m and written and m["source"] == written["source"] == "anchor-state" and m["read_only"], f"{path}: not the ServerApp's, or writable"
    # the federation folder (plants.json, the Control API's config) read-only, every private key hidden
    fed = mount_at(svc, f"{params['folder']}/plants.json")
    assert fed and fed["type"] == "bind" and fed["read_only"] and fed["source"] == "./federation"
    assert (mount_at(svc, f"{params['folder']}/private/ca.key") or {}).get("type") == "tmpfs"
    # the SuperLink's node list through the Control API (the `link` network), MLflow on the default one
    assert set(svc["networks"]) == {"link", "default"}
    # every path but /healthz needs the token, a secret from .env that Prometheus reads too
    (secret,) = [s for s in svc["secrets"] if s["target"] == str(params["token_file"])]
    assert raw("anchor")["secrets"][secret["source"]] == {"environment": "PAGE_TOKEN"}
    env = env_example("anchor")
    assert env["PAGE_TOKEN"].startswith("replace-"), "the example token must read as a placeholder (the page refuses it)"
    assert params["host"] == "0.0.0.0"
    assert published(svc) == {params["port"]: f"{env['PAGE_BIND']}:{env['PAGE_PORT']}"} and env["PAGE_BIND"] == "127.0.0.1"
    probe = parse_healthcheck(healthcheck_argv(svc))
    url = urlsplit(probe.url)
    assert (url.scheme, url.hostname, url.port, url.path) == ("http", "127.0.0.1", params["port"], "/healthz"), "the one path without the token"


def test_prometheus_scrapes_the_page_with_its_token_and_the_plants_edge_servers() -> None:
    prom, page = services("anchor")["prometheus"], services("anchor")["page"]
    assert prom["profiles"] == ["monitoring"], "an example: started on demand"
    args = argv(prom)
    config_file = next(a.split("=", 1)[1] for a in args if a.startswith("--config.file="))
    config_mount = mount_at(prom, config_file)
    assert config_mount and config_mount["read_only"] and config_mount["target"] == config_file
    config = yaml.safe_load((STACKS["anchor"] / config_mount["source"]).read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    page_params = parse_maxfl(argv(page)[1:])
    scrape = jobs["federation-page"]
    assert scrape["metrics_path"] == "/metrics"
    assert scrape["static_configs"] == [{"targets": [f"page:{page_params['port']}"]}], "the page service's own port"
    assert scrape["authorization"]["type"] == "Bearer"
    (secret,) = [s for s in prom["secrets"] if s["target"] == scrape["authorization"]["credentials_file"]]
    (page_secret,) = [s for s in page["secrets"] if s["target"] == str(page_params["token_file"])]
    assert secret["source"] == page_secret["source"], "Prometheus sends the token the page checks"
    assert float(config["global"]["scrape_timeout"].rstrip("s")) > 4.0, "longer than the page's bound on a request (4 s)"
    assert set(prom["networks"]) & set(page["networks"]), "Prometheus reaches the page service"
    # the plants' edge servers: GET /metrics without a token, on the port a plant's stack publishes its edge server on
    edge = jobs["edge"]
    assert edge["metrics_path"] == "/metrics" and "authorization" not in edge
    plant_edge = services("plant")["edge"]
    (edge_port,) = {int(host.rsplit(":", 1)[1]) for host in published(plant_edge).values()}
    for sd in edge["file_sd_configs"]:
        for path in sd["files"]:
            m = mount_at(prom, path)
            assert m and m["read_only"], f"{path} is not mounted in the prometheus service"
            entries = json.loads((STACKS["anchor"] / m["source"]).read_text(encoding="utf-8"))
            assert entries and all(e["labels"]["plant"] and all(port_of(t) == edge_port for t in e["targets"]) for e in entries)
    assert published(prom) == {9090: f"{env_example('anchor')['PROMETHEUS_BIND']}:{env_example('anchor')['PROMETHEUS_PORT']}"}


# ================================================================ the plant
def test_the_supernode_runs_maxfl_plant_join_with_its_kit_and_key() -> None:
    svc = services("plant")["supernode"]
    args = argv(svc)
    assert args[:3] == ["maxfl", "plant", "join"]
    params = parse_maxfl(args[1:])
    assert params["warm"] is True, "the warm ClientApp executor runs in this container (maxfl plant join starts it)"
    assert params["check"] is False
    assert params["federation"] == env_example("plant")["FEDERATION"]
    kit, key = mount_at(svc, str(params["kit"])), mount_at(svc, str(params["key"]))
    assert kit and kit["read_only"] and kit["source"] == "./kit"
    assert key and key["read_only"] and key["source"] == "./keys"
    assert Path(params["key"]).name == "supernode.key", "the private key `maxfl plant keygen` writes"
    logs = mount_at(svc, str(params["log_dir"]))
    assert logs and logs["type"] == "volume"
    probe = parse_healthcheck(healthcheck_argv(svc))
    assert urlsplit(probe.url).hostname == "127.0.0.1" and urlsplit(probe.url).port == params["runtime_port"]
    assert "ports" not in svc, "nothing reaches the SuperNode from outside"


def test_the_keygen_the_readme_shows_writes_where_join_reads() -> None:
    cli = services("plant")["cli"]
    assert argv(cli)[0] == "maxfl"
    params = parse_maxfl(["plant", "keygen", "--out", "/keys"])
    keys = mount_at(cli, str(params["out"]))
    assert keys and not keys["read_only"] and keys["source"] == mount_at(services("plant")["supernode"], "/keys/supernode.key")["source"]  # type: ignore[index]


def _node_config(svc: dict[str, Any]) -> str:
    return flag(argv(svc), "--node-config")


def test_the_node_config_is_the_plants_own_and_lives_on_its_volume() -> None:
    from fl_client.config import PlantConfig

    supernode, edge = services("plant")["supernode"], services("plant")["edge"]
    text = _node_config(supernode)
    assert _node_config(edge) == text == supernode["environment"]["MAXFL_NODE_CONFIG"] == edge["environment"]["MAXFL_NODE_CONFIG"]
    plant = PlantConfig.from_node_config(text)
    env = env_example("plant")
    assert plant.plant_id == env["PLANT_ID"] and plant.max_epsilon == float(env["MAX_EPSILON"]) and plant.delta == float(env["DELTA"])
    assert plant.allowed_apps == env["ALLOWED_APPS"], "without allowed-apps a plant runs no app at all"
    data = mount_at(supernode, str(plant.data_dir))
    assert data and data["read_only"] and data["source"] == env["PLANT_DATA_DIR"] and data["target"] == str(plant.data_dir)
    for path in (plant.ledger_path(), plant.edge_store_path(), plant.audit_log_path()):
        m = mount_at(supernode, str(path))
        assert m and m["type"] == "volume" and m["source"] == "plant-state" and not m["read_only"], f"{path} must persist on the plant-state volume"
    store = mount_at(edge, str(plant.edge_store_path()))
    assert store and store["source"] == "plant-state" and store["read_only"], "the edge server reads the store the SuperNode installs into"
    assert supernode["environment"]["MAXFL_HOME"] == edge["environment"]["MAXFL_HOME"]
    assert mount_at(supernode, supernode["environment"]["MAXFL_HOME"])["source"] == "plant-state"  # type: ignore[index]


def test_the_edge_server_listens_where_it_is_published_and_probed() -> None:
    svc = services("plant")["edge"]
    args = argv(svc)
    assert args[:3] == ["maxfl", "edge", "serve"]
    params = parse_maxfl(args[1:])
    assert params["host"] == "0.0.0.0" and params["model"] == env_example("plant")["EDGE_MODEL"]
    env = env_example("plant")
    assert published(svc) == {params["port"]: f"{env['EDGE_BIND']}:{env['EDGE_PORT']}"}
    probe = parse_healthcheck(healthcheck_argv(svc))
    assert urlsplit(probe.url).port == params["port"] and urlsplit(probe.url).path == "/health"
    assert 503 in probe.accept, "an edge server with no model yet answers 503 and is up all the same"


def test_the_readme_plant_commands_parse() -> None:
    for args in (
        ["plant", "join", "--kit", "/kit", "--key", "/keys/supernode.key", "--federation", "acme", "--node-config", 'plant-id="p"', "--check"],
        ["ledger", "--node-config", 'plant-id="p" data-dir="/data"'],
        ["edge", "status", "--node-config", 'plant-id="p" data-dir="/data"'],
        ["edge", "rollback", "--node-config", 'plant-id="p" data-dir="/data"'],
    ):
        parse_maxfl(args)


# ================================================================ compose/README.md's commands
def readme_maxfl_commands() -> list[tuple[str, list[str]]]:
    """Every `maxfl` command line compose/README.md tells someone to run in a container: (service, argv after maxfl)."""
    import shlex

    text = (COMPOSE / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    found: list[tuple[str, list[str]]] = []
    for line in lines:
        line = line.split(" #", 1)[0].strip()
        if not line.startswith("docker compose ") or " run " not in f" {line} " and " exec " not in f" {line} ":
            continue
        for part in line.split("&&"):
            words = shlex.split(part)
            if len(words) < 3 or words[:2] != ["docker", "compose"] or words[2] not in ("run", "exec"):
                continue
            rest, entrypoint = words[3:], None
            while rest and rest[0].startswith("-"):
                opt = rest.pop(0)
                if opt in ("-v", "-e", "--entrypoint"):
                    value = rest.pop(0)
                    entrypoint = value if opt == "--entrypoint" else entrypoint
            service, args = rest[0], rest[1:]
            if entrypoint == "sh" or (args[:2] == ["sh", "-c"]):
                inner = shlex.split(args[-1])
                assert inner[0] == "maxfl", f"README runs {inner[0]} through sh"
                found.append((service, [a.replace("$MAXFL_NODE_CONFIG", "NODE_CONFIG") for a in inner[1:]]))
            elif entrypoint is None and services_of(service)[service].get("entrypoint") == ["maxfl"]:
                found.append((service, args))
    return found


def services_of(service: str) -> dict[str, dict[str, Any]]:
    for stack in STACKS:
        if service in services(stack):
            return services(stack)
    raise AssertionError(f"README names a service no stack has: {service}")


def test_the_readme_maxfl_commands_are_ones_the_cli_accepts() -> None:
    commands = readme_maxfl_commands()
    seen = {tuple(args[:2]) for _, args in commands}
    assert {("federation", "init"), ("federation", "add-plant"), ("federation", "revoke"), ("plant", "keygen"), ("plant", "join")} <= seen
    node_config = _node_config(services("plant")["supernode"])
    for service, args in commands:
        args = [node_config if a == "NODE_CONFIG" else a for a in args]
        params = parse_maxfl(args)
        for value in params.values():  # every path the command touches is mounted in that service
            if isinstance(value, Path) and value.is_absolute():
                assert mount_at(services_of(service)[service], str(value)), f"README: {service} has nothing mounted at {value}"


def test_the_readme_creates_the_certificate_name_the_serverapp_dials() -> None:
    host = flag(argv(services("anchor")["serverapp"]), "--runtime-api-address").rsplit(":", 1)[0]
    inits = [args for _, args in readme_maxfl_commands() if args[:2] == ["federation", "init"]]
    assert inits and all(host in parse_maxfl(a)["san"] for a in inits), f"`federation init` in the README must add --san {host}"
    # and the admin service (on the internal network) reaches the SuperLink there, not through the proxy
    assert all(parse_maxfl(a)["control_address"] == f"{host}:9092" for a in inits), "`federation init` needs --control-address superlink:9092"
    assert f"--san {host}" in raw_text("anchor"), "and so must the how-to at the top of anchor/compose.yaml"


# ================================================================ the image
def _stages(dockerfile: str) -> dict[str, str]:
    """Stage name -> its instructions (line continuations joined)."""
    text = re.sub(r"\\\n", " ", dockerfile)
    stages: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        if m := re.match(r"^FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.I):
            name = m.group(1) or f"stage-{len(stages)}"
            stages[name] = ""
        elif name and line.strip() and not line.lstrip().startswith("#"):
            stages[name] += line.strip() + "\n"
    return stages


def _base(dockerfile: str, stage: str) -> str:
    m = re.search(rf"^FROM\s+(\S+)\s+AS\s+{re.escape(stage)}\s*$", dockerfile, re.M | re.I)
    assert m, f"no stage {stage}"
    return m.group(1)


def _chain(dockerfile: str, stage: str) -> list[str]:
    """The stage and the stages it is built FROM, base first."""
    names = set(_stages(dockerfile))
    chain = [stage]
    while (base := _base(dockerfile, chain[0])) in names:
        chain.insert(0, base)
    return chain


def test_the_dockerfile_installs_torch_first_then_the_project_with_constraints() -> None:
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    stages = _stages(dockerfile)
    pin = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert pin, "constraints.txt pins torch"
    assert re.search(rf"ARG TORCH_VERSION={re.escape(pin.group(1))}\b", dockerfile), "the image installs the torch constraints.txt pins"
    for target, extra in (("plant", "client"), ("anchor", "server")):
        assert target in stages, f"no `{target}` target"
        (source,) = re.findall(r"^COPY --from=(\S+) /opt/maxfl /opt/maxfl$", stages[target], re.M)
        steps = "".join(stages[s] for s in _chain(dockerfile, source))
        torch_at = steps.find('pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"')
        project_at = steps.find(f'pip install -c constraints.txt ".[{extra}]"')
        assert 0 <= torch_at < project_at, f"{target}: torch (CPU index) must be installed before the project's [{extra}] extra"
        assert "download.pytorch.org/whl/cpu" in dockerfile
        final = stages[target]
        assert re.search(r"^USER 10001:10001$", final, re.M), f"{target} runs as the non-root maxfl user"
        assert "gcc" not in final and "gcc" not in stages["runtime"], f"{target}: the compiler stays in the build stage"
    assert "psycopg2-binary" in stages["build-anchor"] and "psycopg2" not in stages["build-plant"], "PostgreSQL's driver is the anchor's only"
    assert "mlflow" not in stages["build-plant"]


def test_the_dockerfile_bakes_in_no_secret_and_copies_only_the_project() -> None:
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if re.match(r"^\s*(ENV|ARG)\b", line):
            assert not re.search(r"PASSWORD|SECRET|TOKEN|PRIVATE|_KEY\b", line, re.I), f"secret-looking build setting: {line}"
        if re.match(r"^\s*(COPY|ADD)\b", line) and "--from=" not in line:
            assert not re.search(r"\.env|federation|keys|kit|\.key|\.crt|\.maxfl|\.venv", line), f"copies something that is not the project: {line}"
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    copied = set(re.findall(r"^COPY (\w+)/ \1/$", dockerfile, re.M))
    assert copied == set(packages), f"the image must COPY exactly the wheel's packages {packages}, not {sorted(copied)}"
    ignore = [ln.strip() for ln in (COMPOSE / "Dockerfile.dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "**", "the build context is an allowlist"
    for needed in [*packages, "pyproject.toml", "constraints.txt", "README.md", "compose/healthcheck.py"]:
        assert f"!{needed}" in ignore or f"!{needed}/" in ignore, f"{needed} is kept out of the build context"


# ================================================================ the healthcheck probe itself
class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        status = {"/ok": 200, "/no-model": 503, "/broken": 500}.get(self.path, 404)
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_healthcheck_probe(http_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    main = healthcheck_module().main
    assert main([f"{http_url}/ok"]) == 0
    assert main([f"{http_url}/no-model"]) == 1
    assert main([f"{http_url}/no-model", "--accept", "503"]) == 0
    assert main([f"{http_url}/broken", "--accept", "503"]) == 1
    assert "answered 500" in capsys.readouterr().err
    closed = http_url.rsplit(":", 1)[0] + ":1"
    assert main([f"{closed}/health", "--timeout", "1"]) == 1
    assert main(["ftp://example/x"]) == 1


def test_the_healthcheck_probe_speaks_grpc_health() -> None:
    """What `flower-superexec --health-server-address` serves (Flower's own health server, in this process)."""
    from flwr.supercore.grpc_health import run_health_server_grpc_no_tls

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = run_health_server_grpc_no_tls(f"127.0.0.1:{port}")
    try:
        assert healthcheck_module().main([f"grpc://127.0.0.1:{port}", "--timeout", "5"]) == 0
    finally:
        server.stop(grace=None).wait()
    assert healthcheck_module().main([f"grpc://127.0.0.1:{port}", "--timeout", "1"]) == 1


# ================================================================ validators: the Compose schema, the Compose CLI
@pytest.mark.parametrize("stack", STACKS)
def test_the_stack_is_valid_against_the_compose_specification_schema(stack: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(resolved(stack)), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


def _docker_compose() -> list[str]:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker compose CLI not installed (no `docker` on PATH)")
    try:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        probe = None
    if probe is None or probe.returncode != 0:
        pytest.skip("docker compose CLI not installed (`docker compose version` fails: no compose plugin)")
    return [docker, "compose"]


@pytest.mark.parametrize("stack", STACKS)
def test_docker_compose_config_accepts_the_stack(stack: str, tmp_path: Path) -> None:
    """`docker compose config -q` needs no engine: the CLI itself parses, interpolates and validates."""
    compose = _docker_compose()
    env_file = tmp_path / ".env"
    shutil.copyfile(STACKS[stack] / ".env.example", env_file)
    out = subprocess.run([*compose, "-f", str(STACKS[stack] / "compose.yaml"), "--env-file", str(env_file), "config", "-q"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
