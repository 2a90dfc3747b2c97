"""Edge tests: tiny ONNX models built directly (no torch export), fake tasks of each serving kind, and servers
over real HTTP on 127.0.0.1, in this process (a uvicorn thread) or as a separate process stopped by PID.

A subprocess server loads this file by path (`SERVER_BOOTSTRAP`) so that it knows the fake tasks too.
"""

from __future__ import annotations

import io
import json
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from maxfl.release import ReleaseManifest, sha256_hex

HERE = Path(__file__).resolve()
FAKES_MODULE = "edge_test_fakes"  # the name this file is importable under, so the task registry can name it

# ---- tiny ONNX models ---------------------------------------------------------------------------------------


def linear_onnx(feature_shape: Sequence[int], bias: Sequence[float], input_name: str = "input", output_name: str = "logits",
                weights: np.ndarray | None = None) -> bytes:
    """logits = flatten(x) @ weights + bias; weights 0 by default: every answer shows which model computed it (bias[0] = its version)."""
    import onnx
    from onnx import TensorProto, helper

    features = int(np.prod(feature_shape))
    classes = len(bias)
    w = np.zeros((features, classes)) if weights is None else np.asarray(weights, dtype=float).reshape(features, classes)
    graph = helper.make_graph(
        [helper.make_node("Flatten", [input_name], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "w"], ["mm"]),
         helper.make_node("Add", ["mm", "b"], [output_name])],
        "linear",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", *feature_shape])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", classes])],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, [features, classes], w.ravel().tolist()),
                     helper.make_tensor("b", TensorProto.FLOAT, [classes], list(bias))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def slow_onnx() -> bytes:
    """A fake-window model (logits [0, 0]) that first loops sum(input) times: zeros answer at once, a window
    summing to 1e12 would run for days unless onnxruntime's run is terminated."""
    import onnx
    from onnx import TensorProto, helper

    scalar = lambda name, kind: helper.make_tensor_value_info(name, kind, [])  # noqa: E731
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["acc_in", "one"], ["acc_out"])],
        "body", [scalar("i", TensorProto.INT64), scalar("cond_in", TensorProto.BOOL), scalar("acc_in", TensorProto.FLOAT)],
        [scalar("cond_out", TensorProto.BOOL), scalar("acc_out", TensorProto.FLOAT)],
        initializer=[helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    features = int(np.prod(WINDOW_SHAPE))
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["input"], ["total"], keepdims=0),
         helper.make_node("Cast", ["total"], ["trips"], to=TensorProto.INT64),
         helper.make_node("Loop", ["trips", "true", "zero"], ["acc"], body=body),
         helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "w"], ["mm"]),
         helper.make_node("Mul", ["acc", "zero"], ["nothing"]),
         helper.make_node("Add", ["mm", "nothing"], ["logits"])],
        "slow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *WINDOW_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        initializer=[helper.make_tensor("true", TensorProto.BOOL, [], [True]), helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
                     helper.make_tensor("w", TensorProto.FLOAT, [features, 2], [0.0] * features * 2)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def png_header(width: int, height: int, colour_type: int = 6) -> bytes:
    """A PNG whose header asks for width x height pixels (RGBA by default) over a few KB of zeros: a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(1 << 20), 9)) + chunk(b"IEND", b"")


# ---- fake tasks, one per serving kind -------------------------------------------------------------------------

IMAGE_SHAPE = (1, 8, 8)
WINDOW_SHAPE = (3, 4)
ROW_FIELDS = ("temperature", "pressure")


def _bad(message: str) -> Exception:
    from tasks.base import BadInput

    return BadInput(message)


def _answers(outputs: np.ndarray) -> list[dict[str, Any]]:
    return [{"label": int(np.argmax(row)), "logits": [float(v) for v in row]} for row in outputs]


class ImageServing:
    kind = "image"
    mode = "L"  # what the Open Inference Protocol's metadata names (edge.oip reads the real adapters' attributes)

    def batch(self, instances: Sequence[Any]) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        out = []
        for i, data in enumerate(instances):
            try:
                with Image.open(io.BytesIO(data)) as img:
                    out.append(np.asarray(img.convert("L").resize(IMAGE_SHAPE[1:]), dtype=np.float32)[None] / 255.0)
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise _bad(f"instance {i} is not an image ({type(exc).__name__})") from None
        return np.stack(out)

    answers = staticmethod(_answers)


class WindowServing:
    kind = "window"
    window, variables = WINDOW_SHAPE

    def batch(self, instances: Sequence[Any]) -> np.ndarray:
        out = []
        for i, window in enumerate(instances):
            try:
                x = np.asarray(window, dtype=np.float32)
            except (TypeError, ValueError):
                raise _bad(f"instance {i}: a window holds numbers only") from None
            if x.shape != WINDOW_SHAPE:
                raise _bad(f"instance {i}: window shape {list(x.shape)}, the model takes {list(WINDOW_SHAPE)} (variables x time)")
            out.append(x)
        return np.stack(out)

    answers = staticmethod(_answers)


class RowServing:
    kind = "row"
    columns = ROW_FIELDS

    def batch(self, instances: Sequence[Any]) -> np.ndarray:
        out = []
        for i, row in enumerate(instances):
            if not isinstance(row, dict):
                raise _bad(f"instance {i} must be an object {{column: value}}")
            missing = [f for f in ROW_FIELDS if f not in row]
            if missing:
                raise _bad(f"instance {i} lacks field(s) {', '.join(missing)}")
            if not all(isinstance(row[f], int | float) and not isinstance(row[f], bool) for f in ROW_FIELDS):
                raise _bad(f"instance {i}: {', '.join(ROW_FIELDS)} must be numbers")
            out.append([float(row[f]) for f in ROW_FIELDS])
        return np.asarray(out, dtype=np.float32)

    answers = staticmethod(_answers)


class GateServing:
    """Each instance names a file; the batch waits until every one exists: the test decides when the model is done."""

    kind = "window"

    def batch(self, instances: Sequence[Any]) -> np.ndarray:
        deadline = time.monotonic() + 300  # never a thread stuck for good, whatever the test does
        for gate in instances:
            while not Path(str(gate)).exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return np.zeros((len(instances), *WINDOW_SHAPE), dtype=np.float32)

    answers = staticmethod(_answers)


class FakeTask:
    models = ("linear",)

    def __init__(self, name: str, serving: type, shape: tuple[int, ...]) -> None:
        from tasks.base import DataProfile, TaskSpec

        self.name, self._serving, self.shape = name, serving, shape
        self.profile_type, self.spec_type = DataProfile, TaskSpec

    def serving(self, spec: Any, data_dir: Path) -> Any:
        return self._serving()


FAKE_TASKS = {
    "fake-image": FakeTask("fake-image", ImageServing, IMAGE_SHAPE),
    "fake-window": FakeTask("fake-window", WindowServing, WINDOW_SHAPE),
    "fake-row": FakeTask("fake-row", RowServing, (len(ROW_FIELDS),)),
    "fake-gate": FakeTask("fake-gate", GateServing, WINDOW_SHAPE),
}


def register_fakes() -> None:
    import tasks

    sys.modules.setdefault(FAKES_MODULE, sys.modules[__name__])
    for name in FAKE_TASKS:
        tasks._REGISTRY[name] = f"{FAKES_MODULE}:FAKE_{name.split('-')[1].upper()}"  # noqa: SLF001


def unregister_fakes() -> None:
    import tasks

    for name in FAKE_TASKS:
        tasks._REGISTRY.pop(name, None)  # noqa: SLF001


FAKE_IMAGE, FAKE_WINDOW, FAKE_ROW, FAKE_GATE = (FAKE_TASKS[f"fake-{kind}"] for kind in ("image", "window", "row", "gate"))


def release(task: str, version: int, onnx: bytes | None = None, model_name: str | None = None, **changes: Any) -> tuple[ReleaseManifest, bytes]:
    """A fake task's model of `version` (its logits are [version, 0]) and a proper manifest for it."""
    from tasks.base import TaskSpec

    if onnx is None:
        onnx = linear_onnx(FAKE_TASKS[task].shape, [float(version), 0.0])
    fields: dict[str, Any] = {
        "model_name": model_name or f"maxfl-{task}", "version": version, "task": task,
        "task_spec": TaskSpec(task=task, model="linear", num_classes=2).model_dump_json(),
        "sha256": sha256_hex(onnx), "size_bytes": len(onnx), "input_name": "input", "output_name": "logits",
        "mlflow_run_id": "0" * 32, "flwr_run_id": 1, "created_at": datetime.now(UTC),
    }
    return ReleaseManifest(**(fields | changes)), onnx


def png_bytes(size: int = 16, seed: int = 0) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(autouse=True, scope="module")
def fake_tasks() -> Iterator[None]:
    register_fakes()
    yield
    unregister_fakes()


# ---- servers ------------------------------------------------------------------------------------------------


def plant(tmp: Path, plant_id: str = "plant-1") -> Any:
    from fl_client.config import PlantConfig

    return PlantConfig(plant_id=plant_id, data_dir=tmp / "data", edge_store=tmp / "edge")


@contextmanager
def in_process_server(plant_config: Any, model_name: str | None, max_batch: int = 64, max_body_bytes: int = 8 << 20, page_token: str | None = None,
                      **limits: Any) -> Iterator[Any]:
    """A real uvicorn server on a free port in a thread of this process, with serve's connection limits; yields (base URL, watcher).
    `page_token`: the plant page's (None: a random one no one knows)."""
    import uvicorn

    from edge.server import Limits, ModelWatcher, create_app, uvicorn_limits
    from edge.store import EdgeStore
    from launcher.processes import free_port

    config = Limits(max_batch=max_batch, max_body_bytes=max_body_bytes, **limits)
    watcher = ModelWatcher(EdgeStore(plant_config.edge_store_path()), plant_config, model_name, poll_s=0.05, image_limits=config.image)
    watcher.check(force=True)
    watcher.start()
    port = free_port()
    app = create_app(watcher, plant_config.plant_id, config, page_token=page_token)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="warning", access_log=False,
                                           lifespan="off", ws="none", **uvicorn_limits(config)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "in-process edge server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", watcher
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        watcher.stop()


# A subprocess server: loads this file by path (for the fake tasks), then runs edge.server.serve.
SERVER_BOOTSTRAP = """
import importlib.util, json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
spec = importlib.util.spec_from_file_location({module!r}, {path!r})
fakes = importlib.util.module_from_spec(spec); sys.modules[{module!r}] = fakes; spec.loader.exec_module(fakes)
fakes.register_fakes()
from fl_client.config import PlantConfig
from edge.server import Limits, serve
args = json.loads(sys.argv[1])
serve(PlantConfig.model_validate(args.pop("plant")), args.pop("model"), limits=Limits(**args.pop("limits", {{}})), **args)
"""


@contextmanager
def process_server(plant_config: Any, model_name: str | None, log_dir: Path, argv: list[str] | None = None, **options: Any) -> Iterator[tuple[str, Any]]:
    """A real edge server process on a free port, stopped by PID; yields (base URL, its Managed process).

    `argv` None: edge.server.serve with the fake tasks known (`options` are serve's keyword arguments, `limits`
    a dict of Limits fields);
    otherwise the command to run (e.g. `python -m edge.cli serve ...`), with `{port}` filled in.
    """
    import httpx

    from launcher.processes import ProcessGroup, free_port

    port = free_port()
    if argv is None:
        args = {"plant": plant_config.model_dump(mode="json"), "model": model_name, "host": "127.0.0.1", "port": port, **options}
        argv = [sys.executable, "-c", SERVER_BOOTSTRAP.format(module=FAKES_MODULE, path=str(HERE)), json.dumps(args)]
    else:
        argv = [a.replace("{port}", str(port)) for a in argv]
    group = ProcessGroup(log_dir)
    proc = group.start("edge-server", argv, env=_env(), cwd=HERE.parents[2])
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code in (200, 503)
        except httpx.TransportError:
            return False

    try:
        group.wait_until("the edge server to answer /health", up, 30, proc)
        yield url, proc
    finally:
        group.stop_all(grace_s=5)
        assert not group.alive(), f"edge server processes still alive: {group.alive()}"


def _env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[2]), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def wait_for(what: str, check: Any, timeout_s: float = 5.0) -> float:
    """Poll `check` until true; returns the seconds it took."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout_s, f"timed out after {timeout_s:.0f}s waiting for {what}"
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.fixture(scope="session")
def defect_onnx() -> bytes:
    """A real DefectCNN exported to ONNX (a few seconds, once per session)."""
    import torch

    from maxfl.onnx_model import export
    from tasks.defect.model import DefectCNN

    torch.manual_seed(0)
    return export(DefectCNN(2), np.zeros((2, 1, 64, 64), dtype=np.float32))


@pytest.fixture(scope="session")
def defect_onnx_v2() -> bytes:
    """Another DefectCNN (other initial weights): a second version whose answers differ from the first's."""
    import torch

    from maxfl.onnx_model import export
    from tasks.defect.model import DefectCNN

    torch.manual_seed(1)
    return export(DefectCNN(2), np.zeros((2, 1, 64, 64), dtype=np.float32))


@pytest.fixture(scope="session")
def process_onnx() -> bytes:
    """The process task's default model (ProcessCNN, 53 variables, 3 classes) exported to ONNX."""
    import torch

    from maxfl.onnx_model import export
    from tasks.process.model import ProcessCNN

    torch.manual_seed(0)
    return export(ProcessCNN(53, 3), np.zeros((2, 53, 20), dtype=np.float32))


@pytest.fixture(scope="session")
def process_plant(tmp_path_factory) -> Path:
    """One TEP plant's recording (cached under the maxfl cache after the first run; the same one tests/tasks use)."""
    from tasks import get_task

    return get_task("process").prepare_plants(1, tmp_path_factory.mktemp("process"), 42, limit=120)[0]
