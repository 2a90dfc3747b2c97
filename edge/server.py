"""The plant's inference server: the edge store's current version of one model, over HTTP, with onnxruntime.

One model per process. A watcher thread reads the model's `current.json` every 0.2 s (at once on SIGHUP);
when it moves, the new version is loaded and warmed up completely beside the old one and then swapped in by
replacing one reference. A request takes the runtime it starts with and answers with that runtime's version,
so a swap or a rollback never drops or fails a request, and a version that fails to load leaves the old one
serving. Bad input is answered with a 4xx and one line saying what is wrong; it never reaches the model.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edge.store import EdgeStore, InstalledModel
from maxfl.errors import ConfigError, ProcessError, describe_validation_error
from maxfl.release import ReleaseManifest
from tasks.base import BadInput

if TYPE_CHECKING:
    import onnxruntime

    from fl_client.config import PlantConfig
    from tasks.base import Serving

log = logging.getLogger("maxfl.edge")

MB = 1024 * 1024
JSON_TYPE = "application/json"
RAW_TYPES = ("application/octet-stream",)  # and image/*


@dataclass(frozen=True)
class Limits:
    max_batch: int = 64
    max_body_bytes: int = 8 * MB


@dataclass(frozen=True, eq=False)
class Runtime:
    """One loaded, warmed-up model version; never changed after it is built, so requests can share it."""

    manifest: ReleaseManifest
    session: onnxruntime.InferenceSession
    serving: Serving
    loaded_at: float

    @property
    def kind(self) -> str:
        return self.serving.kind

    def describe(self) -> dict[str, Any]:
        return {"name": self.manifest.model_name, "version": self.manifest.version, "sha256": self.manifest.sha256}

    def predict(self, instances: list[Any]) -> list[dict[str, Any]]:
        """Adapter, model, answers; raises BadInput for instances the model cannot take."""
        try:
            x = np.ascontiguousarray(self.serving.batch(instances), dtype=np.float32)
        except BadInput:
            raise
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            # The adapter should have said BadInput; it is still the request's content that it could not read.
            log.warning("%s adapter raised %s instead of BadInput", self.manifest.task, type(exc).__name__, exc_info=True)
            raise BadInput(f"the instances cannot be read as {self.kind}s ({type(exc).__name__}: {_first_line(exc)})") from None
        outputs = self.session.run([self.manifest.output_name], {self.manifest.input_name: x})[0]
        return self.serving.answers(outputs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def load_runtime(store: EdgeStore, installed: InstalledModel, plant: PlantConfig, threads: int) -> Runtime:
    """Verify, load and warm up a version; raises (anything) if it cannot serve."""
    from maxfl import onnx_model
    from tasks import get_task

    m = installed.manifest
    sess = onnx_model.session(store.verified_bytes(installed), threads)
    task = get_task(m.task)
    spec = task.spec_type.model_validate_json(m.task_spec)
    serving = task.serving(spec, plant.data_dir)
    # One inference before the swap: onnxruntime allocates and picks kernels on the first run, which would
    # otherwise land on the first request to the new version.
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in sess.get_inputs()[0].shape]
    sess.run([m.output_name], {m.input_name: np.zeros(shape, dtype=np.float32)})
    return Runtime(manifest=m, session=sess, serving=serving, loaded_at=time.time())


def _signature(path: os.PathLike[str]) -> bytes | None:
    """The pointer's bytes: a few hundred, and unlike mtime and inode they change with every move, however quick."""
    try:
        with open(path, "rb") as fh:
            return fh.read(1 << 16)
    except FileNotFoundError:
        return None


def _describe(exc: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return describe_validation_error(exc, exc.title)
    return " ".join(str(exc).split())[:500] or type(exc).__name__


class ModelWatcher:
    """Keeps `runtime` at the store's current version of the model; `model_name` None: the first that appears."""

    def __init__(self, store: EdgeStore, plant: PlantConfig, model_name: str | None, threads: int = 1, poll_s: float = 0.2) -> None:
        self.store = store
        self.plant = plant
        self.model_name = model_name
        self.threads = threads
        self.poll_s = poll_s
        self.runtime: Runtime | None = None
        self.load_error: str | None = None  # why the version the pointer names is not the one serving
        self._seen: bytes | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self, force: bool = False) -> None:
        """Load the current version if the pointer changed since the last look (`force`: look anyway)."""
        with self._lock:
            if self.model_name is None:
                names = self.store.models()
                if not names:
                    return
                self.model_name = names[0]
                log.info("serving model %s, the first installed in %s", self.model_name, self.store.root)
            seen = _signature(self.store.pointer(self.model_name))
            if seen == self._seen and not force:
                return
            self._seen = seen
            try:
                installed = self.store.current(self.model_name)
            except Exception as exc:  # noqa: BLE001 - a damaged store must not stop the version that serves
                self._failed(_describe(exc))
                return
            if installed is None:
                return
            m, old = installed.manifest, self.runtime
            if old is not None and (old.manifest.version, old.manifest.sha256) == (m.version, m.sha256):
                self.load_error = None
                return
            started = time.perf_counter()
            try:
                new = load_runtime(self.store, installed, self.plant, self.threads)
            except Exception as exc:  # noqa: BLE001 - whatever a broken release raises, the old version keeps serving
                self._failed(f"{m.label} failed to load: {_describe(exc)}")
                return
            self.runtime, self.load_error = new, None
            log.info("now serving %s (sha256 %s, task %s; loaded in %.2f s)%s", m.label, m.sha256[:12], m.task,
                     time.perf_counter() - started, f", was v{old.manifest.version}" if old else "")

    def _failed(self, why: str) -> None:
        self.load_error = why
        still = self.runtime.manifest.label if self.runtime else "nothing"
        log.error("%s; still serving %s", why, still)

    def poke(self) -> None:
        """Check now (SIGHUP), and retry a version that failed to load."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edge-model-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            poked = self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.check(force=poked)
            except Exception:  # noqa: BLE001 - keep watching whatever one look ran into
                log.exception("edge model watcher: unexpected error; still watching")


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it is known to be over `limit` (declared length, then bytes read)."""
    too_large = _Reject(413, f"request body is larger than this server's limit of {limit / MB:g} MB (--max-body-mb); "
                             "send fewer or smaller instances per request")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise _Reject(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise _Reject(400, "the client closed the connection before sending the whole body") from None
    return b"".join(chunks)


def _decode_image(value: Any, i: int) -> bytes:
    if not isinstance(value, str):
        raise _Reject(400, f"instance {i} must be a base64 string of an image file's bytes, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:  # a data URI: data:image/png;base64,....
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _Reject(400, f"instance {i} is not valid base64 ({exc})") from None


def _json_instances(body: bytes, kind: str, limits: Limits) -> list[Any]:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _Reject(400, f"body is not valid JSON ({exc}); send {{\"instances\": [...]}}") from None
    except RecursionError:
        raise _Reject(400, "body is nested too deeply to be a request; send {\"instances\": [...]}") from None
    if not isinstance(payload, dict) or "instances" not in payload:
        raise _Reject(400, "body must be a JSON object with a list under \"instances\"")
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise _Reject(400, f"\"instances\" must be a list, got {type(instances).__name__}")
    if not instances:
        raise _Reject(400, "\"instances\" is empty; send at least one")
    if len(instances) > limits.max_batch:
        raise _Reject(413, f"{len(instances)} instances in one request; this server takes at most {limits.max_batch} (--max-batch)")
    if kind == "image":
        return [_decode_image(v, i) for i, v in enumerate(instances)]
    return instances


def _answer(rt: Runtime, body: bytes, raw: bool, limits: Limits) -> list[dict[str, Any]]:
    return rt.predict([body] if raw else _json_instances(body, rt.kind, limits))


def create_app(watcher: ModelWatcher, plant_id: str, limits: Limits) -> Starlette:
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    def reject(request: Request, status: int, message: str) -> JSONResponse:
        client = f"{request.client.host}:{request.client.port}" if request.client else "?"
        log.info("%s %s from %s -> %d: %s", request.method, request.url.path, client, status, message)
        return JSONResponse({"error": message}, status_code=status)

    async def health(request: Request) -> JSONResponse:
        rt = watcher.runtime
        if rt is None:
            return JSONResponse({"status": "no-model", "plant": plant_id, "model": None, "watching": watcher.model_name,
                                 "load_error": watcher.load_error}, status_code=503)
        return JSONResponse({"status": "serving", "plant": plant_id, "model": {**rt.describe(), "task": rt.manifest.task},
                             "load_error": watcher.load_error})

    async def predict(request: Request) -> JSONResponse:
        rt = watcher.runtime  # this request's model, whatever is swapped in meanwhile
        try:
            if rt is None:
                raise _Reject(503, "no model is installed at this plant yet; the server serves the first one the anchor deploys")
            media = _media_type(request)
            raw = media.startswith("image/") or media in RAW_TYPES
            if media != JSON_TYPE and not raw:
                raise _Reject(415, f"unsupported Content-Type {media or '(none)'!r}; send application/json {{\"instances\": [...]}}"
                                   + (", or one image file's bytes as image/* or application/octet-stream" if rt.kind == "image" else ""))
            if raw and rt.kind != "image":
                raise _Reject(415, f"{rt.manifest.model_name} takes {rt.kind}s, not raw bytes; send application/json {{\"instances\": [...]}}")
            body = await _read_body(request, limits.max_body_bytes)
            if raw and not body:
                raise _Reject(400, "empty body; send the bytes of one image file")
            # Parsing a large body takes milliseconds too: off the event loop, with the inference.
            predictions = await run_in_threadpool(_answer, rt, body, raw, limits)
        except _Reject as exc:
            return reject(request, exc.status, exc.message)
        except BadInput as exc:
            return reject(request, 400, _first_line(exc))
        except InvalidArgument as exc:  # the adapter let through something the model cannot take
            return reject(request, 400, f"the model cannot take this input: {_first_line(exc)}")
        return JSONResponse({"model": rt.describe(), "predictions": predictions},
                            headers={"X-Model-Version": f"{rt.manifest.model_name}/{rt.manifest.version}"})

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return reject(request, exc.status_code, f"{exc.detail}: {request.method} {request.url.path}; use GET /health or POST /v1/predict")

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)

    return Starlette(
        routes=[Route("/health", health, methods=["GET"]), Route("/v1/predict", predict, methods=["POST"])],
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything is served, so a taken port is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ProcessError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or stop what uses it") from None
    sock.set_inheritable(True)
    return sock


def serve(plant: PlantConfig, model_name: str | None, host: str = "127.0.0.1", port: int = 8600, *, threads: int = 1,
          max_batch: int = 64, max_body_mb: float = 8.0, poll_s: float = 0.2) -> None:
    """Serve until SIGINT/SIGTERM. Starts without a model if none is installed yet, and serves the first that is."""
    import uvicorn

    if threads < 1 or max_batch < 1 or max_body_mb <= 0:
        raise ConfigError("--threads and --max-batch must be at least 1 and --max-body-mb above 0")
    import torch

    # The adapters' torch ops are small; more intra-op threads per request only fight the other requests.
    torch.set_num_threads(threads)
    store = EdgeStore(plant.edge_store_path())
    names = store.models()
    if model_name is None and len(names) > 1:
        raise ConfigError(f"the edge store at {store.root} holds several models ({', '.join(names)}): say which to serve with --model")
    watcher = ModelWatcher(store, plant, model_name or (names[0] if names else None), threads=threads, poll_s=poll_s)
    watcher.check(force=True)
    sock = bind(host, port)
    app = create_app(watcher, plant.plant_id, Limits(max_batch=max_batch, max_body_bytes=int(max_body_mb * MB)))
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off", ws="none", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGHUP, lambda *_: watcher.poke()) if in_main else None
    watcher.start()
    rt = watcher.runtime
    log.info("edge server of %s on http://%s:%d: %s (store %s)", plant.plant_id, host, sock.getsockname()[1],
             f"serving {rt.manifest.label}" if rt else f"no model yet, waiting for {watcher.model_name or 'the first install'}", store.root)
    try:
        server.run(sockets=[sock])
    finally:
        watcher.stop()
        sock.close()
        if in_main:
            signal.signal(signal.SIGHUP, previous)
