"""The plant's edge server over real HTTP: answers, one-line 4xx for every kind of bad input, and hot swaps
(install, rollback) under continuous load without a failed request."""

from __future__ import annotations

import base64
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from edge.server import ModelWatcher
from edge.store import EdgeStore
from tests.edge.conftest import (
    WINDOW_SHAPE,
    in_process_server,
    plant,
    png_bytes,
    process_server,
    release,
    wait_for,
)

WINDOW = np.arange(np.prod(WINDOW_SHAPE), dtype=float).reshape(WINDOW_SHAPE).tolist()
ROW = {"temperature": 81.5, "pressure": 2.1}
MAX_BATCH = 4
MAX_BODY = 10_000


def _server(tmp_path_factory, task: str) -> Iterator[httpx.Client]:
    cfg = plant(tmp_path_factory.mktemp(task))
    EdgeStore(cfg.edge_store_path()).install(*release(task, 1))
    with in_process_server(cfg, None, max_batch=MAX_BATCH, max_body_bytes=MAX_BODY) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def window_server(tmp_path_factory, fake_tasks) -> Iterator[httpx.Client]:
    yield from _server(tmp_path_factory, "fake-window")


@pytest.fixture(scope="module")
def image_server(tmp_path_factory, fake_tasks) -> Iterator[httpx.Client]:
    yield from _server(tmp_path_factory, "fake-image")


@pytest.fixture(scope="module")
def row_server(tmp_path_factory, fake_tasks) -> Iterator[httpx.Client]:
    yield from _server(tmp_path_factory, "fake-row")


def _error(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert fragment in message and "\n" not in message, message


# ---- answers ------------------------------------------------------------------------------------------------


def test_health_reports_the_plant_and_the_serving_version(window_server):
    r = window_server.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "serving" and body["plant"] == "plant-1"
    manifest = release("fake-window", 1)[0]
    assert body["model"] == {"name": "maxfl-fake-window", "version": 1, "sha256": manifest.sha256, "task": "fake-window", "variant": "global"}


def test_a_batch_of_windows_is_answered_by_the_version_in_the_header(window_server):
    r = window_server.post("/v1/predict", json={"instances": [WINDOW, WINDOW, WINDOW]})
    assert r.status_code == 200, r.text
    assert r.headers["X-Model-Version"] == "maxfl-fake-window/1"
    body = r.json()
    assert body["model"]["version"] == 1 and len(body["model"]["sha256"]) == 64
    assert body["predictions"] == [{"label": 0, "logits": [1.0, 0.0]}] * 3


def test_images_are_answered_as_base64_json_or_raw_bytes(image_server):
    image = png_bytes()
    raw = image_server.post("/v1/predict", content=image, headers={"Content-Type": "image/png"})
    assert raw.status_code == 200 and len(raw.json()["predictions"]) == 1
    octets = image_server.post("/v1/predict", content=image, headers={"Content-Type": "application/octet-stream"})
    assert octets.status_code == 200
    encoded = base64.b64encode(image).decode()
    batch = image_server.post("/v1/predict", json={"instances": [encoded, f"data:image/png;base64,{encoded}", base64.encodebytes(image).decode()]})
    assert batch.status_code == 200, batch.text
    assert len(batch.json()["predictions"]) == 3


def test_rows_are_answered(row_server):
    r = row_server.post("/v1/predict", json={"instances": [ROW, {**ROW, "extra": "ignored"}]})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 2


# ---- bad input: one line, the right 4xx, never the model ---------------------------------------------------


def _chunks() -> Iterator[bytes]:
    for _ in range(20):
        yield b"[" * 1000


@pytest.mark.parametrize(("request_kwargs", "status", "fragment"), [
    pytest.param({"content": b'{"instances": [', "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON", id="malformed-json"),
    pytest.param({"json": {"inputs": [WINDOW]}}, 400, 'list under "instances"', id="missing-instances"),
    pytest.param({"json": [WINDOW]}, 400, 'list under "instances"', id="not-an-object"),
    pytest.param({"json": {"instances": WINDOW[0][0]}}, 400, '"instances" must be a list', id="instances-not-a-list"),
    pytest.param({"json": {"instances": []}}, 400, '"instances" is empty', id="no-instances"),
    pytest.param({"json": {"instances": [[[1.0, 2.0], [3.0, 4.0]]]}}, 400, "window shape [2, 2], the model takes [3, 4]", id="wrong-shape"),
    pytest.param({"json": {"instances": [WINDOW, [["a", "b", "c", "d"]] * 3]}}, 400, "instance 1: a window holds numbers only", id="strings-in-a-window"),
    pytest.param({"json": {"instances": [WINDOW, [[1, [2], 3, 4]] * 3]}}, 400, "instance 1: a window holds numbers only", id="ragged-window"),
    pytest.param({"json": {"instances": [WINDOW] * (MAX_BATCH + 1)}}, 413, f"at most {MAX_BATCH} (--max-batch)", id="too-many-instances"),
    pytest.param({"json": {"instances": [WINDOW], "pad": "x" * MAX_BODY}}, 413, "larger than this server's limit", id="oversized-body"),
    pytest.param({"content": _chunks, "headers": {"Content-Type": "application/json"}}, 413, "larger than this server's limit", id="oversized-streamed-body"),
    pytest.param({"content": b"1,2,3", "headers": {"Content-Type": "text/csv"}}, 415, "unsupported Content-Type 'text/csv'", id="unsupported-content-type"),
    pytest.param({"content": b"{}"}, 415, "unsupported Content-Type '(none)'", id="no-content-type"),
    pytest.param({"content": b"\x89PNG", "headers": {"Content-Type": "image/png"}}, 415, "takes windows, not raw bytes", id="raw-bytes-to-a-window-model"),
])
def test_bad_window_requests_get_a_4xx_and_one_line(window_server, request_kwargs, status, fragment):
    kwargs = dict(request_kwargs)
    if callable(kwargs.get("content")):
        kwargs["content"] = kwargs["content"]()  # a generator: sent chunked, without Content-Length
    _error(window_server.post("/v1/predict", **kwargs), status, fragment)


@pytest.mark.parametrize(("request_kwargs", "fragment"), [
    pytest.param({"content": b"GIF89a but not really", "headers": {"Content-Type": "image/png"}}, "instance 0 is not an image", id="raw-bytes-not-an-image"),
    pytest.param({"content": b"", "headers": {"Content-Type": "image/png"}}, "empty body", id="empty-raw-body"),
    pytest.param({"json": {"instances": [base64.b64encode(png_bytes()).decode(), base64.b64encode(b"not an image").decode()]}},
                 "instance 1 is not an image", id="base64-not-an-image"),
    pytest.param({"json": {"instances": ["%%% not base64 %%%"]}}, "instance 0 is not valid base64", id="bad-base64"),
    pytest.param({"json": {"instances": [[1, 2, 3]]}}, "instance 0 must be a base64 string", id="image-not-a-string"),
])
def test_bad_image_requests_get_400_and_one_line(image_server, request_kwargs, fragment):
    _error(image_server.post("/v1/predict", **request_kwargs), 400, fragment)


@pytest.mark.parametrize(("instance", "fragment"), [
    pytest.param({"temperature": 80.0}, "instance 0 lacks field(s) pressure", id="missing-field"),
    pytest.param({"temperature": "hot", "pressure": 2.0}, "must be numbers", id="string-value"),
    pytest.param([80.0, 2.0], "must be an object", id="not-an-object"),
])
def test_bad_rows_get_400_and_one_line(row_server, instance, fragment):
    _error(row_server.post("/v1/predict", json={"instances": [instance]}), 400, fragment)


def test_the_server_survives_bad_input_and_unknown_paths(window_server):
    _error(window_server.get("/v1/predict"), 405, "Method Not Allowed")
    _error(window_server.post("/v2/predict", json={}), 404, "use GET /health or POST /v1/predict")
    assert window_server.post("/v1/predict", json={"instances": [WINDOW]}).status_code == 200
    assert window_server.get("/health").json()["status"] == "serving"


# ---- the tasks' own adapters -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def defect_server(tmp_path_factory, defect_onnx) -> Iterator[httpx.Client]:
    from tasks import get_task

    cfg = plant(tmp_path_factory.mktemp("defect"))
    spec = get_task("defect").spec_type(task="defect", model="cnn", num_classes=2)
    EdgeStore(cfg.edge_store_path()).install(*release("defect", 3, onnx=defect_onnx, model_name="maxfl-defect", task_spec=spec.model_dump_json()))
    with in_process_server(cfg, None, max_batch=MAX_BATCH) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        yield client


def test_defect_model_answers_cell_images_and_refuses_what_is_not_one(defect_server):
    grey, colour = png_bytes(300, seed=1), _jpeg(120)
    raw = defect_server.post("/v1/predict", content=grey, headers={"Content-Type": "image/png"})
    assert raw.status_code == 200, raw.text
    assert raw.headers["X-Model-Version"] == "maxfl-defect/3"
    (answer,) = raw.json()["predictions"]
    assert answer["label"] in ("good", "defective") and sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    batch = defect_server.post("/v1/predict", json={"instances": [base64.b64encode(b).decode() for b in (grey, colour)]})
    assert batch.status_code == 200 and batch.json()["predictions"][0] == answer
    _error(defect_server.post("/v1/predict", content=b"%PDF-1.7", headers={"Content-Type": "image/jpeg"}), 400, "instance 0 is not a readable image")
    truncated = base64.b64encode(grey[: len(grey) // 2]).decode()
    _error(defect_server.post("/v1/predict", json={"instances": [base64.b64encode(grey).decode(), truncated]}), 400, "instance 1 is not a readable image")
    _error(defect_server.post("/v1/predict", json={"instances": ["not base64!"]}), 400, "instance 0 is not valid base64")


def _jpeg(size: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def process_server_real(tmp_path_factory, process_onnx, process_plant) -> Iterator[httpx.Client]:
    from fl_client.config import PlantConfig
    from tasks.process.task import ProcessSpec

    cfg = PlantConfig(plant_id="plant-3", data_dir=process_plant, edge_store=tmp_path_factory.mktemp("process-edge") / "edge")
    spec = ProcessSpec(task="process", model="cnn1d", num_classes=3, classes=(0, 1, 2))
    EdgeStore(cfg.edge_store_path()).install(*release("process", 1, onnx=process_onnx, model_name="maxfl-process", task_spec=spec.model_dump_json()))
    with in_process_server(cfg, None, max_batch=MAX_BATCH) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        yield client


def test_process_model_answers_real_windows_and_refuses_wrong_shapes_and_strings(process_server_real, process_plant):
    with np.load(process_plant / "process.npz") as rec:
        window = rec["train_x"][:20].tolist()  # 20 samples x 53 variables, as measured
    r = process_server_real.post("/v1/predict", json={"instances": [window, window]})
    assert r.status_code == 200, r.text
    first, second = r.json()["predictions"]
    assert first == second and first["label"] in ("normal", "IDV01", "IDV02") and isinstance(first["alarm"], bool)
    _error(process_server_real.post("/v1/predict", json={"instances": [window[:10]]}), 400, "instance 0 has shape 10x53")
    _error(process_server_real.post("/v1/predict", json={"instances": [[row[:-1] for row in window]]}), 400, "expected 20 time steps x 53 variables")
    strings = [[str(v) for v in row] for row in window]
    _error(process_server_real.post("/v1/predict", json={"instances": [window, strings]}), 400, "instance 1 holds non-numeric values")
    _error(process_server_real.post("/v1/predict", json={"instances": [window] * (MAX_BATCH + 1)}), 413, "at most")
    _error(process_server_real.post("/v1/predict", content=b"\x89PNG", headers={"Content-Type": "image/png"}), 415, "takes windows")


# ---- models coming and going ---------------------------------------------------------------------------------


def test_without_a_model_it_answers_503_and_serves_the_first_install(tmp_path):
    cfg = plant(tmp_path)
    with in_process_server(cfg, None) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "no-model"
        _error(client.post("/v1/predict", json={"instances": [WINDOW]}), 503, "no model is installed at this plant yet")
        EdgeStore(cfg.edge_store_path()).install(*release("fake-window", 1))
        wait_for("the first install to be served", lambda: client.get("/health").status_code == 200, 5)
        r = client.post("/v1/predict", json={"instances": [WINDOW]})
        assert r.status_code == 200 and r.headers["X-Model-Version"] == "maxfl-fake-window/1"


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(tmp_path):
    cfg = plant(tmp_path)
    store = EdgeStore(cfg.edge_store_path())
    store.install(*release("fake-window", 1))
    watcher = ModelWatcher(store, cfg, None)
    watcher.check()
    assert watcher.runtime is not None and watcher.runtime.manifest.version == 1
    v2 = store.install(*release("fake-window", 2))
    store.current("maxfl-fake-window").path.write_bytes(b"damaged on disk")  # before the watcher looks
    assert v2.version == 2
    watcher.check()
    assert watcher.runtime.manifest.version == 1
    assert watcher.problem is not None and watcher.problem.startswith("maxfl-fake-window v2 failed to load")
    store.install(*release("fake-window", 3))
    watcher.check()
    assert watcher.runtime.manifest.version == 3 and watcher.problem is None
    store.pointer("maxfl-fake-window").write_text("{broken")
    watcher.check()
    assert watcher.runtime.manifest.version == 3 and "current.json is corrupt" in watcher.problem


def test_the_plants_own_variant_installed_after_its_release_is_served_without_a_restart(tmp_path):
    """The release is installed (and served) first; the plant's personalised variant of the same version follows
    once personalisation is done, and the watcher must load it although version and release are unchanged."""
    from tests.edge.conftest import FAKE_TASKS, linear_onnx

    cfg = plant(tmp_path)
    store = EdgeStore(cfg.edge_store_path())
    manifest, onnx = release("fake-window", 1)
    store.install(manifest, onnx)
    watcher = ModelWatcher(store, cfg, None)
    watcher.check()
    assert watcher.runtime is not None and watcher.runtime.variant == "global"
    store.install_variant(manifest, "personalised", linear_onnx(FAKE_TASKS["fake-window"].shape, [7.0, 0.0]), "eval_macro_f1", {"global": 0.5})
    watcher.check()
    assert watcher.runtime.variant == "personalised" and watcher.runtime.manifest.version == 1
    answer = watcher.runtime.predict([WINDOW])
    assert answer[0]["logits"][0] == 7.0  # the variant's own weights answer, not the release's
    watcher.check()  # nothing changed since: nothing is reloaded
    assert watcher.runtime.variant == "personalised"


def _collapse(versions: list[int]) -> list[int]:
    return [v for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v]


def _swap_case(task: str, request: pytest.FixtureRequest) -> tuple[dict[int, tuple], dict[str, Any], Callable[[int, list[dict]], bool]]:
    """Per version its (manifest, onnx), the request to send, and a check that an answer is that version's own."""
    if task == "fake-window":
        releases = {v: release(task, v) for v in (1, 2)}
        payload = {"json": {"instances": [WINDOW, WINDOW]}}
        return releases, payload, lambda version, predictions: all(p["logits"][0] == version for p in predictions)
    from maxfl import onnx_model
    from tasks import get_task

    spec = get_task("defect").spec_type(task="defect", model="cnn", num_classes=2)
    models = {1: request.getfixturevalue("defect_onnx"), 2: request.getfixturevalue("defect_onnx_v2")}
    releases = {v: release("defect", v, onnx=b, model_name="maxfl-defect", task_spec=spec.model_dump_json()) for v, b in models.items()}
    image = png_bytes(300, seed=5)
    serving = get_task("defect").serving(spec, Path("."))
    expected = {v: serving.answers(onnx_model.run(onnx_model.session(b), serving.batch([image]))) for v, b in models.items()}
    assert expected[1][0]["probabilities"] != expected[2][0]["probabilities"]

    def computed_by(version: int, predictions: list[dict]) -> bool:
        want = expected[version][0]["probabilities"]
        return all(abs(predictions[0]["probabilities"][k] - q) < 1e-5 for k, q in want.items())

    return releases, {"content": image, "headers": {"Content-Type": "image/png"}}, computed_by


@pytest.mark.e2e
@pytest.mark.parametrize("task", ["fake-window", "defect"])
def test_hot_swap_and_rollback_under_continuous_load_fail_no_request(tmp_path, task, request):
    """Clients keep sending while the store installs v2 and rolls back to v1: no request fails, and every
    client sees v1, then v2, then v1 again, each answer computed by the version it names."""
    releases, payload, computed_by = _swap_case(task, request)
    cfg = plant(tmp_path)
    store = EdgeStore(cfg.edge_store_path())
    store.install(*releases[1])
    name = releases[1][0].model_name
    clients = 4
    seen: list[list[int]] = [[] for _ in range(clients)]
    failures: list[str] = []
    stop = threading.Event()

    def send(k: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            while not stop.is_set():
                try:
                    r = client.post("/v1/predict", **payload)
                    body = r.json()
                    version = body["model"]["version"]
                    if r.status_code != 200 or r.headers.get("X-Model-Version") != f"{name}/{version}" or not computed_by(version, body["predictions"]):
                        failures.append(f"{r.status_code} {r.headers.get('X-Model-Version')} {r.text[:200]}")
                        continue
                except Exception as exc:  # noqa: BLE001 - every failure counts
                    failures.append(repr(exc))
                    continue
                seen[k].append(version)

    with process_server(cfg, None, tmp_path / "logs") as (url, _):
        threads = [threading.Thread(target=send, args=(k, url)) for k in range(clients)]
        for t in threads:
            t.start()
        try:
            wait_for("every client to be answered by v1", lambda: all(seen), 10)
            time.sleep(0.3)
            store.install(*releases[2])
            swap_s = wait_for("every client to be answered by v2", lambda: all(2 in s for s in seen), 15)
            time.sleep(0.3)
            store.rollback()
            back_s = wait_for("every client to be answered by v1 again", lambda: all(_collapse(s)[-1:] == [1] and 2 in s for s in seen), 15)
            wait_for("a few more answers", lambda: all(len(s) > 20 for s in seen), 15)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=10)
    total = sum(map(len, seen))
    assert failures == [], f"{len(failures)} of {total + len(failures)} requests failed: {failures[:3]}"
    assert all(_collapse(s) == [1, 2, 1] for s in seen), [_collapse(s) for s in seen]
    print(f"{task}: {total} requests from {clients} clients, none failed; swap seen by all clients in {swap_s:.2f} s, rollback in {back_s:.2f} s")


@pytest.mark.e2e
def test_sighup_makes_the_server_check_the_store_at_once(tmp_path):
    cfg = plant(tmp_path)
    store = EdgeStore(cfg.edge_store_path())
    store.install(*release("fake-window", 1))
    with process_server(cfg, "maxfl-fake-window", tmp_path / "logs", poll_s=120.0) as (url, proc):
        version = lambda: httpx.get(f"{url}/health", timeout=5).json()["model"]["version"]  # noqa: E731
        assert version() == 1
        store.install(*release("fake-window", 2))
        assert version() == 1  # the poll is two minutes away
        os.kill(proc.popen.pid, signal.SIGHUP)
        wait_for("the server to serve v2 after SIGHUP", lambda: version() == 2, 3)
        assert "now serving maxfl-fake-window v2" in proc.log_path.read_text()


@pytest.mark.e2e
def test_cli_serve_starts_with_an_empty_store_and_serves_the_first_real_release(tmp_path, defect_onnx):
    """`python -m edge.cli serve` (the `maxfl edge serve` command) with a real task: DefectCNN on a PNG."""
    cfg = plant(tmp_path, "plant-2")
    argv = [sys.executable, "-m", "edge.cli", "serve", "--node-config", cfg.as_node_config(), "--port", "{port}"]
    with process_server(cfg, None, tmp_path / "logs", argv=argv) as (url, proc), httpx.Client(base_url=url, timeout=10) as client:
        health = client.get("/health")
        body = health.json()
        assert health.status_code == 503 and body.pop("requests")["in_model"] == 0
        assert body == {"status": "no-model", "plant": "plant-2", "model": None, "serving": None, "watching": None, "problem": None}
        from tasks import get_task

        spec = get_task("defect").spec_type(task="defect", model="cnn", num_classes=2)
        EdgeStore(cfg.edge_store_path()).install(*release("defect", 4, onnx=defect_onnx, model_name="maxfl-defect", task_spec=spec.model_dump_json()))
        wait_for("the release to be served", lambda: client.get("/health").status_code == 200, 10)
        r = client.post("/v1/predict", content=png_bytes(300), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        assert r.headers["X-Model-Version"] == "maxfl-defect/4" and len(r.json()["predictions"]) == 1
        _error(client.post("/v1/predict", content=b"not an image", headers={"Content-Type": "image/png"}), 400, "")
        assert "now serving maxfl-defect v4" in proc.log_path.read_text()


def test_serve_flags_default_to_the_servers_limits():
    """`maxfl edge serve` keeps its defaults literal (importing the server costs torch); they must be Limits'."""
    import dataclasses

    import typer

    from edge.cli import app
    from edge.server import MB, Limits

    command = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    defaults = {p.name: p.default for p in command.params}
    for field in dataclasses.fields(Limits):
        if field.name == "max_body_bytes":
            assert defaults["max_body_mb"] * MB == field.default
        elif field.name != "max_head_bytes":
            assert defaults[field.name] == field.default, field.name


@pytest.mark.parametrize(("changes", "message"), [
    pytest.param({"max_in_model": 0}, "--max-in-model must be at least 1, got 0", id="no-model-thread"),
    pytest.param({"max_waiting": -1}, "--max-waiting must be 0 or more, got -1", id="negative-queue"),
    pytest.param({"request_timeout_s": float("nan")}, "--request-timeout-s must be a number of seconds above 0, got nan", id="nan-timeout"),
    pytest.param({"max_image_side": 0}, "--max-image-side must be at least 1, got 0", id="no-image-side"),
])
def test_limits_that_cannot_work_are_one_line_config_errors(changes, message):
    from edge.server import Limits
    from maxfl.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^{message}$".replace("(", r"\(")):
        Limits(**changes).check()
    Limits().check()
