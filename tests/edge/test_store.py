"""The plant's edge model store: verified installs, activation, rollback, and refusals that change nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from edge.store import EdgeStore, EdgeStoreError
from maxfl.release import MANIFEST_FILE, ONNX_FILE
from tests.edge.conftest import HERE, linear_onnx, plant, release


@pytest.fixture
def store(tmp_path) -> EdgeStore:
    return EdgeStore(tmp_path / "edge")


def _snapshot(root) -> dict[str, bytes]:
    """Every file under the store with its bytes (the lock file aside), to show that a refusal changed nothing."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"} if root.exists() else {}


def test_install_activate_rollback_round_trip(store):
    first = store.install(*release("fake-window", 1))
    assert (first.status, first.version, first.previous) == ("installed", 1, None)
    second = store.install(*release("fake-window", 2))
    assert (second.status, second.version, second.previous) == ("installed", 2, 1)
    current = store.current("maxfl-fake-window")
    assert current is not None and current.manifest.version == 2 and current.path.read_bytes() == release("fake-window", 2)[1]
    assert (current.path.parent / MANIFEST_FILE).exists() and current.path.name == ONNX_FILE

    back = store.rollback()
    assert (back.status, back.version, back.previous) == ("activated", 1, 2)
    assert store.current("maxfl-fake-window").manifest.version == 1
    again = store.activate("maxfl-fake-window", 2)
    assert (again.status, again.version, again.previous) == ("activated", 2, 1)
    assert store.activate("maxfl-fake-window", 2).status == "already-current"
    assert [v.manifest.version for v in store.versions("maxfl-fake-window")] == [1, 2]
    assert store.models() == ["maxfl-fake-window"]
    assert store.pointer("maxfl-fake-window") == store.root / "maxfl-fake-window" / "current.json"


def test_history_is_a_stack_rollback_walks_back_one_version_at_a_time(store):
    for v in (1, 2, 3):
        store.install(*release("fake-window", v))
    assert store.pointer_state("maxfl-fake-window").history == [1, 2, 3]
    assert store.rollback("maxfl-fake-window").version == 2
    assert store.pointer_state("maxfl-fake-window").history == [1, 2]
    assert store.rollback("maxfl-fake-window").version == 1
    with pytest.raises(EdgeStoreError, match="no earlier version to roll back to"):
        store.rollback("maxfl-fake-window")
    assert store.current("maxfl-fake-window").manifest.version == 1
    store.activate("maxfl-fake-window", 3)  # activating pushes; the next rollback undoes exactly that
    assert store.pointer_state("maxfl-fake-window").history == [1, 3]
    assert store.rollback().version == 1


def test_reinstalling_the_same_bytes_activates_instead_of_writing(store):
    manifest, onnx = release("fake-window", 1)
    store.install(manifest, onnx)
    assert store.install(manifest, onnx).status == "already-current"
    store.install(*release("fake-window", 2))
    outcome = store.install(manifest, onnx)
    assert (outcome.status, outcome.version, outcome.previous) == ("activated", 1, 2)


def test_hash_mismatch_is_refused_and_the_previous_model_stays_current(store):
    store.install(*release("fake-window", 1))
    before = _snapshot(store.root)
    manifest, onnx = release("fake-window", 2)
    tampered = onnx[:-1] + bytes([onnx[-1] ^ 0xFF])
    with pytest.raises(EdgeStoreError, match="hash mismatch.*refusing; ask the anchor to push again") as err:
        store.install(manifest, tampered)
    assert "\n" not in str(err.value)
    assert _snapshot(store.root) == before
    assert store.current("maxfl-fake-window").manifest.version == 1


def test_truncated_bytes_are_refused_before_anything_is_written(store):
    manifest, onnx = release("fake-window", 1)
    with pytest.raises(EdgeStoreError, match=rf"truncated: got {len(onnx) - 10} bytes, the release says {len(onnx)}"):
        store.install(manifest, onnx[:-10])
    assert _snapshot(store.root) == {} and store.models() == []


def test_bytes_with_the_right_hash_that_are_not_onnx_are_refused(store):
    store.install(*release("fake-window", 1))
    before = _snapshot(store.root)
    with pytest.raises(EdgeStoreError, match="not a loadable ONNX model"):
        store.install(*release("fake-window", 2, onnx=b"this is not an ONNX model at all"))
    assert _snapshot(store.root) == before


def test_a_model_whose_input_is_not_the_one_the_release_names_is_refused(store):
    onnx = linear_onnx((3, 4), [1.0, 0.0], input_name="x")
    with pytest.raises(EdgeStoreError, match=r"takes input\(s\) \['x'\], the release says 'input'"):
        store.install(*release("fake-window", 1, onnx=onnx))
    assert store.models() == []


def test_a_release_for_a_task_the_plant_does_not_know_is_refused(store):
    manifest, onnx = release("fake-window", 1)
    with pytest.raises(EdgeStoreError, match="task 'welding'.*does not know"):
        store.install(manifest.model_copy(update={"task": "welding"}), onnx)


def test_the_same_version_with_different_bytes_is_refused(store):
    store.install(*release("fake-window", 1))
    store.install(*release("fake-window", 2))
    before = _snapshot(store.root)
    other = linear_onnx((3, 4), [99.0, 0.0])
    with pytest.raises(EdgeStoreError, match="v1 is already installed with different bytes.*register a new version"):
        store.install(*release("fake-window", 1, onnx=other))
    assert _snapshot(store.root) == before
    assert store.current("maxfl-fake-window").manifest.version == 2


def test_a_corrupted_pointer_is_a_one_line_error_and_is_not_overwritten(store):
    store.install(*release("fake-window", 1))
    pointer = store.pointer("maxfl-fake-window")
    pointer.write_text('{"version": 1, "hist')
    for action in (lambda: store.current("maxfl-fake-window"), lambda: store.install(*release("fake-window", 2)),
                   lambda: store.rollback("maxfl-fake-window")):
        with pytest.raises(EdgeStoreError) as err:
            action()
        message = str(err.value)
        assert "\n" not in message and "is corrupt" in message and "maxfl edge activate --model maxfl-fake-window" in message
    assert pointer.read_text() == '{"version": 1, "hist'
    assert [v.manifest.version for v in store.versions("maxfl-fake-window")] == [1]  # the refused v2 was not written


def test_a_pointer_whose_history_does_not_end_with_its_version_is_corrupt(store):
    store.install(*release("fake-window", 1))
    store.pointer("maxfl-fake-window").write_text(json.dumps({"version": 1, "history": [2], "updated_at": "2025-01-01T00:00:00Z"}))
    with pytest.raises(EdgeStoreError, match="history must end with the current version 1"):
        store.current("maxfl-fake-window")


def test_a_corrupted_release_file_is_a_one_line_error(store):
    store.install(*release("fake-window", 1))
    (store.root / "maxfl-fake-window" / "1" / MANIFEST_FILE).write_text("{}")
    with pytest.raises(EdgeStoreError, match=r"release file .*/1/release.json is corrupt .*push v1 again") as err:
        store.current("maxfl-fake-window")
    assert "\n" not in str(err.value)


def test_a_version_damaged_on_disk_is_not_activated_and_a_fresh_push_repairs_it(store):
    manifest, onnx = release("fake-window", 1)
    store.install(manifest, onnx)
    store.install(*release("fake-window", 2))
    (store.root / "maxfl-fake-window" / "1" / ONNX_FILE).write_bytes(b"bit rot")
    with pytest.raises(EdgeStoreError, match="is damaged"):
        store.rollback("maxfl-fake-window")
    assert store.current("maxfl-fake-window").manifest.version == 2
    assert store.install(manifest, onnx).status == "activated"  # verified bytes replace the damaged copy
    assert store.current("maxfl-fake-window").path.read_bytes() == onnx


def test_rollback_errors_name_the_problem(store):
    with pytest.raises(EdgeStoreError, match="holds no model"):
        store.rollback()
    store.install(*release("fake-window", 1))
    store.install(*release("fake-row", 1))
    with pytest.raises(EdgeStoreError, match=r"several models \(maxfl-fake-row, maxfl-fake-window\): say which with --model"):
        store.rollback()
    with pytest.raises(EdgeStoreError, match="v7 is not installed"):
        store.activate("maxfl-fake-window", 7)
    with pytest.raises(EdgeStoreError, match="is not a model name"):
        store.current("../etc")


def test_a_crashed_install_leaves_no_version_behind(store):
    store.install(*release("fake-window", 1))
    leftover = store.root / "maxfl-fake-window" / ".incoming-2-abc"
    leftover.mkdir()
    (leftover / ONNX_FILE).write_bytes(b"half")
    assert [v.manifest.version for v in store.versions("maxfl-fake-window")] == [1]
    store.install(*release("fake-window", 2))
    assert not leftover.exists()


CONCURRENT_INSTALLER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("edge_test_fakes", {conftest!r})
fakes = importlib.util.module_from_spec(spec); sys.modules["edge_test_fakes"] = fakes; spec.loader.exec_module(fakes)
fakes.register_fakes()
from edge.store import EdgeStore
store = EdgeStore(__import__("pathlib").Path({root!r}))
for v in {versions!r}:
    store.install(*fakes.release("fake-window", v))
"""


@pytest.mark.e2e
def test_two_processes_installing_at_once_lose_nothing(store):
    procs = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(CONCURRENT_INSTALLER.format(conftest=str(HERE), root=str(store.root), versions=vs))])
        for vs in (list(range(1, 16, 2)), list(range(2, 17, 2)))
    ]
    try:
        assert [p.wait(timeout=60) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    state = store.pointer_state("maxfl-fake-window")
    assert sorted(state.history) == list(range(1, 17))
    assert [v.manifest.version for v in store.versions("maxfl-fake-window")] == list(range(1, 17))
    for v in store.versions("maxfl-fake-window"):
        store.verified_bytes(v)


def test_cli_status_rollback_and_activate(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from edge.cli import app, console

    monkeypatch.setattr(console, "width", 200)

    cfg = plant(tmp_path, "plant-2")
    node = ["--node-config", cfg.as_node_config()]
    runner = CliRunner()
    assert "holds no model yet" in runner.invoke(app, ["status", *node]).output
    store = EdgeStore(cfg.edge_store_path())
    for v in (1, 2, 3):
        store.install(*release("fake-window", v))
    table = runner.invoke(app, ["status", *node])
    assert table.exit_code == 0 and "v1 -> v2 -> v3" in table.output and release("fake-window", 3)[0].sha256[:12] in table.output
    report = json.loads(runner.invoke(app, ["status", *node, "--json"]).output)
    assert report["plant-id"] == "plant-2"
    assert [(m["model"], m["current"], m["history"], m["installed"]) for m in report["models"]] == [("maxfl-fake-window", 3, [1, 2, 3], [1, 2, 3])]
    rolled = runner.invoke(app, ["rollback", *node])
    assert rolled.exit_code == 0 and rolled.output.strip() == "plant-2: maxfl-fake-window v3 -> v2"
    activated = runner.invoke(app, ["activate", *node, "--version", "3"])
    assert activated.exit_code == 0 and activated.output.strip() == "plant-2: maxfl-fake-window v2 -> v3"
    assert store.pointer_state("maxfl-fake-window").history == [1, 2, 3]


@pytest.mark.e2e
def test_maxfl_edge_rollback_without_an_earlier_version_is_one_line_and_exit_2(tmp_path):
    from pathlib import Path

    cfg = plant(tmp_path)
    EdgeStore(cfg.edge_store_path()).install(*release("fake-window", 1))
    maxfl = Path(sys.executable).parent / "maxfl"
    done = subprocess.run([str(maxfl), "edge", "rollback", "--node-config", cfg.as_node_config()], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == ["error: maxfl-fake-window v1 is the first version this plant used: there is no earlier version to roll back to"]
