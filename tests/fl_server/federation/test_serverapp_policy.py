"""The anchor runs only ServerApps whose FAB hash it allowed; others are refused before installation, and audited."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fl_server.federation.serverapp_policy import (
    ALLOWED_ENV, ALLOWED_FILE, FEDERATION_ENV, ServerAppPolicy, ServerAppRefused, allow_serverapp, disallow_serverapp, guard_install,
    install_gate, read_allowed, superexec_argv,
)
from maxfl.audit import AuditLog

FAB = b"PK\x03\x04 a FAB the anchor built"
OTHER = b"PK\x03\x04 a FAB somebody else submitted"


def _events(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def federation(tmp_path):
    (tmp_path / ALLOWED_FILE).write_text(f"# the anchor's ServerApps\n{hashlib.sha256(FAB).hexdigest()}  # maxfl 0.3\n")
    return tmp_path


def test_a_serverapp_with_an_unknown_hash_is_refused_before_it_is_installed(federation):
    installed = []
    install = guard_install(lambda content, *a, **k: installed.append(content), lambda: ServerAppPolicy.from_env({FEDERATION_ENV: str(federation)}),
                            run_id=lambda: 7)
    with pytest.raises(ServerAppRefused) as exc:
        install(OTHER, skip_prompt=True)
    assert installed == []
    assert "the anchor refuses a ServerApp" in str(exc.value) and "not in" in str(exc.value) and "\n" not in str(exc.value)
    (event,) = _events(federation / "audit.jsonl")
    assert event["event"] == "serverapp.refused" and event["details"]["fab_hash"] == hashlib.sha256(OTHER).hexdigest()
    assert event["details"]["run_id"] == 7


def test_an_allowed_serverapp_is_installed_from_exactly_the_checked_bytes(federation):
    installed = []
    install = guard_install(lambda content, *a, **k: installed.append(content), lambda: ServerAppPolicy.from_env({FEDERATION_ENV: str(federation)}))
    install(FAB, skip_prompt=True)
    assert installed == [FAB]
    assert [e["event"] for e in _events(federation / "audit.jsonl")] == ["serverapp.accepted"]


def test_with_no_allowed_hashes_no_serverapp_runs(tmp_path):
    policy = ServerAppPolicy.from_env({FEDERATION_ENV: str(tmp_path)})
    with pytest.raises(ServerAppRefused, match="allows no ServerApp yet"):
        policy.check(hashlib.sha256(FAB).hexdigest())


def test_hashes_can_also_come_from_the_environment(tmp_path):
    policy = ServerAppPolicy.from_env({ALLOWED_ENV: hashlib.sha256(FAB).hexdigest().upper(), "MAXFL_ANCHOR_AUDIT_LOG": str(tmp_path / "a.jsonl")})
    policy.check(hashlib.sha256(FAB).hexdigest())
    with pytest.raises(ServerAppRefused, match="one two"):
        ServerAppPolicy.from_env({ALLOWED_ENV: "one two"})


def test_a_broken_allowed_file_names_its_line(tmp_path):
    (tmp_path / ALLOWED_FILE).write_text("# ok\nnot-a-hash\n")
    with pytest.raises(ServerAppRefused, match="line 2 is not a SHA-256 hash"):
        read_allowed(tmp_path / ALLOWED_FILE)


def test_allowing_and_disallowing_edit_the_list_atomically_and_are_audited(tmp_path):
    from fl_server.federation.provision import init_federation

    fed = init_federation(tmp_path / "fed", "acme", "127.0.0.1:9092")
    assert read_allowed(fed.allowed_serverapps) == frozenset(), "a new federation runs no ServerApp"
    fab = tmp_path / "app.fab"
    fab.write_bytes(FAB)
    digest = hashlib.sha256(FAB).hexdigest()
    assert allow_serverapp(fed.dir, str(fab), fed.audit) == (digest, True)
    assert allow_serverapp(fed.dir, digest.upper(), fed.audit) == (digest, False)  # already there: unchanged
    other = hashlib.sha256(OTHER).hexdigest()
    allow_serverapp(fed.dir, other, fed.audit)
    assert read_allowed(fed.allowed_serverapps) == {digest, other}
    assert fed.allowed_serverapps.read_text().startswith("# The ServerApps this anchor runs")  # the header stays
    assert disallow_serverapp(fed.dir, digest, fed.audit) == (digest, True)
    assert disallow_serverapp(fed.dir, digest, fed.audit) == (digest, False)
    assert read_allowed(fed.allowed_serverapps) == {other}
    events = [e.event for e in fed.audit.events()]
    assert events.count("serverapp.allowed") == 2 and events.count("serverapp.disallowed") == 1
    with pytest.raises(ServerAppRefused, match="neither a SHA-256 hash"):
        allow_serverapp(fed.dir, str(tmp_path / "nowhere"), fed.audit)
    assert read_allowed(fed.allowed_serverapps) == {other}


def test_the_cli_allows_an_app_folder_by_the_hash_flwr_run_submits(tmp_path):
    from typer.testing import CliRunner

    from maxfl.fab import fab_hash
    from fl_server.federation.provision import init_federation
    from launcher.cli import app

    fed = init_federation(tmp_path / "fed", "acme", "127.0.0.1:9092")
    folder = tmp_path / "rogue"
    folder.mkdir()
    (folder / "pyproject.toml").write_text(ROGUE_PYPROJECT.replace("MARKER", "x"))
    (folder / "rogue_app.py").write_text(ROGUE_APP)
    out = CliRunner().invoke(app, ["federation", "allow-serverapp", str(folder), "--dir", str(fed.dir)])
    assert out.exit_code == 0, out.output
    assert read_allowed(fed.allowed_serverapps) == {fab_hash(folder)}
    assert "someone/rogue 1.0.0" in fed.allowed_serverapps.read_text()  # the line says which app it is
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "maxfl", "federation", "disallow-serverapp", "0" * 64, "--dir", str(fed.dir)],
                         capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "is not in" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_the_executor_argv_is_flowers_superexec_with_the_federation_folder():
    argv = superexec_argv(Path("/venv/bin"), "127.0.0.1:9093", Path("/s"), Path("/fed"), Path("/fed/ca.crt"), parent_pid=7)
    assert argv == ["/venv/bin/maxfl-superexec", "--federation-dir", "/fed", "--runtime-api-address", "127.0.0.1:9093",
                    "--root-certificates", "/fed/ca.crt", "--superexec-auth-secret-file", "/s", "--parent-pid", "7"]
    assert "--insecure" in superexec_argv(Path("/b"), "127.0.0.1:1", Path("/s"), None, None)


def test_the_gate_goes_into_flowers_serverapp_runtime(monkeypatch, federation):
    import importlib

    runtime = importlib.import_module("flwr.superlink.runtime.run_serverapp")

    installed = []
    monkeypatch.setattr(runtime, "install_from_fab", lambda content, *a, **k: installed.append(content))
    monkeypatch.setenv(FEDERATION_ENV, str(federation))
    install_gate(runtime)
    with pytest.raises(ServerAppRefused):
        runtime.install_from_fab(OTHER, skip_prompt=True)
    runtime.install_from_fab(FAB, skip_prompt=True)
    assert installed == [FAB]


# ------------------------------------------------------------------ real processes: SuperLink, maxfl-superexec, flwr run
ROGUE_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "rogue"
version = "1.0.0"
dependencies = ["flwr"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "someone"

[tool.flwr.app.components]
serverapp = "rogue_app:app"
clientapp = "rogue_app:client"

[tool.flwr.app.config]
marker = "MARKER"
"""

ROGUE_APP = """import pathlib
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

app = ServerApp()
client = ClientApp()


@app.main()
def main(grid, context):
    pathlib.Path(context.run_config["marker"]).write_text("ran on the anchor")
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc) -> None:
    import time
    import urllib.request

    while proc.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the SuperLink exited with {proc.returncode} before answering")


@pytest.mark.e2e
def test_a_submitted_serverapp_with_an_unknown_hash_never_runs_on_the_anchor(tmp_path):
    import os
    import secrets
    import subprocess
    import sys
    from pathlib import Path

    from maxfl.fab import fab_hash

    bin_dir = Path(sys.executable).parent
    fed = tmp_path / "federation"
    fed.mkdir()
    app = tmp_path / "rogue"
    app.mkdir()
    marker = tmp_path / "ran.txt"
    (app / "pyproject.toml").write_text(ROGUE_PYPROJECT.replace("MARKER", str(marker)))
    (app / "rogue_app.py").write_text(ROGUE_APP)
    secret = tmp_path / "superexec.secret"
    secret.write_text(secrets.token_hex(32))
    port = _free_port()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_HOME": str(tmp_path / "flwr-home"),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    (tmp_path / "flwr-home").mkdir()
    (tmp_path / "flwr-home" / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    logs = tmp_path / "logs"
    logs.mkdir()
    superlink = subprocess.Popen([str(bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                                  "--isolation", "process", "--superexec-auth-secret-file", str(secret),
                                  "--disable-runtime-dependency-installation", "--database", str(tmp_path / "state.db")],
                                 env=env, stdout=(logs / "superlink.log").open("w"), stderr=subprocess.STDOUT)
    superexec = None
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", superlink)
        superexec = subprocess.Popen(superexec_argv(bin_dir, f"127.0.0.1:{port}", secret, fed, None, parent_pid=superlink.pid),
                                     env=env, stdout=(logs / "superexec.log").open("w"), stderr=subprocess.STDOUT)

        def submit() -> str:
            out = subprocess.run([str(bin_dir / "flwr"), "run", str(app), "local", "--stream"], env=env, capture_output=True, text=True, timeout=300)
            return out.stdout + out.stderr

        output = submit()
        assert not marker.exists(), output
        assert "the anchor refuses ServerApp someone/rogue 1.0.0" in output  # `flwr run --stream` shows why
        events = _events(fed / "audit.jsonl")
        assert [e["event"] for e in events] == ["serverapp.refused"], output
        assert events[0]["details"]["fab_hash"] == fab_hash(app) and events[0]["details"]["fab_id"] == "someone/rogue"

        (fed / ALLOWED_FILE).write_text(fab_hash(app) + "\n")  # the anchor allows it: the same path now runs it
        output = submit()
        assert marker.read_text() == "ran on the anchor", output
        assert [e["event"] for e in _events(fed / "audit.jsonl")] == ["serverapp.refused", "serverapp.accepted"]
    finally:
        for proc in (superexec, superlink):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
