"""The plant decides what runs on its node: allowed FAB hashes only, refusals audited, fail closed."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from fl_client.app_policy import AppGate, AppPolicy, AppRefused, check_task
from maxfl.fab import build_fab, fab_hash
from fl_client.config import PlantConfig
from maxfl.audit import AuditLog
from maxfl.errors import ConfigError

H1, H2 = "1" * 64, "ab" * 32

SERVER_APP = '''
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    want = int(context.run_config["nodes"])
    deadline = time.monotonic() + 60
    nodes = list(grid.get_node_ids())
    while len(nodes) < want and time.monotonic() < deadline:
        time.sleep(0.2)
        nodes = list(grid.get_node_ids())
    msgs = [Message(RecordDict({"q": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="query") for n in nodes]
    replies = grid.send_and_receive(msgs, timeout=90)
    out = [{"node": r.metadata.src_node_id, "error": r.error.reason if r.has_error() else None,
            "plant": None if r.has_error() else r.content["a"]["plant"]} for r in replies]
    Path(str(context.run_config["out"])).write_text(json.dumps(out))
'''

CLIENT_APP = '''
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"a": ConfigRecord({"plant": str(context.node_config["plant-id"])})}), reply_to=msg)
'''


def make_app(root: Path, name: str = "tinyapp") -> Path:
    app = root / name
    (app / name).mkdir(parents=True)
    (app / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"

        [project]
        name = "{name}"
        version = "0.1.0"
        dependencies = []

        [tool.flwr.app]
        publisher = "acme"

        [tool.flwr.app.components]
        serverapp = "{name}.server_app:app"
        clientapp = "{name}.client_app:app"

        [tool.flwr.app.config]
        out = ""
        nodes = 1
        """))
    (app / name / "__init__.py").write_text("")
    (app / name / "server_app.py").write_text(SERVER_APP)
    (app / name / "client_app.py").write_text(CLIENT_APP)
    (app / ".gitignore").write_text("scratch/\n")
    return app


def plant(tmp_path: Path, **extra: object) -> PlantConfig:
    return PlantConfig(plant_id="plant-2", data_dir=tmp_path / "data", audit_log=tmp_path / "audit" / "plant-2.jsonl", **extra)


def events(path: Path) -> list[tuple[str, dict]]:
    return [(e.event, e.details) for e in AuditLog(path).events()]


# ------------------------------------------------------------------------------------------ node config
def test_node_config_keys_round_trip_and_default_to_nothing_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("MAXFL_HOME", str(tmp_path / "home"))
    bare = PlantConfig.from_node_config('plant-id="plant-2" data-dir="/data"')
    assert bare.allowed_apps is None and bare.audit_log is None
    assert bare.audit_log_path() == tmp_path / "home" / "audit" / "plant-2.jsonl"
    assert "allowed-apps" not in bare.as_node_config()

    cfg = PlantConfig.from_node_config(f'plant-id="plant-2" data-dir="/data" allowed-apps=" {H1.upper()} , {H2},{H1}" audit-log="/a/p2.jsonl"')
    assert cfg.allowed_apps == f"{H1},{H2}"
    assert cfg.audit_log_path() == Path("/a/p2.jsonl")
    assert PlantConfig.from_node_config(cfg.as_node_config()) == cfg
    assert PlantConfig.from_node_config('plant-id="plant-2" data-dir="/d" allowed-apps="any"').allowed_apps == "any"


@pytest.mark.parametrize("value", ["3f2a", f"{H1},zz", f"any,{H1}", "sha256:" + H1])
def test_a_malformed_allowed_apps_is_a_one_line_config_error(value):
    with pytest.raises(ConfigError) as exc:
        PlantConfig.from_node_config(f'plant-id="plant-2" data-dir="/d" allowed-apps="{value}"')
    message = str(exc.value)
    assert "\n" not in message and "'allowed-apps'" in message
    assert "maxfl app hash" in message or '"any" stands alone' in message


# ------------------------------------------------------------------------------------------ the policy
def test_an_allowed_hash_runs_and_its_first_acceptance_per_run_is_audited(tmp_path):
    policy = AppPolicy.from_plant(plant(tmp_path, allowed_apps=f"{H1},{H2}"))
    for _ in range(3):
        policy.check(H2.upper(), "acme/app", "1.0", run_id=7)
    policy.check(H2, "acme/app", "1.0", run_id=8)
    assert events(policy.audit_log) == [
        ("app.accepted", {"fab_hash": H2, "fab_id": "acme/app", "fab_version": "1.0", "run_id": 7}),
        ("app.accepted", {"fab_hash": H2, "fab_id": "acme/app", "fab_version": "1.0", "run_id": 8}),
    ]
    assert AuditLog(policy.audit_log).verify() == 2


def test_an_app_not_allowed_is_refused_in_one_line_and_every_refusal_is_audited(tmp_path):
    policy = AppPolicy.from_plant(plant(tmp_path, allowed_apps=H1))
    for _ in range(2):
        with pytest.raises(AppRefused) as exc:
            policy.check(H2, "maxfl/maxfl", "0.1.0", run_id=3)
    assert str(exc.value) == (f"plant-2 refuses app maxfl/maxfl 0.1.0 (sha256 {H2[:12]}…): not in this plant's allowed-apps; "
                              "if you trust it, add its hash to the node config (maxfl app hash prints it)")
    logged = events(policy.audit_log)
    assert [e for e, _ in logged] == ["app.refused", "app.refused"]
    assert logged[0][1] | {"reason": None} == {"fab_hash": H2, "fab_id": "maxfl/maxfl", "fab_version": "0.1.0", "run_id": 3, "reason": None}
    assert all(e.actor == "plant-2" for e in AuditLog(policy.audit_log).events())


def test_without_allowed_apps_the_plant_runs_nothing(tmp_path):
    policy = AppPolicy.from_plant(plant(tmp_path))
    with pytest.raises(AppRefused, match="sets no allowed-apps, so it runs no app"):
        policy.check(H1, "acme/app", "1.0", run_id=1)
    assert [e for e, _ in events(policy.audit_log)] == ["app.refused"]


def test_any_must_be_explicit_and_then_runs_every_app_on_record(tmp_path):
    policy = AppPolicy.from_plant(plant(tmp_path, allowed_apps="any"))
    policy.check(H1, "acme/a", "1", run_id=1)
    policy.check(H2, "acme/b", "1", run_id=1)
    assert [d["fab_hash"] for _, d in events(policy.audit_log)] == [H1, H2]
    with pytest.raises(AppRefused, match="without a valid SHA-256 hash"):
        policy.check("", "acme/c", "1", run_id=1)


def test_a_plant_that_cannot_write_its_audit_log_runs_nothing(tmp_path):
    (tmp_path / "audit").write_text("a file where the audit folder should be")
    policy = AppPolicy.from_plant(plant(tmp_path, allowed_apps=H1))
    with pytest.raises(AppRefused, match="cannot record running it in its audit log"):
        policy.check(H1, "acme/app", "1.0", run_id=1)
    with pytest.raises(AppRefused, match="could not record this in"):
        policy.check(H2, "acme/app", "1.0", run_id=1)


# ------------------------------------------------------------------------------------------ FAB hashes
def test_fab_hash_is_deterministic_and_follows_the_files_flower_packs(tmp_path):
    app = make_app(tmp_path)
    first = fab_hash(app)
    assert len(first) == 64 and fab_hash(app) == first
    os.utime(app / "tinyapp" / "client_app.py", (1, 1))  # timestamps are not in a FAB (Flower fixes them)
    (app / "scratch").mkdir()
    (app / "scratch" / "notes.py").write_text("ignored by .gitignore")
    (app / "tinyapp" / "data.bin").write_bytes(b"not a file type a FAB carries")
    assert fab_hash(app) == first
    fab, fab_id, version = build_fab(app)
    assert (hashlib.sha256(fab).hexdigest(), fab_id, version) == (first, "acme/tinyapp", "0.1.0")

    (app / "tinyapp" / "client_app.py").write_text(CLIENT_APP + "\n# one more line\n")
    assert fab_hash(app) != first


def test_fab_hash_in_a_fresh_process_equals_flowers_own_build(tmp_path):
    app = make_app(tmp_path)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    code = "import sys; from pathlib import Path; from maxfl.fab import fab_hash; print(fab_hash(Path(sys.argv[1])))"
    other = subprocess.run([sys.executable, "-c", code, str(app)], capture_output=True, text=True, env=env, check=True, timeout=120)
    out = tmp_path / "built"
    out.mkdir()
    flwr = Path(sys.executable).parent / "flwr"
    subprocess.run([str(flwr), "build", "--app", str(app)], cwd=out, env={**env, "PYTHONPATH": str(app)}, capture_output=True, check=True, timeout=120)
    [built] = out.glob("*.fab")
    digest = hashlib.sha256(built.read_bytes()).hexdigest()
    assert other.stdout.strip() == digest == fab_hash(app) == fab_hash(built)
    assert built.name == f"acme.tinyapp.0-1-0.{digest[:8]}.fab"


def test_app_hash_command_prints_the_hash_and_names_a_bad_folder(tmp_path):
    import typer
    from typer.testing import CliRunner

    from fl_client.app_cli import app as app_cli

    root = typer.Typer()
    root.add_typer(app_cli, name="app")
    app = make_app(tmp_path)
    result = CliRunner().invoke(root, ["app", "hash", str(app)])
    assert result.exit_code == 0 and result.output.strip() == fab_hash(app)
    result = CliRunner().invoke(root, ["app", "hash", str(app), "--json"])
    assert json.loads(result.output) == {"fab-hash": fab_hash(app), "fab-id": "acme/tinyapp", "fab-version": "0.1.0"}
    result = CliRunner().invoke(root, ["app", "hash", str(tmp_path / "nowhere")])
    assert isinstance(result.exception, ConfigError) and "not a Flower app folder" in str(result.exception)


# ------------------------------------------------------------------------------------------ the executor's guard
def _fake_task(node_config: dict, content: bytes, declared: str, run_id: int = 5):  # noqa: ANN202
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.fab import Fab
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 11, run_id, 7
    message = Message(RecordDict({"q": ConfigRecord({"x": 1})}), dst_node_id=7, message_type="query")
    message.metadata.__dict__["_message_id"] = message.object_id
    context = Context(run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
    run = Run.create_empty(run_id)
    run.fab_id, run.fab_version, run.fab_hash = "acme/tinyapp", "0.1.0", declared
    return message, context, run, Fab(declared, content, {})


def test_check_task_uses_the_fabs_content_not_the_hash_it_came_with(tmp_path):
    audit = tmp_path / "audit.jsonl"
    cfg = {"plant-id": "plant-2", "data-dir": "/d", "audit-log": str(audit), "allowed-apps": H1}
    content = b"not really a FAB"
    _, context, run, fab = _fake_task(cfg, content, declared=H1)  # claims an allowed hash
    with pytest.raises(AppRefused, match="does not match the hash it came with"):
        check_task(context, run, fab)
    real = hashlib.sha256(content).hexdigest()
    assert events(audit)[-1][1]["fab_hash"] == real
    _, context, run, fab = _fake_task({**cfg, "allowed-apps": "3f2a"}, content, declared=real)
    with pytest.raises(AppRefused, match="its node config is not valid") as exc:
        check_task(context, run, fab)
    assert "\n" not in str(exc.value) and str(exc.value).startswith("plant-2 refuses app acme/tinyapp 0.1.0")


def test_the_gate_installs_only_the_bytes_it_allowed(tmp_path):
    cfg = {"plant-id": "plant-2", "data-dir": "/d", "audit-log": str(tmp_path / "a.jsonl")}
    content = b"fab bytes"
    task = _fake_task({**cfg, "allowed-apps": hashlib.sha256(content).hexdigest()}, content, hashlib.sha256(content).hexdigest())
    installed: list[bytes] = []
    gate = AppGate()
    pull = gate.wrap_pull(lambda client: task)
    install = gate.wrap_install(lambda fab, **kw: installed.append(fab) or tmp_path)
    with pytest.raises(AppRefused, match="did not check this FAB"):
        install(content, skip_prompt=True)  # no pull, no check
    assert pull(None) == task
    with pytest.raises(AppRefused, match="did not check this FAB"):
        install(b"other bytes", skip_prompt=True)
    assert install(content, skip_prompt=True) == tmp_path and installed == [content]
    # The next task of the run (a resident task process): checked again, installed once.
    assert pull(None) == task and install(content, skip_prompt=True) == tmp_path and installed == [content]
    refused = _fake_task({**cfg, "allowed-apps": H1}, content, hashlib.sha256(content).hexdigest())
    gate.wrap_pull(lambda client: refused)(None)  # the plant's policy changed: installed before, refused now
    with pytest.raises(AppRefused):
        install(content, skip_prompt=True)


def _run_forked(tmp_path: Path, node_config: dict, content: bytes) -> tuple[int, list]:
    """fl_client.warm_exec's task process, forked as the executor forks it, on a faked pulled task.

    Flower's own `run_clientapp` runs for real; only its transport is faked: the pull returns the task, the
    pushes are recorded, and the original install only notes that it ran (then stops the app).
    """
    out = tmp_path / "forked.json"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 99
        try:
            import flwr.supernode.runtime.run_clientapp as runtime

            from fl_client import warm_exec

            seen: list = []

            class NoHeartbeat:
                is_running = False

                def __init__(self, fn: object) -> None: ...
                def start(self) -> None: ...
                def stop(self) -> None: ...

            def install(fab: bytes, **kwargs: object) -> Path:
                seen.append(["installed", hashlib.sha256(fab).hexdigest()])
                raise RuntimeError("test: stop after the install")

            digest = hashlib.sha256(content).hexdigest()
            runtime.pull_task_input = lambda client: _fake_task(node_config, content, digest)
            runtime.install_from_fab = install
            runtime.push_message = lambda client, message, context: seen.append(
                ["reply", message.error.code if message.has_error() else None, message.error.reason if message.has_error() else None])
            runtime.push_task_output = lambda client, context, sub_status, details: seen.append(["output", sub_status, details])
            runtime.HeartbeatSender = NoHeartbeat
            code = warm_exec._run_task("127.0.0.1:9", "token", True, None, 1)  # noqa: SLF001
            out.write_text(json.dumps(seen))
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked task process did not end")
        time.sleep(0.05)
    return os.waitstatus_to_exitcode(status), json.loads(out.read_text()) if out.exists() else []


def test_warm_exec_task_refuses_before_install_and_flower_replies_with_the_reason(tmp_path):
    audit = tmp_path / "audit" / "plant-2.jsonl"
    content = build_fab(make_app(tmp_path))[0]
    code, seen = _run_forked(tmp_path, {"plant-id": "plant-2", "data-dir": "/d", "audit-log": str(audit), "allowed-apps": H1}, content)
    assert code != 0
    assert not any(step[0] == "installed" for step in seen)
    [reply] = [step for step in seen if step[0] == "reply"]
    digest = hashlib.sha256(content).hexdigest()
    assert reply[2] == (f"<class 'fl_client.app_policy.AppRefused'>:<'plant-2 refuses app acme/tinyapp 0.1.0 (sha256 {digest[:12]}…): "
                        "not in this plant's allowed-apps; if you trust it, add its hash to the node config (maxfl app hash prints it)'>")
    assert [step[1] for step in seen if step[0] == "output"] == ["failed"]
    assert events(audit) == [("app.refused", {"fab_hash": digest, "fab_id": "acme/tinyapp", "fab_version": "0.1.0", "run_id": 5,
                                              "reason": "not in this plant's allowed-apps; if you trust it, add its hash to the node "
                                                        "config (maxfl app hash prints it)"})]


def test_warm_exec_task_installs_an_allowed_app_and_audits_it(tmp_path):
    audit = tmp_path / "audit" / "plant-2.jsonl"
    content = build_fab(make_app(tmp_path))[0]
    digest = hashlib.sha256(content).hexdigest()
    _, seen = _run_forked(tmp_path, {"plant-id": "plant-2", "data-dir": "/d", "audit-log": str(audit), "allowed-apps": digest}, content)
    assert ["installed", digest] in seen
    assert [e for e, _ in events(audit)] == ["app.accepted"]


# ------------------------------------------------------------------------------------------ real processes
def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).is_success
    except httpx.HTTPError:
        return False


@pytest.mark.e2e
def test_a_real_plant_refuses_an_app_it_did_not_allow_and_runs_the_one_it_did(tmp_path):
    from launcher.processes import ProcessGroup, free_port

    app = make_app(tmp_path)
    digest = fab_hash(app)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "MAXFL_HOME": str(tmp_path / "maxfl-home")}
    procs = ProcessGroup(tmp_path / "logs")  # stops what it started, and their descendants, by PID
    port = free_port()
    superlink = f"127.0.0.1:{port}"
    try:
        link = procs.start("superlink", [str(bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                                         "--database", str(tmp_path / "state.db"), "--disable-runtime-dependency-installation"],
                           {**env, "FLWR_HOME": str(tmp_path / "link-home")})
        procs.wait_until("the SuperLink", lambda: _http_ok(f"http://{superlink}/health"), 120, link)
        allowed = {"plant-1": H1, "plant-2": digest}  # plant-1 allows some other app only
        for plant_id, apps in allowed.items():
            runtime = f"127.0.0.1:{free_port()}"
            node_env = {**env, "FLWR_HOME": str(tmp_path / "nodes" / plant_id)}
            node_config = f'plant-id="{plant_id}" data-dir="/d" allowed-apps="{apps}" audit-log="{tmp_path / "audit" / plant_id}.jsonl"'
            node = procs.start(f"supernode-{plant_id}", [str(bin_dir / "maxfl-supernode"), "--insecure", "--superlink", superlink,
                                                         "--node-config", node_config, "--port", runtime.rsplit(":", 1)[1],
                                                         "--max-wait-time", "60", "--isolation", "process"], node_env)
            procs.wait_until(f"{plant_id}'s SuperNode", lambda url=f"http://{runtime}/health": _http_ok(url), 120, node)
            procs.start(f"warm-exec-{plant_id}", [str(bin_dir / "maxfl-warm-exec"), "--runtime-api-address", runtime, "--insecure",
                                                  "--parent-pid", str(node.popen.pid)], node_env)
        cli_home = tmp_path / "cli"
        cli_home.mkdir()
        (cli_home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{superlink}"\ninsecure = true\n')
        out = tmp_path / "replies.json"
        run = subprocess.run([str(bin_dir / "flwr"), "run", str(app), "local", "--stream", "--run-config", f'out="{out}" nodes=2'],
                             capture_output=True, text=True, env={**env, "FLWR_HOME": str(cli_home)}, timeout=300)
        procs.check_alive()
        assert out.exists(), run.stdout + run.stderr
    finally:
        procs.stop_all()
    assert procs.alive() == []

    replies = {r["plant"] or r["error"].split(" refuses ")[0].rsplit("'", 1)[-1]: r for r in json.loads(out.read_text())}
    assert set(replies) == {"plant-1", "plant-2"}, replies
    assert replies["plant-2"]["error"] is None
    reason = replies["plant-1"]["error"]
    assert f"plant-1 refuses app acme/tinyapp 0.1.0 (sha256 {digest[:12]}…): not in this plant's allowed-apps" in reason
    # The hash `maxfl app hash` computed before the run is the one `flwr run` gave the FAB it built.
    refused = events(tmp_path / "audit" / "plant-1.jsonl")
    assert refused[0][0] == "app.refused" and refused[0][1]["fab_hash"] == digest
    assert [(e, d["fab_hash"]) for e, d in events(tmp_path / "audit" / "plant-2.jsonl")] == [("app.accepted", digest)]
    # The refused FAB never reached plant-1's disk; plant-2 installed the one it allowed.
    assert not list((tmp_path / "nodes" / "plant-1").glob("apps/*"))
    assert list((tmp_path / "nodes" / "plant-2").glob("apps/*"))
