"""What the plants' port exposes: the Fleet API and nothing else. Real processes on loopback, through the proxy.

The attacker holds what every join kit holds, the federation's `ca.crt`, and points the stock `flwr` CLI at the
plants' port (the proxy). Each attack from issue 15 -- list, register, unregister, run -- is refused there, while
the anchor's own CLI (the SuperLink's loopback port) still works and the plants still join and train.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fl_client.join import keygen, load_kit
from fl_server.federation.provision import init_federation
from launcher.federation import FederationSettings, LocalFederation
from launcher.processes import descendants, free_port, pid_alive
from tests.e2e.test_local_federation import _assert_nothing_left
from tests.e2e.test_secure_federation import _app_snapshot

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("exposure")
    settings = FederationSettings(app_dir=_app_snapshot(root / "app"), workdir=root / "work", plants=2, examples_per_plant=40,
                                  run_overrides={"num-server-rounds": 1, "release": False})
    federation = LocalFederation(settings, echo=print)
    with federation:
        yield federation
    _assert_nothing_left(federation)


@pytest.fixture(scope="module")
def attacker(fed, tmp_path_factory) -> Path:
    """A Flower CLI config with only a kit's ca.crt, aimed at the address in the kit (the plants' port)."""
    home = tmp_path_factory.mktemp("attacker")
    kit = load_kit(fed.kits["plant-1"])
    shutil.copyfile(kit.ca_path, home / "ca.crt")
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{kit.info.superlink_address}"\n'
                                      f'root-certificates = "{home / "ca.crt"}"\n')
    return home


def _flwr(home: Path, *args: str, timeout: float = 120) -> tuple[int, dict]:
    out = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], capture_output=True, text=True, env={**ENV, "FLWR_HOME": str(home)},
                         timeout=timeout, check=False)
    try:
        answer = json.loads(out.stdout[out.stdout.index("{"):])
    except ValueError:
        answer = {"raw": out.stdout + out.stderr}
    return out.returncode, answer


def _refused(home: Path, *args: str) -> str:
    _, answer = _flwr(home, *args)  # (`flwr --format json` exits 0 either way; the answer says)
    assert answer.get("success") is False, answer
    message = str(answer.get("error-message") or answer)
    assert "403 Forbidden" in message, message
    return message


def _nodes(fed) -> dict[int, str]:
    code, answer = _flwr(fed.cli_home, "supernode", "ls", "local")
    assert code == 0, answer
    return {int(n["node-id"]): n["status"] for n in answer["nodes"]}


def _runs(fed) -> list[int]:
    code, answer = _flwr(fed.cli_home, "ls", "local")
    assert code == 0, answer
    return [int(r["run-id"]) for r in answer["runs"]]


def test_the_kit_points_at_the_proxy_and_the_anchors_cli_at_the_superlink(fed):
    assert fed.plants_address != fed.superlink
    assert load_kit(fed.kits["plant-1"]).info.superlink_address == fed.plants_address == fed.federation.info.superlink_address
    proxy = next(m for m in fed.procs.procs if m.name == "proxy")
    assert Path(proxy.popen.args[0]).name == "caddy"
    link = next(m for m in fed.procs.procs if m.name == "superlink").popen.args
    assert link[link.index("--host") + 1] == "127.0.0.1"
    supernodes = [m.popen.args for m in fed.procs.procs if m.name.startswith("supernode-")]
    assert supernodes and all(a[a.index("--superlink") + 1] == fed.plants_address for a in supernodes)


def test_listing_plants_through_the_plants_port_is_refused(fed, attacker):
    _refused(attacker, "supernode", "ls", "local")
    assert len(_nodes(fed)) == 2  # the anchor's own CLI, on the SuperLink's loopback port, still lists them


def test_registering_a_key_through_the_plants_port_is_refused(fed, attacker, tmp_path):
    _, public, _ = keygen(tmp_path / "intruder")
    before = _nodes(fed)
    _refused(attacker, "supernode", "register", str(public), "local")
    assert _nodes(fed) == before


def test_unregistering_a_plant_through_the_plants_port_is_refused(fed, attacker):
    node_id = load_kit(fed.kits["plant-2"]).info.node_id
    _refused(attacker, "supernode", "unregister", str(node_id), "local")
    assert _nodes(fed)[node_id] == "online"


def test_running_a_serverapp_through_the_plants_port_is_refused(fed, attacker):
    before = _runs(fed)
    _refused(attacker, "run", str(fed.s.app_dir), "local")
    assert _runs(fed) == before


def test_a_serverapp_the_anchor_did_not_allow_is_refused_even_on_its_own_port(fed, tmp_path):
    """Defence in depth: whoever reaches the SuperLink's own (loopback) port still cannot run code on the anchor."""
    from maxfl.fab import fab_hash
    from maxfl.audit import AuditLog
    from tests.fl_server.federation.test_serverapp_policy import ROGUE_APP, ROGUE_PYPROJECT

    app = tmp_path / "rogue"
    app.mkdir()
    marker = tmp_path / "ran.txt"
    (app / "pyproject.toml").write_text(ROGUE_PYPROJECT.replace("MARKER", str(marker)))
    (app / "rogue_app.py").write_text(ROGUE_APP)
    out = subprocess.run([str(BIN / "flwr"), "run", str(app), "local", "--stream"], capture_output=True, text=True, timeout=300,
                         env={**ENV, "FLWR_HOME": str(fed.cli_home)}, check=False)
    assert not marker.exists(), out.stdout
    assert "the anchor refuses ServerApp someone/rogue 1.0.0" in out.stdout + out.stderr
    refused = [e for e in AuditLog(fed.audit_log).events() if e.event == "serverapp.refused"]
    assert [e.details["fab_hash"] for e in refused] == [fab_hash(app)]


def _raw(fed, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> tuple[int, str]:
    """One request with the path exactly as written (no client-side normalisation), TLS verified by the CA."""
    host, port = fed.plants_address.rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=ssl.create_default_context(cafile=str(fed.federation.ca_cert)), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


@pytest.mark.parametrize(("method", "path", "status"), [
    ("POST", "/v1/control/list-nodes", 403),
    ("POST", "/v1/runtime/acquire-task", 403),
    ("POST", "/v1/runtime/get-nodes", 403),
    ("GET", "/docs", 403),
    ("GET", "/openapi.json", 403),
    ("POST", "/v1/fleet/pull-messages/../../control/list-nodes", 403),
    ("POST", "/v1/fleet/%2e%2e/control/list-nodes", 403),
    ("POST", "/V1/CONTROL/list-nodes", 403),
    ("GET", "/v1/fleet/pull-messages", 404),  # the Fleet API is POST only
    ("POST", "/health", 404),
    ("GET", "/", 404),
])
def test_everything_but_the_fleet_api_is_refused_at_the_plants_port(fed, method, path, status):
    assert _raw(fed, method, path)[0] == status


def test_a_path_that_only_looks_like_the_fleet_api_reaches_the_fleet_api_as_written(fed):
    """Whatever the request spells, the SuperLink gets the literal Fleet path: here Flower's node authentication refuses it."""
    code, body = _raw(fed, "POST", "/v1/control/list-nodes/../../fleet/pull-messages", b"", {"Content-Type": "application/protobuf"})
    assert code == 401 and "Invalid SuperNode authentication" in body
    code, body = _raw(fed, "POST", "/v1/fleet/pull-messages?/v1/control/list-nodes", b"", {"Content-Type": "application/protobuf"})
    assert code == 401 and "Invalid SuperNode authentication" in body


def test_the_plants_still_train_through_the_proxy(fed):
    """Last in the module: after every attack above, both plants are online and a round completes."""
    assert set(_nodes(fed).values()) == {"online"}
    result = fed.submit_run()
    assert result.status == "finished:completed"
    assert httpx.get(f"https://{fed.plants_address}/health", verify=ssl.create_default_context(cafile=str(fed.federation.ca_cert))).is_success


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# ---------------------------------------------------------------- `maxfl federation superlink`: both processes, stopped by PID
@contextmanager
def _maxfl_foreground(*args: str, cwd: Path | None = None) -> Iterator[subprocess.Popen[str]]:
    """`maxfl ARGS` until it prints its `ready:` line; on exit SIGTERM, and every process it started must be gone."""
    proc = subprocess.Popen([sys.executable, "-m", "maxfl", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            cwd=cwd)
    seen: list[str] = []
    children: list[int] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("ready: "):
                break
        assert seen and seen[-1].startswith("ready: "), "".join(seen)
        proc.seen = seen  # type: ignore[attr-defined]
        children = descendants(proc.pid)
        yield proc
    finally:
        children = sorted(set(children) | set(descendants(proc.pid)))
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, "".join(seen) + rest
    assert not [pid for pid in children if pid_alive(pid)]
    assert "Traceback" not in rest


def test_the_superlink_command_runs_the_superlink_on_loopback_behind_the_proxy_with_its_executor_and_stops_all(tmp_path):
    port = free_port()
    fed = init_federation(tmp_path / "fed", "acme", f"127.0.0.1:{port}", control_address=f"127.0.0.1:{free_port()}")
    with _maxfl_foreground("federation", "superlink", "--dir", str(fed.dir), "--host", "127.0.0.1") as proc:
        assert proc.seen[-1].startswith(f"ready: plants join at 127.0.0.1:{port}")  # type: ignore[attr-defined]
        cmdlines = " | ".join(_cmdline(pid) for pid in descendants(proc.pid))
        assert "flower-superlink" in cmdlines and "caddy run --config" in cmdlines and "maxfl-superexec --federation-dir" in cmdlines, cmdlines
        assert "--isolation process" in cmdlines, "only the executor holding the SuperExec secret picks up ServerApps"
        tls = ssl.create_default_context(cafile=str(fed.ca_cert))
        assert httpx.get(f"https://127.0.0.1:{port}/health", verify=tls).is_success
        assert httpx.post(f"https://127.0.0.1:{port}/v1/control/list-nodes", verify=tls).status_code == 403
        code, answer = _flwr(fed.flwr_home, "supernode", "ls", "acme")  # the anchor's own config: the loopback SuperLink
        assert code == 0 and answer["nodes"] == [], answer
        # A key registered behind maxfl's back (as the open port allowed before the proxy): not in plants.json.
        _, public, _ = keygen(tmp_path / "intruder")
        _, answer = _flwr(fed.flwr_home, "supernode", "register", str(public), "acme")
        intruder = int(answer["node-id"])
    # The next start finds it and unregisters it before any plant is admitted.
    with _maxfl_foreground("federation", "superlink", "--dir", str(fed.dir), "--host", "127.0.0.1") as proc:
        said = "".join(proc.seen)  # type: ignore[attr-defined]
        assert f"1 node(s) registered outside maxfl ({intruder}), 1 unregistered" in said, said
        _, answer = _flwr(fed.flwr_home, "supernode", "ls", "acme")
        assert intruder not in {int(n["node-id"]) for n in answer["nodes"] if n["status"] != "unregistered"}, answer
    events = [e for e in fed.audit.events() if e.event == "node.unknown"]
    assert [(e.details["node_id"], e.details["action"]) for e in events] == [(intruder, "unregistered")]


# ---------------------------------------------------------------- remote admins: mutual TLS on the admin listener
def _client_cert(folder: Path, ca_cert: Path | None, ca_key: Path | None, name: str) -> tuple[Path, Path]:
    """A clientAuth certificate: from the federation CA (not on record as an admin), or self-signed (ca=None)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from fl_server.federation.provision import _pem, _pem_key, issue_client_cert, make_ca

    if ca_cert is None:
        ca, key = make_ca("forged", 30)
    else:
        ca, key = x509.load_pem_x509_certificate(ca_cert.read_bytes()), serialization.load_pem_private_key(ca_key.read_bytes(), None)
    cert, cert_key = issue_client_cert(ca, key, name, 30)
    folder.mkdir(parents=True)
    (folder / "c.crt").write_bytes(_pem(cert))
    (folder / "c.key").write_bytes(_pem_key(cert_key))
    return folder / "c.crt", folder / "c.key"


def _admin_status(address: str, ca: Path, cert: tuple[Path, Path] | None, path: str = "/v1/control/list-nodes") -> int | str:
    tls = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        tls.load_cert_chain(str(cert[0]), str(cert[1]))
    try:
        return httpx.post(f"https://{address}{path}", verify=tls, timeout=10, headers={"Content-Type": "application/protobuf"}).status_code
    except httpx.HTTPError as exc:  # the handshake refused: no (acceptable) client certificate
        return type(exc).__name__


def test_an_admin_certificate_from_the_ca_reaches_the_control_api_and_nothing_else_does(tmp_path):
    from fl_server.federation.provision import add_admin

    port, own, admin_port, tunnel_port = free_port(), free_port(), free_port(), free_port()
    fed = init_federation(tmp_path / "fed", "acme", f"127.0.0.1:{port}", control_address=f"127.0.0.1:{own}")
    _, bundle = add_admin(fed, "alice", f"127.0.0.1:{admin_port}")
    admin = f"127.0.0.1:{admin_port}"
    with _maxfl_foreground("federation", "superlink", "--dir", str(fed.dir), "--host", "127.0.0.1", "--admin-port", str(admin_port)):
        with _maxfl_foreground("federation", "admin-tunnel", "--admin", str(bundle), "--port", str(tunnel_port)) as tunnel:
            assert f"FLWR_HOME={bundle / 'flwr-home'}" in tunnel.seen[-1]  # type: ignore[attr-defined]
            _, answer = _flwr(bundle / "flwr-home", "supernode", "ls", "acme")  # the stock flwr CLI, through the tunnel
            assert answer.get("success") is not False and answer["nodes"] == [], answer
        alice = (bundle / "admin.crt", bundle / "admin.key")
        assert _admin_status(admin, fed.ca_cert, alice) == 200
        assert _admin_status(admin, fed.ca_cert, alice, "/v1/fleet/pull-messages") == 404  # the admin listener: Control API only
        assert _admin_status(admin, fed.ca_cert, alice, "/v1/runtime/acquire-task") == 404
        refused = [_admin_status(admin, fed.ca_cert, None),  # no client certificate
                   _admin_status(admin, fed.ca_cert, _client_cert(tmp_path / "forged", None, None, "mallory")),  # another CA's
                   _admin_status(admin, fed.ca_cert, _client_cert(tmp_path / "unlisted", fed.ca_cert, fed.ca_key, "bob"))]  # not on record
        assert all(isinstance(r, str) for r in refused), refused
        attacker = tmp_path / "attacker"
        attacker.mkdir()
        (attacker / "config.toml").write_text(f'[superlink]\ndefault = "acme"\n\n[superlink.acme]\naddress = "{admin}"\n'
                                              f'root-certificates = "{fed.ca_cert}"\n')
        _, answer = _flwr(attacker, "supernode", "ls", "acme")  # the stock flwr CLI with only the CA: refused at the handshake
        assert answer.get("success") is False, answer


# ---------------------------------------------------------------- a plant that is not on loopback: its own network namespace
@dataclass(frozen=True)
class Namespace:
    name: str
    host_ip: str  # the anchor's end of the veth pair: the proxy listens here
    plant_ip: str  # the namespace's end

    def argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root: the test creates a network namespace and a veth pair (CI runs as root)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` (apt-get install iproute2)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=False)
    return None if probe.returncode == 0 else f"`ip netns` is not available here: {probe.stderr.strip()}"


@pytest.fixture
def netns() -> Iterator[Namespace]:
    """A namespace joined to this host by its own veth pair (169.254.N.0/30, link-local, no route anywhere else)."""
    import secrets

    if (reason := _netns_unavailable()) is not None:
        pytest.skip(reason)
    used = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, timeout=30, check=True).stdout
    third = next(n for n in (secrets.randbelow(250) + 2 for _ in range(1000)) if f"169.254.{n}." not in used)
    tag = secrets.token_hex(4)
    ns = Namespace(f"maxfl-{tag}", f"169.254.{third}.1", f"169.254.{third}.2")
    host_end, plant_end = f"mxh{tag}", f"mxp{tag}"
    try:
        _ip("netns", "add", ns.name)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", plant_end)
        _ip("link", "set", plant_end, "netns", ns.name)
        _ip("addr", "add", f"{ns.host_ip}/30", "dev", host_end)
        _ip("link", "set", host_end, "up")
        _ip("netns", "exec", ns.name, "ip", "addr", "add", f"{ns.plant_ip}/30", "dev", plant_end)
        _ip("netns", "exec", ns.name, "ip", "link", "set", plant_end, "up")
        _ip("netns", "exec", ns.name, "ip", "link", "set", "lo", "up")  # the SuperNode's own Runtime API
        yield ns
    finally:
        pids = subprocess.run(["ip", "netns", "pids", ns.name], capture_output=True, text=True, timeout=30, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "link", "del", host_end], capture_output=True, timeout=30, check=False)
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, timeout=30, check=False)
        assert ns.name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=False).stdout


_PROBE = """
import json, socket, ssl, sys, urllib.request, urllib.error
host, plants_port, own_port, ca = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def connect(h, p):
    try:
        socket.create_connection((h, p), timeout=5).close()
        return "open"
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return type(exc).__name__
def status(method, path):
    req = urllib.request.Request(f"https://{host}:{plants_port}{path}", method=method, data=b"" if method == "POST" else None)
    try:
        return urllib.request.urlopen(req, context=ssl.create_default_context(cafile=ca), timeout=10).status
    except urllib.error.HTTPError as exc:
        return exc.code
print(json.dumps({"superlink_port": connect(host, own_port), "superlink_loopback": connect("127.0.0.1", own_port),
                  "health": status("GET", "/health"), "list_nodes": status("POST", "/v1/control/list-nodes"),
                  "start_run": status("POST", "/v1/control/start-run"), "runtime": status("POST", "/v1/runtime/acquire-task")}))
"""


def test_a_plant_outside_loopback_joins_through_the_proxy_and_reaches_nothing_else(netns, tmp_path):
    from maxfl.fab import fab_hash
    from fl_client.config import PlantConfig
    from fl_client.join import node_id_from_log
    from fl_server.federation.provision import add_plant
    from fl_server.federation.proxy import port_free
    from tasks import get_task

    port = next(p for p in iter(free_port, None) if port_free(f"{netns.host_ip}:{p}"))
    own = free_port()
    fed = init_federation(tmp_path / "fed", "acme", f"{netns.host_ip}:{port}", control_address=f"127.0.0.1:{own}")
    app = _app_snapshot(tmp_path / "app")
    data = get_task("defect").prepare_plants(1, tmp_path / "data", 42, 40)[0]
    _, public, _ = keygen(tmp_path / "keys")
    plant = PlantConfig(plant_id="plant-1", data_dir=data, max_epsilon=50.0, allowed_apps=fab_hash(app), audit_log=tmp_path / "plant" / "audit.jsonl",
                        ledger=tmp_path / "plant" / "ledger.json", edge_store=tmp_path / "plant" / "edge")
    with _maxfl_foreground("federation", "superlink", "--dir", str(fed.dir), "--host", netns.host_ip, cwd=tmp_path):
        _, kit = add_plant(fed, "plant-1", public)  # the anchor's own CLI: the SuperLink's loopback port
        probe = subprocess.run(netns.argv(sys.executable, "-c", _PROBE, netns.host_ip, str(port), str(own), str(fed.ca_cert)),
                               capture_output=True, text=True, timeout=120, check=True)
        seen = json.loads(probe.stdout)
        assert seen == {"superlink_port": "refused", "superlink_loopback": "refused", "health": 200, "list_nodes": 403,
                        "start_run": 403, "runtime": 403}, seen
        logs = tmp_path / "plant-logs"
        env = {**ENV, "MAXFL_HOME": str(tmp_path / "plant"), "FLWR_HOME": str(tmp_path / "plant-flwr"), "OMP_NUM_THREADS": "1"}
        join = subprocess.Popen(netns.argv(str(BIN / "maxfl"), "plant", "join", "--kit", str(kit), "--key", str(tmp_path / "keys" / "supernode.key"),
                                           "--federation", "acme", "--log-dir", str(logs), "--node-config", plant.as_node_config()),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            assert join.stdout is not None
            said = []
            for line in join.stdout:
                said.append(line)
                if "connected as node" in line:
                    break
            assert "connected as node" in said[-1], "".join(said)
            assert node_id_from_log((logs / "supernode-plant-1.log").read_text()) == load_kit(kit).info.node_id
            subprocess.run([sys.executable, "-m", "maxfl", "federation", "allow-serverapp", str(app), "--dir", str(fed.dir)], env=ENV,
                           check=True, timeout=120)  # the anchor runs this ServerApp (its executor refuses any other)
            config = tmp_path / "run.toml"
            config.write_text(f'num-server-rounds = 1\nmin-plants = 1\nrelease = false\ntracking-uri = "sqlite:///{tmp_path / "mlflow.db"}"\n')
            run = subprocess.run([str(BIN / "flwr"), "run", str(app), "acme", "--stream", "--run-config", str(config)], capture_output=True, text=True,
                                 env={**ENV, "FLWR_HOME": str(fed.flwr_home)}, timeout=900, check=False, cwd=tmp_path)
            assert "Successfully started run" in run.stdout, run.stdout + run.stderr
            _, listing = _flwr(fed.flwr_home, "ls", "acme")
            assert [r["status"] for r in listing["runs"]] == ["finished:completed"], run.stdout[-3000:]
        finally:
            join.send_signal(signal.SIGTERM)
            join.communicate(timeout=60)
