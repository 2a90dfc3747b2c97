"""The compose topology as plain processes: every command line is the one in compose/*/compose.yaml.

No Docker engine here, so each service runs as a process on loopback with its container paths, service names
and ports mapped to local ones (the only changes; MLflow on SQLite instead of PostgreSQL). What this adds to
tests/e2e: the ServerApp in its own executor process (`--isolation process`, attached over TLS with the
SuperExec secret), the healthcheck probes against the real services, the plant's node config from the compose
file, and the README's path: federation init with --san superlink, add-plant, plant join with the kit,
`flwr run` with the admin's Flower config -- then the model reaches the plant's edge server.
"""

from __future__ import annotations

import io
import json
import os
import ssl
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.compose.test_compose import argv, env_example, flag, healthcheck_argv, healthcheck_module, interpolate_tree, raw, services

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1", **extra}


def _mapped(args: list[str], table: dict[str, str]) -> list[str]:
    out = []
    for a in args:
        for container, local in table.items():
            a = a.replace(container, local)
        out.append(a)
    return out


def _healthy(args: list[str]) -> Callable[[], bool]:
    return lambda: healthcheck_module().main(args[1:] + ["--timeout", "2"]) == 0


def _edge_health(url: str) -> dict[str, Any]:
    try:
        return httpx.get(f"{url}/health", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return {}


def _app_snapshot(dest: Path) -> tuple[Path, str]:
    """The app as `flwr run` ships it now, and its FAB hash (the plant's allowed-apps): later edits to the working
    tree by other people cannot change what this test submits."""
    import hashlib

    from maxfl.fab import build_fab
    from launcher.federation import find_app_dir

    fab, _, _ = build_fab(find_app_dir())
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        archive.extractall(dest, [n for n in archive.namelist() if not n.startswith(".info/")])
    return dest, hashlib.sha256(build_fab(dest)[0]).hexdigest()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from fl_client.join import keygen, load_kit
    from fl_server.federation.provision import add_plant, init_federation, load_federation
    from fl_server.federation.serverapp_policy import allow_serverapp
    from launcher.processes import ProcessGroup, descendants, free_port
    from tasks import get_task

    root = tmp_path_factory.mktemp("compose")
    app, app_hash = _app_snapshot(root / "app")
    anchor = services("anchor")
    sl_port, mlflow_port, health_port, runtime_port, edge_port, proxy_port = (free_port() for _ in range(6))
    procs = ProcessGroup(root / "logs")
    try:
        # ---- anchor: the admin's init as the README gives it (with --san superlink), the secret from .env
        # (the README's --control-address superlink:9092, mapped: the SuperLink's own port; plants get the proxy's)
        fed = init_federation(root / "federation", "compose", f"127.0.0.1:{proxy_port}", ["superlink"], control_address=f"127.0.0.1:{sl_port}")
        secret = root / "superexec.secret"
        secret.write_text(os.urandom(32).hex())
        table = {
            "/federation/": f"{fed.dir}/", "/run/secrets/superexec_secret": str(secret), "/var/lib/maxfl/superlink": str(root / "superlink-state"),
            "/var/lib/maxfl": str(root / "anchor-state"), "/var/lib/mlflow/artifacts": str(root / "mlflow-artifacts"), "superlink:9092": f"127.0.0.1:{sl_port}",
            "127.0.0.1:9092": f"127.0.0.1:{sl_port}", "127.0.0.1:5000": f"127.0.0.1:{mlflow_port}", "127.0.0.1:9095": f"127.0.0.1:{health_port}",
            "http://mlflow:5000": f"http://127.0.0.1:{mlflow_port}",
        }
        (root / "superlink-state").mkdir()
        (root / "mlflow-artifacts").mkdir()

        mlflow = _mapped(argv(anchor["mlflow"]), table)
        mlflow[mlflow.index("--backend-store-uri") + 1] = f"sqlite:///{root / 'mlflow.db'}"
        mlflow[mlflow.index("--port") + 1], mlflow[mlflow.index("--host") + 1] = str(mlflow_port), "127.0.0.1"
        proc = procs.start("mlflow", [str(BIN / "mlflow"), *mlflow[1:]], _env(**anchor["mlflow"]["environment"]))
        procs.wait_until("MLflow's healthcheck", _healthy(_mapped(healthcheck_argv(anchor["mlflow"]), table)), 180, proc)

        link = _mapped(argv(anchor["superlink"]), table)
        link[link.index("--port") + 1], link[link.index("--host") + 1] = str(sl_port), "127.0.0.1"
        proc = procs.start("superlink", [str(BIN / link[0]), *link[1:]], _env())
        procs.wait_until("the SuperLink's healthcheck", _healthy(_mapped(healthcheck_argv(anchor["superlink"]), table)), 120, proc)

        front = _mapped(argv(anchor["proxy"]), table)
        front[front.index("--dir") + 1], front[front.index("--host") + 1] = str(fed.dir), "127.0.0.1"
        front[front.index("--port") + 1], front[front.index("--state-dir") + 1] = str(proxy_port), str(root / "proxy-state")
        proc = procs.start("proxy", [str(BIN / "maxfl"), *front[1:]], _env())
        probe = _mapped(healthcheck_argv(anchor["proxy"]), {"/federation/": f"{fed.dir}/", "127.0.0.1:9092": f"127.0.0.1:{proxy_port}"})
        procs.wait_until("the proxy's healthcheck", _healthy(probe), 120, proc)

        executor = _mapped(argv(anchor["serverapp"]), table)
        executor[executor.index("--federation-dir") + 1] = str(fed.dir)  # the folder mounted at /federation
        allow_serverapp(fed.dir, app_hash, fed.audit)  # `maxfl federation allow-serverapp APP` as the README says
        env = {k: _mapped([v], table)[0] for k, v in anchor["serverapp"]["environment"].items()}
        proc = procs.start("serverapp", [str(BIN / executor[0]), *executor[1:]], _env(FLWR_HOME=str(root / "serverapp-home"), **env))
        procs.wait_until("the ServerApp executor's healthcheck", _healthy(_mapped(healthcheck_argv(anchor["serverapp"]), table)), 120, proc)

        # ---- the plant: its .env, its key, the kit the anchor issues for it
        data = get_task("defect").prepare_plants(1, root / "data", 42, 120)[0]
        plant_env = {**env_example("plant"), "PLANT_ID": "plant-1", "FEDERATION": "compose", "PLANT_DATA_DIR": str(data), "MAX_EPSILON": "50.0",
                     "ALLOWED_APPS": app_hash, "EDGE_PORT": str(edge_port)}
        plant = interpolate_tree(raw("plant"), plant_env)["services"]
        keys, state = root / "plant" / "keys", root / "plant" / "state"
        state.mkdir(parents=True)
        keygen(keys)
        _, kit = add_plant(load_federation(fed.dir), "plant-1", keys / "supernode.pub")
        ptable = {"/var/lib/maxfl": str(state), "/keys/": f"{keys}/", 'data-dir="/data"': f'data-dir="{data}"', "/kit": str(kit),
                  "127.0.0.1:9094": f"127.0.0.1:{runtime_port}", "127.0.0.1:8600": f"127.0.0.1:{edge_port}"}
        join = _mapped(argv(plant["supernode"]), ptable)
        join[join.index("--runtime-port") + 1] = str(runtime_port)
        penv = _env(MAXFL_HOME=str(state), FLWR_HOME=str(root / "plant" / "flwr"), OMP_NUM_THREADS="1")
        proc = procs.start("supernode", [str(BIN / "maxfl"), *join[1:]], penv)
        procs.wait_until("the SuperNode's healthcheck", _healthy(_mapped(healthcheck_argv(plant["supernode"]), ptable)), 120, proc)
        edge = _mapped(argv(plant["edge"]), ptable)
        edge[edge.index("--port") + 1], edge[edge.index("--host") + 1] = str(edge_port), "127.0.0.1"
        proc = procs.start("edge", [str(BIN / "maxfl"), *edge[1:]], _env(MAXFL_HOME=str(state), OMP_NUM_THREADS="1"))
        procs.wait_until("the edge server's healthcheck", _healthy(_mapped(healthcheck_argv(plant["edge"]), ptable)), 120, proc)
        assert load_kit(kit).info.superlink_address == f"127.0.0.1:{proxy_port}", "the plant joins through the proxy"
        yield {"root": root, "app": app, "app_hash": app_hash, "fed": fed, "sl_port": sl_port, "proxy_port": proxy_port, "edge": f"http://127.0.0.1:{edge_port}",
               "state": state, "procs": procs}
    finally:
        # Every service stops on SIGTERM, as `docker compose down` asks it to; the grace is for a loaded machine,
        # not a speed the test asks for.
        killed = procs.stop_all(grace_s=300)
        assert not killed, f"had to kill {killed}"
        assert descendants(os.getpid()) == []


def test_a_superexec_without_the_secret_gets_no_run(stack: dict[str, Any]) -> None:
    """The Runtime API listens on the public SuperLink port; without the SuperExec secret it hands out nothing."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    # No retry invoker: Flower's own answers a 401 by interrupting its process.
    client = RuntimeHttpClient.from_server_address(
        server_address=f"127.0.0.1:{stack['sl_port']}", insecure=False, root_certificates=stack["fed"].ca_cert.read_bytes(),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
    )
    try:
        with pytest.raises(httpx.HTTPStatusError) as refused:
            client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP]))
    finally:
        client.close()
    assert refused.value.response.status_code == 401 and "Authentication failed" in refused.value.response.text
    # and the plants' port (the proxy) does not serve the Runtime API at all
    tls = ssl.create_default_context(cafile=str(stack["fed"].ca_cert))
    assert httpx.post(f"https://127.0.0.1:{stack['proxy_port']}/v1/runtime/acquire-task", verify=tls).status_code == 403


def test_a_run_submitted_as_the_readme_says_trains_releases_and_reaches_the_edge(stack: dict[str, Any]) -> None:
    fed = stack["fed"]
    env = _env(FLWR_HOME=str(fed.flwr_home))
    config = stack["root"] / "run.toml"
    # tracking-uri stays empty: the executor's MLFLOW_TRACKING_URI. One DP round of 96 cells may or may not beat the
    # constant answer (the noise is fresh OS entropy): the trivial-baseline rule is off, so the path is what this test
    # decides (tests/fl_server/release/test_gate.py checks the rule).
    config.write_text("num-server-rounds = 1\nmin-plants = 1\ntarget-epsilon = 40.0\ngate-trivial-margin = -1.0\n")
    run = subprocess.run([str(BIN / "flwr"), "run", str(stack["app"]), fed.info.name, "--stream", "--run-config", str(config)],
                         capture_output=True, text=True, env=env, timeout=900, check=False)
    assert "Successfully started run" in run.stdout, run.stdout + run.stderr
    listing = subprocess.run([str(BIN / "flwr"), "ls", fed.info.name, "--format", "json"], capture_output=True, text=True, env=env, timeout=60, check=False)
    (status,) = [r["status"] for r in json.loads(listing.stdout)["runs"]]
    assert status == "finished:completed", run.stdout[-3000:]
    try:
        stack["procs"].wait_until("the edge server to serve the pushed model", lambda: _edge_health(stack["edge"]).get("status") == "serving", 30)
    except Exception as exc:  # noqa: BLE001 - say what the run said
        pytest.fail(f"{exc}; the run said: {run.stdout[-3000:]}")
    health = _edge_health(stack["edge"])
    assert health["model"]["version"] == 1 and health["plant"] == "plant-1"
    from maxfl.audit import AuditLog

    anchor_events = list(AuditLog(stack["root"] / "anchor-state" / "anchor" / "audit.jsonl").events())
    assert [e.details["fab_hash"] for e in anchor_events if e.event == "serverapp.accepted"] == [stack["app_hash"]], "the executor checked the app"
    state = stack["state"]
    node_config = flag(argv(services("plant")["supernode"]), "--node-config")
    assert "/var/lib/maxfl/ledger.json" in node_config and (state / "ledger.json").is_file(), "the ledger lands on the plant-state volume"
    assert (state / "audit.jsonl").is_file() and (state / "logs").is_dir()
