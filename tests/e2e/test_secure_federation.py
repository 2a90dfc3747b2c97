"""The default local federation is TLS + SuperNode authentication: real processes on loopback.

One federation (2 plants, small data) serves every test in this file: a run completes over TLS, a key the
anchor never registered is refused, a kit with the wrong CA fails its handshake, and a revoked plant cannot
come back while the other one can. Everything is stopped by PID when the module ends.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import httpx
import pytest

from fl_client.join import NotRegisteredError, cert_fingerprint, keygen, load_kit, short
from fl_server.federation.provision import init_federation
from maxfl.audit import AuditLog
from launcher.federation import FederationSettings, LocalFederation, find_app_dir
from tests.e2e.test_local_federation import _assert_nothing_left

pytestmark = pytest.mark.e2e


def _app_snapshot(dest: Path) -> Path:
    """The app exactly as `flwr run` would ship it now: the plants allow this FAB's hash, and an edit elsewhere in
    the working tree while the test runs (other people work in it) must not change what `flwr run` submits."""
    from maxfl.fab import build_fab

    fab, _, _ = build_fab(find_app_dir())
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        archive.extractall(dest, [n for n in archive.namelist() if not n.startswith(".info/")])
    return dest


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("secure")
    settings = FederationSettings(app_dir=_app_snapshot(root / "app"), workdir=root / "work", plants=2, examples_per_plant=40,
                                  run_overrides={"num-server-rounds": 1, "release": False})
    federation = LocalFederation(settings, echo=print)
    with federation:
        yield federation
    _assert_nothing_left(federation)


def _maxfl(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """`maxfl ARGS`; past `timeout` it gets SIGTERM, which makes maxfl stop whatever it started (by PID)."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    argv = [sys.executable, "-m", "maxfl", *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"`maxfl {' '.join(args[:2])}` still ran after {timeout:.0f}s: {err}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _one_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode != 0, result.stdout
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr + result.stdout, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _copy_kit(kit: Path, to: Path, **changes) -> Path:
    shutil.copytree(kit, to)
    info = json.loads((to / "kit.json").read_text())
    (to / "kit.json").write_text(json.dumps({**info, **changes}))
    return to


def test_a_run_completes_over_tls_with_node_authentication(fed):
    assert fed.secure and fed.federation is not None
    superlink_argv = next(m.popen.args for m in fed.procs.procs if m.name == "superlink")
    assert "--enable-supernode-auth" in superlink_argv and "--insecure" not in superlink_argv
    assert all("--insecure" not in m.popen.args and "--auth-supernode-private-key" in m.popen.args
               for m in fed.procs.procs if m.name.startswith("supernode-"))
    connection = tomllib.loads((fed.cli_home / "config.toml").read_text())["superlink"]["local"]
    assert connection == {"address": fed.superlink, "root-certificates": str(fed.federation.ca_cert)}
    with pytest.raises(httpx.HTTPError):  # nothing answers in plain HTTP
        httpx.get(f"http://{fed.superlink}/health", timeout=5)
    result = fed.submit_run()
    assert result.status == "finished:completed"
    assert sorted(p.plant_id for p in fed.plants) == ["plant-1", "plant-2"]


def test_a_key_the_anchor_never_registered_is_refused(fed, tmp_path):
    private, _, fingerprint = keygen(tmp_path / "intruder")
    # a kit the intruder forged from plant-1's (kits are not secret): it gets past every local check, not past the SuperLink
    kit = _copy_kit(fed.kits["plant-1"], tmp_path / "kit", plant_id="plant-9", key_fingerprint=fingerprint)
    result = _maxfl("plant", "join", "--kit", str(kit), "--key", str(private), "--no-warm", "--log-dir", str(tmp_path / "logs"),
                    "--node-config", f'plant-id="plant-9" data-dir="{tmp_path}"')
    _one_line(result, "SuperLink refused plant-9's key", "not registered", "maxfl federation add-plant plant-9")
    assert result.returncode == 4
    log = (tmp_path / "logs" / "supernode-plant-9.log").read_text()
    assert "Exit Code: 305" in log and "[code: 2004] Failed to activate SuperNode" in log  # what Flower says, verbatim


def test_a_kit_with_the_wrong_ca_fails_the_handshake_before_anything_starts(fed, tmp_path):
    other = init_federation(tmp_path / "other", "globex", "127.0.0.1:9092")
    kit = _copy_kit(fed.kits["plant-1"], tmp_path / "kit", ca_fingerprint=other.info.ca_fingerprint)
    shutil.copyfile(other.ca_cert, kit / "ca.crt")
    plant_1 = next(p for p in fed.plants if p.plant_id == "plant-1")
    result = _maxfl("plant", "join", "--kit", str(kit), "--key", str(fed.node_home(plant_1) / "keys" / "supernode.key"),
                    "--log-dir", str(tmp_path / "logs"), "--node-config", plant_1.as_node_config())
    # (the key check passes: plant-1's own key and fingerprint; the handshake is what fails)
    _one_line(result, "wrong CA", short(other.info.ca_fingerprint), "ask the anchor for a new kit")
    assert not (tmp_path / "logs").exists()  # nothing was started


def test_a_revoked_plant_cannot_join_again_and_the_other_plant_still_can(fed):
    node_ids = {p: load_kit(k).info.node_id for p, k in fed.kits.items()}
    result = _maxfl("federation", "revoke", "plant-2", "--dir", str(fed.federation_dir))
    assert result.returncode == 0, result.stderr
    assert "plant-2: revoked" in result.stdout
    # the SuperLink drops plant-2's connected SuperNode at once: its next heartbeat gets 401 and Flower's SuperNode
    # sends itself SIGINT (flwr/supernode/fleet_http_connection.py), which ends it with 0 or, when the signal lands
    # outside its handler, -SIGINT; either way it stops on its own
    node = next(m for m in fed.procs.procs if m.name == "supernode-plant-2")
    assert node.popen.wait(timeout=30) in (0, -signal.SIGINT)
    fed.stop_plant("plant-2")
    with pytest.raises(NotRegisteredError, match="SuperLink refused plant-2's key"):
        fed.restart_plant("plant-2")  # waits for the SuperNode to connect: it is refused
    assert not [m for m in fed.procs.procs if m.name.endswith("plant-2")]  # stopped, nothing left of it
    fed.stop_plant("plant-1")
    fed.restart_plant("plant-1")
    assert fed.wait_connected(["plant-1"], timeout_s=60) == {"plant-1": node_ids["plant-1"]}

    plants = json.loads((fed.federation_dir / "plants.json").read_text())["plants"]
    assert {p: r["status"] for p, r in plants.items()} == {"plant-1": "active", "plant-2": "revoked"}
    audit = AuditLog(fed.federation_dir / "audit.jsonl")
    assert audit.verify() == 5
    assert [(e.event, e.details.get("plant"), e.details.get("node_id")) for e in audit.events()][1:] == [
        ("serverapp.allowed", None, None),  # the app `maxfl federate` submits, the only one its executor runs
        ("plant.joined", "plant-1", node_ids["plant-1"]), ("plant.joined", "plant-2", node_ids["plant-2"]),
        ("plant.revoked", "plant-2", node_ids["plant-2"])]
    assert all(cert_fingerprint(load_kit(k).ca) == fed.federation.info.ca_fingerprint for k in fed.kits.values())
