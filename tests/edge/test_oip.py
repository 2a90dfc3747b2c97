"""The edge server speaks KServe's Open Inference Protocol v2: a real v2 client (tritonclient.http, binary tensor
data by default) against real servers on 127.0.0.1, answers equal to /v1's for the same instances, and every bad
request a one-line `{"error"}` with the protocol's 400/404/503, never a 500."""

from __future__ import annotations

import base64
import io
import json
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient
from tritonclient.utils import InferenceServerException

from edge.store import EdgeStore
from tests.edge.conftest import FAKE_TASKS, WINDOW_SHAPE, in_process_server, linear_onnx, plant, png_bytes, process_server, release, wait_for

MAX_BATCH = 4
MAX_BODY = 200_000
WINDOW = np.arange(np.prod(WINDOW_SHAPE), dtype=np.float32).reshape(WINDOW_SHAPE)


@contextmanager
def _server(tmp_path, task: str | None, **release_fields: Any) -> Iterator[tuple[str, triton.InferenceServerClient, Any]]:
    cfg = plant(tmp_path)
    if task is not None:
        EdgeStore(cfg.edge_store_path()).install(*release(task, 1, **release_fields))
    with in_process_server(cfg, None, max_batch=MAX_BATCH, max_body_bytes=MAX_BODY) as (url, watcher):
        client = triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=30)
        try:
            yield url, client, watcher
        finally:
            client.close()


@pytest.fixture(scope="module")
def window_server(tmp_path_factory, fake_tasks) -> Iterator[tuple[str, triton.InferenceServerClient, Any]]:
    with _server(tmp_path_factory.mktemp("window"), "fake-window") as served:
        yield served


@pytest.fixture(scope="module")
def row_server(tmp_path_factory, fake_tasks) -> Iterator[tuple[str, triton.InferenceServerClient, Any]]:
    with _server(tmp_path_factory.mktemp("row"), "fake-row") as served:
        yield served


@pytest.fixture(scope="module")
def image_server(tmp_path_factory, fake_tasks) -> Iterator[tuple[str, triton.InferenceServerClient, Any]]:
    with _server(tmp_path_factory.mktemp("image"), "fake-image") as served:
        yield served


def _defect_fields(defect_onnx: bytes) -> dict[str, Any]:
    from tasks import get_task

    spec = get_task("defect").spec_type(task="defect", model="cnn", num_classes=2)
    return {"onnx": defect_onnx, "model_name": "maxfl-defect", "task_spec": spec.model_dump_json()}


@pytest.fixture(scope="module")
def defect_server(tmp_path_factory, defect_onnx) -> Iterator[tuple[str, triton.InferenceServerClient, Any]]:
    """The defect task's own adapter (grey conversion, preprocessing) and a real DefectCNN."""
    with _server(tmp_path_factory.mktemp("defect"), "defect", **_defect_fields(defect_onnx)) as served:
        yield served


def _table_release() -> tuple[Any, bytes]:
    """The table task's real adapter: a numeric column (standardised, with a missing indicator) and a categorical
    one (one-hot), and a linear model whose logits depend on both, so a column sent wrong shows in the answer."""
    from tasks.table.spec import Scaling, TableSpec

    spec = TableSpec(task="table", model="linear", num_classes=2, problem="classification", target="quality",
                     numeric={"temperature": Scaling(mean=80.0, std=5.0)},
                     categorical={"shift": ("day", "night", "<missing>", "<unknown>")}, classes=("ok", "scrap"),
                     features=("temperature", "temperature:missing", "shift=day", "shift=night", "shift=<missing>", "shift=<unknown>"))
    weights = np.array([[1.0, -1.0], [0.0, 2.0], [0.5, 0.0], [0.0, 1.5], [0.0, 0.0], [0.0, 3.0]])
    onnx = linear_onnx((len(spec.features),), [0.25, 0.0], weights=weights)
    return release("table", 1, onnx=onnx, model_name="maxfl-table", task_spec=spec.model_dump_json())


@pytest.fixture(scope="module")
def table_server(tmp_path_factory) -> Iterator[tuple[str, triton.InferenceServerClient, Any]]:
    manifest, onnx = _table_release()
    cfg = plant(tmp_path_factory.mktemp("table"))
    EdgeStore(cfg.edge_store_path()).install(manifest, onnx)
    with in_process_server(cfg, None, max_batch=MAX_BATCH) as (url, watcher):
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        yield url, client, watcher
        client.close()


def _input(name: str, array: np.ndarray, datatype: str, binary: bool = True) -> triton.InferInput:
    inp = triton.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array, binary_data=binary)
    return inp


def _refused(call: Any, status: int, fragment: str) -> str:
    with pytest.raises(InferenceServerException) as caught:
        call()
    assert caught.value.status() == str(status), (caught.value.status(), caught.value.message())
    message = caught.value.message()
    assert fragment in message and "\n" not in message, message
    return message


# ---- health, metadata ------------------------------------------------------------------------------------------


def test_readiness_follows_the_served_model_and_liveness_does_not(tmp_path, fake_tasks):
    with _server(tmp_path, None) as (url, client, _):
        assert client.is_server_live() and not client.is_server_ready()
        assert not client.is_model_ready("maxfl-fake-window")
        r = httpx.get(f"{url}/v2/health/ready")
        assert r.status_code == 503 and "no model is installed at this plant yet" in r.json()["error"]
        _refused(lambda: client.infer("maxfl-fake-window", [_input("window", WINDOW[None], "FP32")]), 503, "is not ready")
        EdgeStore(plant(tmp_path).edge_store_path()).install(*release("fake-window", 1))
        wait_for("the first install to be ready", client.is_server_ready)
        assert client.is_model_ready("maxfl-fake-window") and client.is_model_ready("maxfl-fake-window", "1")
        assert not client.is_model_ready("maxfl-fake-window", "2") and not client.is_model_ready("another-model")
        assert httpx.get(f"{url}/v2/models/another-model/ready").status_code == 404


def test_server_metadata_names_the_binary_tensor_data_extension(row_server):
    _, client, _ = row_server
    meta = client.get_server_metadata()
    assert meta["name"] == "maxfl-edge" and "binary_tensor_data" in meta["extensions"] and meta["version"]


def test_model_metadata_lists_tensors_and_reports_the_served_version_and_variant(tmp_path, fake_tasks):
    manifest, onnx = release("fake-window", 1)
    with _server(tmp_path, "fake-window") as (url, client, watcher):
        meta = client.get_model_metadata("maxfl-fake-window")
        assert meta["name"] == "maxfl-fake-window" and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [{"name": "window", "datatype": "FP32", "shape": [-1, *WINDOW_SHAPE]}]
        assert meta["outputs"] == [{"name": "label", "datatype": "BYTES", "shape": [-1]}, {"name": "logits", "datatype": "FP32", "shape": [-1, 2]}]
        assert meta["parameters"]["version"] == 1 and meta["parameters"]["variant"] == "global"
        assert meta["parameters"]["sha256"] == manifest.sha256 and meta["parameters"]["plant"] == "plant-1"
        assert client.get_model_metadata("maxfl-fake-window", "1") == meta
        _refused(lambda: client.get_model_metadata("maxfl-fake-window", "2"), 404, "version 2 is not served here: version 1 is")
        _refused(lambda: client.get_model_metadata("another-model"), 404, "unknown model 'another-model'; this server serves maxfl-fake-window")

        store = EdgeStore(plant(tmp_path).edge_store_path())
        store.install_variant(manifest, "personalised", linear_onnx(FAKE_TASKS["fake-window"].shape, [7.0, 0.0]), "eval_macro_f1", {"global": 0.5})
        wait_for("the plant's variant to be served", lambda: watcher.runtime.variant == "personalised")
        meta = client.get_model_metadata("maxfl-fake-window")
        assert meta["parameters"]["version"] == 1 and meta["parameters"]["variant"] == "personalised"
        result = client.infer("maxfl-fake-window", [_input("window", WINDOW[None], "FP32")])
        assert result.get_response()["parameters"]["variant"] == "personalised"
        assert result.as_numpy("logits")[0, 0] == 7.0  # the variant's own weights answered


# ---- answers ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_windows_are_answered_with_binary_or_json_tensors(window_server, binary):
    url, client, _ = window_server
    batch = np.stack([WINDOW, WINDOW * 2, WINDOW * 0])
    result = client.infer("maxfl-fake-window", [_input("window", batch, "FP32", binary)], request_id="r-1")
    response = result.get_response()
    assert response["model_name"] == "maxfl-fake-window" and response["model_version"] == "1" and response["id"] == "r-1"
    assert all("parameters" in o and "binary_data_size" in o["parameters"] for o in response["outputs"])  # tritonclient asks for binary
    v1 = httpx.post(f"{url}/v1/predict", json={"instances": batch.tolist()}).json()["predictions"]
    np.testing.assert_array_equal(result.as_numpy("logits"), np.array([p["logits"] for p in v1], dtype=np.float32))
    assert result.as_numpy("label").tolist() == [str(p["label"]).encode() for p in v1]


def test_requested_outputs_come_as_asked_binary_or_json(window_server):
    _, client, _ = window_server
    outputs = [triton.InferRequestedOutput("label", binary_data=False), triton.InferRequestedOutput("logits", binary_data=True)]
    result = client.infer("maxfl-fake-window", [_input("window", WINDOW[None], "FP32")], outputs=outputs)
    label, logits = result.get_response()["outputs"]
    assert label == {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["0"]}
    assert logits["parameters"] == {"binary_data_size": 8} and logits["shape"] == [1, 2]
    assert result.as_numpy("logits").tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_table_rows_by_column_get_the_same_answers_as_v1(table_server, binary):
    """The real table adapter: a numeric column (NaN = missing) and a text column (an unseen category included)."""
    url, client, _ = table_server
    rows = [{"temperature": 85.0, "shift": "night"}, {"temperature": None, "shift": "day"}, {"temperature": 71.5, "shift": "evening"}]
    meta = client.get_model_metadata("maxfl-table")
    assert meta["inputs"] == [{"name": "temperature", "datatype": "FP32", "shape": [-1, 1]}, {"name": "shift", "datatype": "BYTES", "shape": [-1, 1]}]
    assert json.loads(meta["parameters"]["classes"]) == ["ok", "scrap"]
    temperature = np.array([[np.nan if r["temperature"] is None else r["temperature"]] for r in rows], dtype=np.float32)
    shift = np.array([[r["shift"].encode()] for r in rows], dtype=object)
    result = client.infer("maxfl-table", [_input("temperature", temperature, "FP32", binary), _input("shift", shift, "BYTES", binary)])
    v1 = httpx.post(f"{url}/v1/predict", json={"instances": rows}).json()["predictions"]
    expected = np.array([[p["probabilities"]["ok"], p["probabilities"]["scrap"]] for p in v1], dtype=np.float32)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), expected)
    assert [v.decode() for v in result.as_numpy("label")] == [p["label"] for p in v1]
    assert len({tuple(p) for p in expected.tolist()}) == 3  # the three rows differ: every column reached the model


def test_cell_images_as_files_pixels_or_base64_get_the_same_answer_as_v1(defect_server):
    """The defect task's own adapter and a real DefectCNN: encoded bytes (binary), 8-bit pixels (JSON) and base64 agree."""
    from PIL import Image

    url, client, _ = defect_server
    images = [png_bytes(300, seed=1), png_bytes(64, seed=2)]
    v1 = httpx.post(f"{url}/v1/predict", json={"instances": [base64.b64encode(i).decode() for i in images]}).json()["predictions"]
    expected = np.array([list(p["probabilities"].values()) for p in v1], dtype=np.float32)
    files = client.infer("maxfl-defect", [_input("image", np.array(images, dtype=object), "BYTES")])
    np.testing.assert_array_equal(files.as_numpy("probabilities"), expected)
    assert [v.decode() for v in files.as_numpy("label")] == [p["label"] for p in v1]
    levels = [np.asarray(Image.open(io.BytesIO(i))) for i in images]
    grey = client.infer("maxfl-defect", [_input("pixels", levels[1][None].astype(np.float32), "FP32", binary=False)])
    np.testing.assert_array_equal(grey.as_numpy("probabilities"), expected[1:])
    octets = client.infer("maxfl-defect", [_input("pixels", levels[0][None, :, :, None], "UINT8")])  # [N, H, W, 1]
    np.testing.assert_array_equal(octets.as_numpy("probabilities"), expected[:1])
    body = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [base64.b64encode(i).decode() for i in images]}]}
    r = httpx.post(f"{url}/v2/models/maxfl-defect/infer", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
    probabilities = next(o for o in r.json()["outputs"] if o["name"] == "probabilities")
    assert probabilities["shape"] == [2, 2]
    np.testing.assert_array_equal(np.array(probabilities["data"], dtype=np.float32).reshape(2, 2), expected)


def test_the_process_adapter_takes_windows_and_answers_faults_and_alarms():
    """The process task's real adapter (ProcessServing) behind a Runtime: its tensors by name, shape and datatype."""
    from edge import oip
    from edge.server import Limits, Runtime
    from maxfl import onnx_model
    from tasks.process.serving import ProcessServing

    window, variables = 20, 53
    serving = ProcessServing((0, 1, 6), window, variables, 0.5, np.zeros(variables), np.ones(variables))
    weights = np.random.default_rng(0).normal(size=(variables * window, 3)) * 0.01
    onnx = linear_onnx((variables, window), [0.0, 0.0, 0.0], weights=weights)
    rt = Runtime(manifest=release("fake-window", 1, onnx=onnx)[0], session=onnx_model.session(onnx), serving=serving, loaded_at=0.0, width=3)
    sig = oip.signature(rt)
    assert [(i.name, i.datatypes[0], i.shape) for i in sig.inputs] == [("window", "FP32", (-1, window, variables))]
    assert [(o.name, o.datatype, o.shape) for o in sig.outputs] == [
        ("label", "BYTES", [-1]), ("probabilities", "FP32", [-1, 3]), ("fault", "INT64", [-1]), ("alarm", "BOOL", [-1])]
    assert sig.classes == ("normal", "IDV01", "IDV06")
    batch = np.random.default_rng(1).normal(size=(2, window, variables)).astype(np.float32)
    answers = rt.predict(oip.instances(rt, {"window": batch}, Limits()))
    tensors = oip.outputs(rt, answers)
    assert tensors["fault"].tolist() == [a["fault"] for a in answers] and tensors["alarm"].tolist() == [a["alarm"] for a in answers]
    np.testing.assert_array_equal(tensors["probabilities"], np.array([list(a["probabilities"].values()) for a in answers], dtype=np.float32))
    with pytest.raises(Exception, match=r"input 'window' has shape \[2, 53, 20\]; this model takes \[-1, 20, 53\]"):
        oip.instances(rt, {"window": batch.transpose(0, 2, 1)}, Limits())


# ---- bad requests: the protocol's status and one line -------------------------------------------------------------


def _binary(header: dict[str, Any], *tails: bytes) -> dict[str, Any]:
    head = json.dumps(header).encode()
    return {"content": head + b"".join(tails), "headers": {"Inference-Header-Content-Length": str(len(head))}}


def _window(data: Any = None, shape: list[int] | None = None, datatype: str = "FP32", name: str = "window", **extra: Any) -> dict[str, Any]:
    tensor = {"name": name, "shape": shape if shape is not None else [1, *WINDOW_SHAPE], "datatype": datatype, **extra}
    if data is not None:
        tensor["data"] = data
    return tensor


FLAT = WINDOW.ravel().tolist()
RAW = WINDOW.astype("<f4").tobytes()


@pytest.mark.parametrize(("request_kwargs", "status", "fragment"), [
    pytest.param({"json": {"inputs": [_window(FLAT, name="windows")]}}, 400, "unknown input 'windows'; maxfl-fake-window takes window (FP32 [-1, 3, 4])", id="unknown-input"),
    pytest.param({"json": {"inputs": [_window([int(v) for v in FLAT], datatype="INT64")]}}, 400, "input 'window' is INT64; maxfl-fake-window takes it as FP32", id="wrong-datatype"),
    pytest.param({"json": {"inputs": [_window(FLAT, datatype="FP16")]}}, 400, "datatype 'FP16' is not served here", id="unserved-datatype"),
    pytest.param({"json": {"inputs": [_window(FLAT, shape=[1, 4, 3])]}}, 400, "input 'window' has shape [1, 4, 3]; this model takes [-1, 3, 4]", id="wrong-shape"),
    pytest.param({"json": {"inputs": [_window(FLAT[:-1])]}}, 400, "holds 11 value(s), its shape says 12", id="json-length-mismatch"),
    pytest.param({"json": {"inputs": [_window(["a"] * 12)]}}, 400, "data must be numbers, found str 'a'", id="strings-as-numbers"),
    pytest.param({"json": {"inputs": [_window()]}}, 400, "input 'window' has no data", id="no-data"),
    pytest.param({"json": {"inputs": [_window(FLAT), _window(FLAT)]}}, 400, "input 'window' is sent twice", id="twice"),
    pytest.param({"json": {"inputs": [_window(FLAT * (MAX_BATCH + 1), shape=[MAX_BATCH + 1, *WINDOW_SHAPE])]}}, 400,
                 f"{MAX_BATCH + 1} instances in one request; this server takes at most {MAX_BATCH} (--max-batch)", id="too-many-instances"),
    pytest.param({"json": {"inputs": [_window([], shape=[0, *WINDOW_SHAPE])]}}, 400, "the request holds no instances", id="no-instances"),
    pytest.param({"json": {"inputs": [_window(FLAT)], "outputs": [{"name": "scores"}]}}, 400, "unknown output 'scores'; maxfl-fake-window gives label, logits", id="unknown-output"),
    pytest.param({"json": {"inputs": [_window(FLAT)], "priority": 1}}, 400, "priority", id="unknown-field"),
    pytest.param({"json": {"inputs": []}}, 400, "inputs", id="no-inputs"),
    pytest.param({"content": b'{"inputs": [', "headers": {"Content-Type": "application/json"}}, 400, "body is not valid JSON", id="malformed-json"),
    pytest.param(_binary({"inputs": [_window(parameters={"binary_data_size": len(RAW) - 4})]}, RAW[:-4]), 400,
                 f"needs {len(RAW)} bytes of binary data, binary_data_size gives {len(RAW) - 4}", id="binary-length-mismatch"),
    pytest.param(_binary({"inputs": [_window(parameters={"binary_data_size": len(RAW) + 4})]}, RAW), 400,
                 "runs past the end of the body", id="binary-past-the-end"),
    pytest.param(_binary({"inputs": [_window(parameters={"binary_data_size": len(RAW)})]}, RAW, b"more"), 400,
                 "4 bytes of binary data follow the inputs", id="binary-left-over"),
    pytest.param(_binary({"inputs": [_window(FLAT, parameters={"binary_data_size": len(RAW)})]}, RAW), 400,
                 "has both JSON data and binary_data_size", id="binary-and-json"),
    pytest.param({"content": b'{"inputs": []}', "headers": {"Inference-Header-Content-Length": "999"}}, 400,
                 "Inference-Header-Content-Length is 999 but the body holds 14 bytes", id="header-length-past-the-body"),
    pytest.param({"content": b"{}", "headers": {"Inference-Header-Content-Length": "two"}}, 400, "'two' is not a number", id="header-length-not-a-number"),
    pytest.param({"content": b"{}", "headers": {"Content-Encoding": "gzip"}}, 415, "Content-Encoding 'gzip' is not accepted", id="compressed"),
    pytest.param({"json": {"inputs": [_window(FLAT * 6000, shape=[6000, *WINDOW_SHAPE])]}}, 413, "larger than this server's limit", id="oversized-body"),
])
def test_bad_window_requests_get_the_protocols_error_in_one_line(window_server, request_kwargs, status, fragment):
    url, _, _ = window_server
    r = httpx.post(f"{url}/v2/models/maxfl-fake-window/infer", **request_kwargs)
    assert r.status_code == status, r.text
    message = r.json()["error"]
    assert fragment in message and "\n" not in message, message


def test_bad_requests_through_tritonclient_raise_its_exception_with_the_servers_line(window_server, row_server, image_server):
    _, window, _ = window_server
    _refused(lambda: window.infer("maxfl-fake-window", [_input("window", np.zeros((1, 4, 3), np.float32), "FP32")]), 400,
             "input 'window' has shape [1, 4, 3]; this model takes [-1, 3, 4]")
    _refused(lambda: window.infer("maxfl-fake-window", [_input("window", np.zeros((1, *WINDOW_SHAPE)), "FP64")]), 400,
             "input 'window' is FP64; maxfl-fake-window takes it as FP32")
    _refused(lambda: window.infer("maxfl-fake-window", [_input("window", WINDOW[None], "FP32")], model_version="3"), 404,
             "maxfl-fake-window version 3 is not served here: version 1 is")
    _refused(lambda: window.infer("maxfl-other", [_input("window", WINDOW[None], "FP32")]), 404, "unknown model 'maxfl-other'")
    _, rows, _ = row_server
    _refused(lambda: rows.infer("maxfl-fake-row", [_input("temperature", np.ones((2, 1), np.float32), "FP32")]), 400,
             "missing input(s) 'pressure'")
    _refused(lambda: rows.infer("maxfl-fake-row", [_input("temperature", np.ones((2, 1), np.float32), "FP32"),
                                                   _input("pressure", np.ones((3, 1), np.float32), "FP32")]), 400,
             "the inputs hold different numbers of instances (temperature: 2, pressure: 3)")
    _, images, _ = image_server
    _refused(lambda: images.infer("maxfl-fake-image", [_input("image", np.array([png_bytes(), b"GIF89a not really"], dtype=object), "BYTES")]),
             400, "instance 1 is not an image")
    _refused(lambda: images.infer("maxfl-fake-image", [_input("pixels", np.full((1, 8, 8), 1000.0, np.float32), "FP32")]), 400,
             "holds values outside 0-255")
    _refused(lambda: images.infer("maxfl-fake-image", [_input("image", np.array([png_bytes()], dtype=object), "BYTES"),
                                                       _input("pixels", np.zeros((1, 8, 8), np.uint8), "UINT8")]), 400, "send one image input")


@pytest.mark.parametrize(("body", "fragment"), [
    pytest.param({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%% not base64"]}]},
                 "element 0 of input 'image' is not valid base64", id="bad-base64"),
    pytest.param({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [17]}]},
                 "BYTES data in JSON must be strings, found int", id="number-as-bytes"),
    pytest.param({"inputs": [{"name": "pixels", "shape": [1, 8], "datatype": "UINT8", "data": [0] * 8}]},
                 "send [N, height, width] (grey) or [N, height, width, channels]", id="pixels-without-height"),
])
def test_bad_image_requests_get_400_and_one_line(image_server, body, fragment):
    url, _, _ = image_server
    r = httpx.post(f"{url}/v2/models/maxfl-fake-image/infer", json=body)
    assert r.status_code == 400 and fragment in r.json()["error"], r.text


def test_binary_bytes_elements_cut_short_are_a_400(image_server):
    url, _, _ = image_server
    raw = struct.pack("<I", 50) + b"short"
    header = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}]}
    r = httpx.post(f"{url}/v2/models/maxfl-fake-image/infer", **_binary(header, raw))
    assert r.status_code == 400 and "a BYTES element says 50 bytes but 5 are left" in r.json()["error"], r.text


# ---- fuzz: no v2 body gets a 5xx -------------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats() | st.text(max_size=8)
datas = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6), max_leaves=30)
shapes = st.lists(st.integers(0, 6), max_size=5)
tensors = st.fixed_dictionaries(
    {"name": st.sampled_from(["window", "image", "pixels", "temperature", "pressure", "x"]), "shape": shapes,
     "datatype": st.sampled_from(["FP32", "FP64", "UINT8", "INT64", "BOOL", "BYTES", "FP16", ""])},
    optional={"data": datas, "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-2, 80) | scalars})},
)


@st.composite
def v2_bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    header: dict[str, Any] = {"inputs": draw(st.lists(tensors, max_size=3))}
    if draw(st.booleans()):
        header["outputs"] = [{"name": n, "parameters": {"binary_data": draw(st.booleans() | scalars)}}
                             for n in draw(st.lists(st.sampled_from(["label", "logits", "probabilities", "nope"]), max_size=2))]
    if draw(st.booleans()):
        header["parameters"] = {"binary_data_output": draw(st.booleans() | scalars)}
    head = json.dumps(header).encode()
    tail = draw(st.binary(max_size=120))
    headers: dict[str, str] = {}
    if tail or draw(st.booleans()):
        headers["Inference-Header-Content-Length"] = str(draw(st.sampled_from([len(head), len(head) + 1, 0, len(head) + len(tail) + 5])))
    body = head + tail
    if draw(st.integers(0, 9)) == 0:  # a few bytes cut: malformed JSON
        body = body[: draw(st.integers(0, len(body)))]
    return body, headers


@pytest.fixture(scope="module")
def fuzz_clients(tmp_path_factory, fake_tasks) -> Iterator[dict[str, TestClient]]:
    from edge.server import Limits, ModelWatcher, create_app

    clients = {}
    limits = Limits(max_batch=4, max_body_bytes=20_000, max_image_pixels=40_000, max_image_side=1_000)
    for task in ("fake-window", "fake-row", "fake-image"):
        cfg = plant(tmp_path_factory.mktemp(f"fuzz-{task}"))
        EdgeStore(cfg.edge_store_path()).install(*release(task, 1))
        watcher = ModelWatcher(EdgeStore(cfg.edge_store_path()), cfg, None)
        watcher.check(force=True)
        clients[task] = TestClient(create_app(watcher, cfg.plant_id, limits), raise_server_exceptions=False)
    yield clients
    for client in clients.values():
        client.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(task=st.sampled_from(["fake-window", "fake-row", "fake-image"]), request=v2_bodies(), versioned=st.booleans())
def test_no_v2_request_gets_a_5xx(fuzz_clients, task, request, versioned):
    body, headers = request
    path = f"/v2/models/maxfl-{task}" + ("/versions/1" if versioned else "") + "/infer"
    r = fuzz_clients[task].post(path, content=body, headers=headers)
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code != 200:
        message = r.json()["error"]
        assert message and "\n" not in message, message


# ---- a real `maxfl edge serve` process ------------------------------------------------------------------------------


@pytest.mark.e2e
def test_tritonclient_against_the_edge_serve_command_with_a_real_release(tmp_path, defect_onnx):
    """`python -m edge.cli serve` (the `maxfl edge serve` command) with a DefectCNN: the v2 conformance a client needs."""
    cfg = plant(tmp_path, "plant-3")
    argv = [sys.executable, "-m", "edge.cli", "serve", "--node-config", cfg.as_node_config(), "--port", "{port}", "--max-batch", "8"]
    with process_server(cfg, None, tmp_path / "logs", argv=argv) as (url, _):
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        try:
            assert client.is_server_live() and not client.is_server_ready()
            EdgeStore(cfg.edge_store_path()).install(*release("defect", 2, **_defect_fields(defect_onnx)))
            wait_for("the release to be ready", client.is_server_ready, 30)
            assert client.is_model_ready("maxfl-defect", "2")
            meta = client.get_model_metadata("maxfl-defect")
            assert meta["versions"] == ["2"] and meta["parameters"]["variant"] == "global" and meta["parameters"]["task"] == "defect"
            assert [i["name"] for i in meta["inputs"]] == ["image", "pixels"] and json.loads(meta["parameters"]["classes"])
            images = np.array([png_bytes(300, seed=s) for s in range(8)], dtype=object)
            result = client.infer("maxfl-defect", [_input("image", images, "BYTES")], model_version="2")
            probabilities = result.as_numpy("probabilities")
            assert probabilities.shape == (8, 2) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
            _refused(lambda: client.infer("maxfl-defect", [_input("image", np.array([b"not an image"], dtype=object), "BYTES")]), 400,
                     "instance 0 is not a readable image")
        finally:
            client.close()
