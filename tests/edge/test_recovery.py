"""The edge store recovers: a server started on a damaged current version serves the newest version that
loads and says so in /health; `maxfl edge status` fails on a damaged current version; a release whose ONNX
output does not match its spec is refused at install."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from edge.server import ModelWatcher
from edge.store import EdgeStore, EdgeStoreError
from maxfl.release import MANIFEST_FILE
from tests.edge.conftest import IMAGE_SHAPE, WINDOW_SHAPE, linear_onnx, plant, process_server, release

WINDOW = np.zeros(WINDOW_SHAPE).tolist()
NAME = "maxfl-fake-window"


def _corrupt_bytes(store: EdgeStore) -> None:
    store.current(NAME).path.write_bytes(b"not the released model")


def _remove_release_file(store: EdgeStore) -> None:
    (store.root / NAME / "2" / MANIFEST_FILE).unlink()


def _pointer_a_directory(store: EdgeStore) -> None:
    pointer = store.pointer(NAME)
    pointer.unlink()
    pointer.mkdir()


def _pointer_garbage(store: EdgeStore) -> None:
    store.pointer(NAME).write_bytes(b"\x00\xff{ not json")


def _pointer_missing(store: EdgeStore) -> None:
    store.pointer(NAME).unlink()


# damage -> (version served instead, words in the problem)
DAMAGES: dict[str, tuple[Callable[[EdgeStore], None], int, str]] = {
    "onnx-bytes-corrupted": (_corrupt_bytes, 1, "v2 failed to load"),
    "release-file-missing": (_remove_release_file, 1, "v2 is not installed"),
    "pointer-is-a-directory": (_pointer_a_directory, 2, "current.json is not readable"),
    "pointer-is-garbage": (_pointer_garbage, 2, "current.json is"),
    "pointer-missing": (_pointer_missing, 2, "has no current version"),
}


def _damaged_store(tmp_path: Path, damage: str) -> tuple[object, EdgeStore]:
    cfg = plant(tmp_path)
    store = EdgeStore(cfg.edge_store_path())
    store.install(*release("fake-window", 1))
    store.install(*release("fake-window", 2))
    DAMAGES[damage][0](store)
    return cfg, store


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_watcher_started_on_a_damaged_current_version_serves_the_newest_that_loads(tmp_path, damage):
    cfg, store = _damaged_store(tmp_path, damage)
    _, serving, words = DAMAGES[damage]
    watcher = ModelWatcher(store, cfg, None)
    watcher.check(force=True)
    assert watcher.runtime is not None and watcher.runtime.manifest.version == serving
    assert words in watcher.problem and f"serving v{serving}, the newest installed version that loads" in watcher.problem
    assert "\n" not in watcher.problem


@pytest.mark.e2e
@pytest.mark.parametrize("damage", ["onnx-bytes-corrupted", "release-file-missing", "pointer-is-a-directory", "pointer-is-garbage"])
def test_a_server_started_on_a_damaged_current_version_falls_back_and_says_so_in_health(tmp_path, damage):
    cfg, _ = _damaged_store(tmp_path, damage)
    _, serving, words = DAMAGES[damage]
    with process_server(cfg, None, tmp_path / "logs") as (url, proc), httpx.Client(base_url=url, timeout=10) as client:
        health = client.get("/health")
        assert health.status_code == 200
        body = health.json()
        assert body["status"] == "degraded" and body["serving"] == serving and words in body["problem"], body
        r = client.post("/v1/predict", json={"instances": [WINDOW]})
        assert r.status_code == 200 and r.headers["X-Model-Version"] == f"{NAME}/{serving}"
    log = proc.log_path.read_text()
    assert "Traceback" not in log and "degraded:" in log


def test_a_fresh_push_of_the_damaged_version_is_served_again(tmp_path):
    cfg, store = _damaged_store(tmp_path, "onnx-bytes-corrupted")
    watcher = ModelWatcher(store, cfg, None)
    watcher.check(force=True)
    assert watcher.runtime.manifest.version == 1 and watcher.problem
    outcome = store.install(*release("fake-window", 2))  # the anchor pushes v2 again: repaired, and the pointer rewritten
    assert outcome.status == "already-current"
    watcher.check()  # sees the pointer move, without being forced
    assert watcher.runtime.manifest.version == 2 and watcher.problem is None


@pytest.mark.parametrize(("damage", "fix"), [
    ("onnx-bytes-corrupted", "is damaged (its sha256 no longer matches the release); ask the anchor to push v2 again; "
                             "or run `maxfl edge rollback` to go back to v1"),
    ("release-file-missing", "v2 is not installed at this plant (installed: 1); ask the anchor to push v2 again; "
                             "or run `maxfl edge rollback` to go back to v1"),
    ("pointer-is-a-directory", "is not readable"),
])
def test_edge_status_fails_with_one_line_when_the_current_version_is_damaged(tmp_path, damage, fix):
    from typer.testing import CliRunner

    from edge.cli import app

    cfg, _ = _damaged_store(tmp_path, damage)
    for args in ([], ["--json"]):
        done = CliRunner().invoke(app, ["status", "--node-config", cfg.as_node_config(), *args])
        assert isinstance(done.exception, EdgeStoreError), done.output
        message = str(done.exception)
        assert message.startswith(f"{NAME}: ") and fix in message and "\n" not in message, message
    if damage == "onnx-bytes-corrupted":
        report = json.loads(CliRunner().invoke(app, ["status", "--node-config", cfg.as_node_config(), "--json"]).output)
        assert report["models"][0]["current"] == 2 and fix in report["models"][0]["problem"]


@pytest.mark.e2e
def test_maxfl_edge_status_exits_2_when_the_current_model_file_is_missing(tmp_path):
    cfg, store = _damaged_store(tmp_path, "onnx-bytes-corrupted")
    import os

    maxfl = Path(sys.executable).parent / "maxfl"
    env = {**os.environ, "COLUMNS": "250"}
    status = lambda: subprocess.run([str(maxfl), "edge", "status", "--node-config", cfg.as_node_config()],  # noqa: E731
                                    capture_output=True, text=True, timeout=120, env=env)
    store.current(NAME).path.unlink()
    done = status()
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {NAME}: current version: {NAME} v2 at ") and "is not readable" in line and "maxfl edge rollback" in line
    assert "v1 -> v2" in done.stdout  # the table is still shown
    subprocess.run([str(maxfl), "edge", "rollback", "--node-config", cfg.as_node_config()], check=True, capture_output=True, timeout=120)
    assert status().returncode == 0


def _symbolic_width(onnx_bytes: bytes) -> bytes:
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    dim = model.graph.output[0].type.tensor_type.shape.dim[1]
    dim.ClearField("dim_value")
    dim.dim_param = "classes"
    return model.SerializeToString()


@pytest.mark.parametrize("onnx_bytes", [
    pytest.param(linear_onnx(WINDOW_SHAPE, [1.0, 0.0, 0.0]), id="declared-width"),
    pytest.param(_symbolic_width(linear_onnx(WINDOW_SHAPE, [1.0, 0.0, 0.0])), id="width-found-by-a-run"),
])
def test_a_release_whose_onnx_gives_more_outputs_than_its_spec_has_classes_is_refused_at_install(tmp_path, onnx_bytes):
    store = EdgeStore(plant(tmp_path).edge_store_path())
    store.install(*release("fake-window", 1))
    with pytest.raises(EdgeStoreError, match=r"^maxfl-fake-window v2 gives 3 output\(s\) per instance, its task spec says 2 class\(es\); refusing"):
        store.install(*release("fake-window", 2, onnx=onnx_bytes))
    assert store.pointer_state(NAME).version == 1 and store.installed_versions(NAME) == [1]


def test_a_release_whose_spec_cannot_be_read_is_refused_at_install(tmp_path):
    store = EdgeStore(plant(tmp_path).edge_store_path())
    with pytest.raises(EdgeStoreError, match=r"^maxfl-fake-window v1's task spec cannot be read \('num_classes': Field required\); refusing"):
        store.install(*release("fake-window", 1, task_spec='{"task": "fake-window"}'))
    assert store.models() == [] or store.installed_versions(NAME) == []


def test_the_matching_width_still_installs_for_every_kind(tmp_path):
    store = EdgeStore(plant(tmp_path).edge_store_path())
    assert store.install(*release("fake-image", 1, onnx=_symbolic_width(linear_onnx(IMAGE_SHAPE, [1.0, 0.0])))).status == "installed"
    shutil.rmtree(store.root)
