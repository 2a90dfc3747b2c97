"""The plant's inference server: the edge store's current version of one model, over HTTP, with onnxruntime.

One model per process. A watcher thread reads the model's `current.json` every 0.2 s (at once on SIGHUP);
when it moves, the new version is loaded and warmed up completely beside the old one and then swapped in by
replacing one reference. A request takes the runtime it starts with and answers with that runtime's version,
so a swap or a rollback never drops or fails a request, and a version that fails to load leaves the old one
serving. At start, a current version that cannot be loaded (damaged bytes, a missing release file, a broken
pointer) gives way to the newest installed version that can, and /health says so ("degraded").

Bad input is answered with a 4xx and one line saying what is wrong; it never reaches the model. Resources are
bounded: image sizes are read from the header before decoding, at most `Limits.max_in_model` requests are in the
model at once with `max_waiting` more queued (503 + Retry-After beyond), each request has a time limit (its
onnxruntime run is terminated past it), and every connection must send its request head and body in time.

Beside its own `/v1/predict`, the server speaks KServe's Open Inference Protocol v2 (edge.oip) through the same
adapter, limits and admission (edge.gate), exports Prometheus metrics (edge.metrics) and serves the plant's page
(edge.plant_page), the only part that needs a token.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
import signal
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edge.gate import MB, Abandoned, Gate, Refused, first_line, load_json
from edge.store import CurrentPointer, EdgeStore, InstalledModel
from maxfl.errors import ConfigError, ProcessError, describe_validation_error
from maxfl.release import ReleaseManifest
from tasks.base import BadInput
from tasks.serving import ImageLimits, ImageServing, check_image_size

if TYPE_CHECKING:
    import onnxruntime

    from fl_client.config import PlantConfig
    from tasks.base import Serving

log = logging.getLogger("maxfl.edge")

JSON_TYPE = "application/json"
PAGE_TOKEN_FILE = "page-token"  # in the edge store's folder: the plant page's token (maxfl.page_auth)
RAW_TYPES = ("application/octet-stream",)  # and image/*


@dataclass(frozen=True)
class Limits:
    """What one request and one connection may cost; every field is a `maxfl edge serve` flag."""

    max_batch: int = 64
    max_body_bytes: int = 8 * MB
    max_image_pixels: int = ImageLimits.max_pixels
    max_image_side: int = ImageLimits.max_side
    max_in_model: int = 2  # requests being parsed, decoded or inferred at once (one thread each)
    max_waiting: int = 16  # admitted requests waiting for the model; more are answered 503 at once
    request_timeout_s: float = 10.0  # from the whole body to the answer: waiting, decoding and inference
    head_timeout_s: float = 10.0  # a connection's request line and headers
    body_timeout_s: float = 30.0  # its body, once the headers are in
    keep_alive_s: int = 5  # an idle kept-alive connection
    max_connections: int = 256  # open at once; more get uvicorn's 503
    max_head_bytes: int = 16 * 1024  # request line and headers

    @property
    def image(self) -> ImageLimits:
        return ImageLimits(max_pixels=self.max_image_pixels, max_side=self.max_image_side)

    def check(self) -> None:
        """One line naming the first value that cannot work."""
        for name in ("max_batch", "max_body_bytes", "max_image_pixels", "max_image_side", "max_in_model", "max_connections", "keep_alive_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_waiting < 0:
            raise ConfigError(f"--max-waiting must be 0 or more, got {self.max_waiting}")
        for name in ("request_timeout_s", "head_timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"--{name.replace('_', '-')} must be a number of seconds above 0, got {value}")


@dataclass(frozen=True, eq=False)
class Runtime:
    """One loaded, warmed-up model version; never changed after it is built, so requests can share it."""

    manifest: ReleaseManifest
    session: onnxruntime.InferenceSession
    serving: Serving
    loaded_at: float
    variant: str = "global"  # or the plant's own: "personalised" (the global model fine-tuned here), "local" (trained here alone)
    width: int = 0  # the model's outputs per instance (classes, or 1 for a value), from the warm-up run

    @property
    def kind(self) -> str:
        return self.serving.kind

    def describe(self) -> dict[str, Any]:
        return {"name": self.manifest.model_name, "version": self.manifest.version, "sha256": self.manifest.sha256, "variant": self.variant}

    def predict(self, instances: list[Any], run_options: onnxruntime.RunOptions | None = None) -> list[dict[str, Any]]:
        """Adapter, model, answers; raises BadInput for instances the model cannot take, Abandoned once
        `run_options.terminate` is set (the request's time ran out)."""
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # overflow to float32 is caught just below
                x = np.ascontiguousarray(self.serving.batch(instances), dtype=np.float32)
        except BadInput:
            raise
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            # The adapter should have said BadInput; it is still the request's content that it could not read.
            log.warning("%s adapter raised %s instead of BadInput", self.manifest.task, type(exc).__name__, exc_info=True)
            raise BadInput(f"the instances cannot be read as {self.kind}s ({type(exc).__name__}: {first_line(exc)})") from None
        if not np.isfinite(x).all():
            bad = int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0]) if x.ndim else 0
            raise BadInput(f"instance {bad} holds values that are not finite as the model's float32 inputs (NaN, infinity or "
                           "beyond 3.4e38); send measured values")
        if run_options is not None and run_options.terminate:
            raise Abandoned
        outputs = self.session.run([self.manifest.output_name], {self.manifest.input_name: x}, run_options)[0]
        if not np.isfinite(outputs).all():
            raise BadInput("the model's outputs for these instances are not finite numbers: their values lie far outside "
                           "what it was trained on")
        return self.serving.answers(outputs)


def load_runtime(store: EdgeStore, installed: InstalledModel, plant: PlantConfig, threads: int,
                 image_limits: ImageLimits | None = None) -> Runtime:
    """Verify, load and warm up a version; raises (anything) if it cannot serve."""
    from maxfl import onnx_model
    from tasks import get_task

    m = installed.manifest
    sess = onnx_model.session(store.verified_bytes(installed), threads)
    task = get_task(m.task)
    spec = task.spec_type.model_validate_json(m.task_spec)
    serving = task.serving(spec, plant.data_dir)
    if isinstance(serving, ImageServing) and image_limits is not None:
        serving = replace(serving, limits=image_limits)
    # One inference before the swap: onnxruntime allocates and picks kernels on the first run, which would
    # otherwise land on the first request to the new version.
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in sess.get_inputs()[0].shape]
    out = sess.run([m.output_name], {m.input_name: np.zeros(shape, dtype=np.float32)})[0]
    return Runtime(manifest=m, session=sess, serving=serving, loaded_at=time.time(), variant=installed.variant,
                   width=int(out.shape[-1]) if out.ndim else 1)


def _signature(path: os.PathLike[str]) -> bytes | None:
    """The pointer's bytes: a few hundred, and unlike mtime and inode they change with every move, however quick."""
    try:
        with open(path, "rb") as fh:
            return fh.read(1 << 16)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a directory, unreadable: a damaged pointer, which check() reports
        return f"unreadable: {exc.errno}".encode()


def _describe(exc: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return describe_validation_error(exc, exc.title)
    return " ".join(str(exc).split())[:500] or type(exc).__name__


def _identity(installed: InstalledModel) -> tuple[object, ...]:
    """What a runtime serves. The plant's own variant of a version arrives after the release itself
    (personalisation takes seconds): the same version with another file to serve is another model to load."""
    record = installed.variant_record
    return installed.manifest.version, installed.manifest.sha256, installed.variant, record.sha256 if record else None


SwapKind = Literal["update", "rollback", "variant"]
SWAPS_KEPT = 50


@dataclass(frozen=True)
class Swap:
    """One change of the served model while this server ran."""

    at: float  # when the new version started serving (time.time())
    model: str
    kind: SwapKind  # "update": a newer install or an activation; "rollback": back down the history; "variant": same version, the plant's own
    from_version: int
    to_version: int
    variant: str  # what serves now


def _swap_kind(old: Runtime, was: CurrentPointer | None, new: Runtime, now: CurrentPointer | None) -> SwapKind:
    """A rollback pops the store's history: the new history is a shorter start of the one the old version served under."""
    if new.manifest.version == old.manifest.version:
        return "variant"
    if was is not None and now is not None and len(now.history) < len(was.history) and was.history[: len(now.history)] == now.history:
        return "rollback"
    return "update"


class ModelWatcher:
    """Keeps `runtime` at the store's current version of the model; `model_name` None: the first that appears."""

    def __init__(self, store: EdgeStore, plant: PlantConfig, model_name: str | None, threads: int = 1, poll_s: float = 0.2,
                 image_limits: ImageLimits | None = None) -> None:
        self.store = store
        self.plant = plant
        self.model_name = model_name
        self.threads = threads
        self.poll_s = poll_s
        self.image_limits = image_limits
        self.runtime: Runtime | None = None
        self.problem: str | None = None  # why the version serving is not the one the pointer names (or none serves)
        self.pointer: CurrentPointer | None = None  # the store's pointer when `runtime` was loaded from it
        self.swaps: deque[Swap] = deque(maxlen=SWAPS_KEPT)  # newest last
        self.swap_counts: Counter[str] = Counter()  # by kind, since start
        self.load_failures = 0  # versions that failed to load, fallbacks included
        self._seen: bytes | None = None
        self._identity: tuple[object, ...] | None = None  # what `runtime` serves: version, release and variant hashes
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
                state, installed = self.store.current_state(self.model_name)
            except Exception as exc:  # noqa: BLE001 - a damaged store must not stop the version that serves
                self._failed(_describe(exc), None)
                return
            if installed is None:
                if self.runtime is None and self.store.installed_versions(self.model_name):
                    self._failed(f"{self.model_name} has no current version ({self.store.pointer(self.model_name)} is missing)", None)
                return
            m, old = installed.manifest, self.runtime
            identity = _identity(installed)
            if old is not None and identity == self._identity:
                self.problem, self.pointer = None, state
                return
            started = time.perf_counter()
            try:
                new = load_runtime(self.store, installed, self.plant, self.threads, self.image_limits)
            except Exception as exc:  # noqa: BLE001 - whatever a broken release raises, the old version keeps serving
                self.load_failures += 1
                self._failed(f"{m.label} failed to load: {_describe(exc)}", m.version)
                return
            if old is not None:
                self._swapped(old, new, _swap_kind(old, self.pointer, new, state))
            self.runtime, self.problem, self._identity, self.pointer = new, None, identity, state
            variant = "" if installed.variant == "global" else f", this plant's {installed.variant} variant"
            log.info("now serving %s%s (sha256 %s, task %s; loaded in %.2f s)%s", m.label, variant, m.sha256[:12], m.task,
                     time.perf_counter() - started, f", was v{old.manifest.version}" if old else "")

    def _swapped(self, old: Runtime, new: Runtime, kind: SwapKind) -> None:
        self.swaps.append(Swap(at=new.loaded_at, model=new.manifest.model_name, kind=kind, from_version=old.manifest.version,
                               to_version=new.manifest.version, variant=new.variant))
        self.swap_counts[kind] += 1

    def _failed(self, why: str, version: int | None) -> None:
        """The current version cannot serve: keep the one serving, or (none yet) fall back to the newest that loads."""
        self.problem = why
        if self.runtime is None and self.model_name is not None:
            self._fall_back(why, version)
        still = self.runtime.manifest.label if self.runtime else "nothing"
        log.error("%s; serving %s", self.problem, still)

    def _fall_back(self, why: str, broken: int | None) -> None:
        assert self.model_name is not None
        fix = f"ask the anchor to push v{broken} again" if broken else "repair current.json"
        for installed in self.store.fallbacks(self.model_name, skip=broken):
            try:
                self.runtime = load_runtime(self.store, installed, self.plant, self.threads, self.image_limits)
                self._identity = _identity(installed)
            except Exception as exc:  # noqa: BLE001 - an older version may be damaged too: try the next
                self.load_failures += 1
                log.warning("fallback %s does not load either: %s", installed.manifest.label, _describe(exc))
                continue
            n = installed.manifest.version
            self.problem = (f"{why}; serving v{n}, the newest installed version that loads, instead; fix: {fix}, "
                            f"or `maxfl edge activate --version {n}` to keep v{n}")
            return
        self.problem = f"{why}; no installed version loads; fix: {fix}"

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


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def decode_base64(value: Any, what: str) -> bytes:
    """An image file's bytes sent as text in JSON: base64, or a data URI (`data:image/png;base64,...`)."""
    if not isinstance(value, str):
        raise Refused(400, f"{what} must be a base64 string of an image file's bytes, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Refused(400, f"{what} is not valid base64 ({exc})") from None


def _json_instances(body: bytes, kind: str, limits: Limits) -> list[Any]:
    payload = load_json(body, '{"instances": [...]}')
    if not isinstance(payload, dict) or "instances" not in payload:
        raise Refused(400, "body must be a JSON object with a list under \"instances\"")
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise Refused(400, f"\"instances\" must be a list, got {type(instances).__name__}")
    if not instances:
        raise Refused(400, "\"instances\" is empty; send at least one")
    if len(instances) > limits.max_batch:
        raise Refused(413, f"{len(instances)} instances in one request; this server takes at most {limits.max_batch} (--max-batch)")
    if kind == "image":
        return [decode_base64(v, f"instance {i}") for i, v in enumerate(instances)]
    return instances


def check_images(rt: Runtime, instances: list[Any], limits: Limits) -> None:
    """Whatever the task's adapter does, no image is decoded past the server's limits (ImageTooLarge: 413)."""
    if rt.kind == "image":
        image = limits.image
        for i, data in enumerate(instances):
            check_image_size(data, i, image)


def _not_empty(body: bytes) -> None:
    if not body:
        raise Refused(400, "empty body; send the bytes of one image file")


def _answer(rt: Runtime, body: bytes, raw: bool, limits: Limits, run_options: onnxruntime.RunOptions) -> list[dict[str, Any]]:
    """On a model thread: parse, decode, infer; the answers are made JSON-safe here, not in the event loop."""
    if run_options.terminate:  # the request's time ran out while it waited
        raise Abandoned
    instances = [body] if raw else _json_instances(body, rt.kind, limits)
    check_images(rt, instances, limits)
    predictions = rt.predict(instances, run_options)
    try:
        json.dumps(predictions, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"the answers for these instances are not finite numbers ({first_line(exc)})") from None
    return predictions


def reject(request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """A refused request: logged with its client, answered `{"error": one line}` (the shape of both protocols)."""
    client = f"{request.client.host}:{request.client.port}" if request.client else "?"
    log.info("%s %s from %s -> %d: %s", request.method, request.url.path, client, status, message)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(watcher: ModelWatcher, plant_id: str, limits: Limits, *, page_token: str | None = None, page_hint: str = "") -> Starlette:
    """The edge server: `/health` and `POST /v1/predict` (maxfl's own JSON), KServe's Open Inference Protocol v2
    under `/v2` (edge.oip), `/metrics` (edge.metrics) and the plant's page under `/plant` (edge.plant_page).

    Only the page needs a token: `page_token` None makes a random one nobody knows (the page stays shut);
    `serve` passes the plant's own, and `page_hint` says in the 401 where it is.
    """
    import secrets

    from starlette.middleware import Middleware

    from edge import oip, plant_page
    from edge.metrics import EdgeMetrics, RequestMetrics
    from maxfl.page_auth import TokenAuth

    metrics = EdgeMetrics(watcher)
    gate = Gate(limits, on_refused=metrics.admission_refused)
    metrics.watch_admission(gate.admission)

    async def health(request: Request) -> JSONResponse:
        rt = watcher.runtime
        common = {"plant": plant_id, "watching": watcher.model_name, "problem": watcher.problem, "requests": gate.admission.describe()}
        if rt is None:
            return JSONResponse({"status": "no-model", "model": None, "serving": None, **common}, status_code=503)
        return JSONResponse({"status": "degraded" if watcher.problem else "serving", "model": {**rt.describe(), "task": rt.manifest.task},
                             "serving": rt.manifest.version, **common})

    async def predict(request: Request) -> JSONResponse:
        rt = watcher.runtime  # this request's model, whatever is swapped in meanwhile
        try:
            if rt is None:
                raise Refused(503, "no model is installed at this plant yet; the server serves the first one the anchor deploys")
            media = _media_type(request)
            raw = media.startswith("image/") or media in RAW_TYPES
            if media != JSON_TYPE and not raw:
                raise Refused(415, f"unsupported Content-Type {media or '(none)'!r}; send application/json {{\"instances\": [...]}}"
                                   + (", or one image file's bytes as image/* or application/octet-stream" if rt.kind == "image" else ""))
            if raw and rt.kind != "image":
                raise Refused(415, f"{rt.manifest.model_name} takes {rt.kind}s, not raw bytes; send application/json {{\"instances\": [...]}}")
            predictions = await gate.run(request, lambda body, run_options: _answer(rt, body, raw, limits, run_options),
                                         check_body=_not_empty if raw else None)
        except Refused as exc:
            return reject(request, exc.status, exc.message, exc.headers)
        return JSONResponse({"model": rt.describe(), "predictions": predictions},
                            headers={"X-Model-Version": f"{rt.manifest.model_name}/{rt.manifest.version}", "X-Model-Variant": rt.variant})

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return reject(request, exc.status_code, f"{exc.detail}: {request.method} {request.url.path}; use GET /health or POST /v1/predict, "
                                                f"the Open Inference Protocol under /v2, GET /metrics or GET /plant")

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/predict", predict, methods=["POST"]),
        *oip.routes(watcher, plant_id, limits, gate),
        Route("/metrics", metrics.endpoint, methods=["GET"]),
        *plant_page.routes(watcher, plant_id, metrics),
    ]
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(RequestMetrics, metrics=metrics, routes=routes),  # outermost: the page's 401s are counted too
            Middleware(TokenAuth, token=page_token or secrets.token_urlsafe(32), protected=plant_page.PROTECTED, hint=page_hint),
        ],
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


def page_url(host: str, port: int, token: str) -> str:
    """The plant page's address with its token, as printed at start (a wildcard address shows this host's name)."""
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    return f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/plant?token={token}"


def serve(plant: PlantConfig, model_name: str | None, host: str = "127.0.0.1", port: int = 8600, *, threads: int = 1,
          limits: Limits | None = None, poll_s: float = 0.2, announce: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM. Starts without a model if none is installed yet, and serves the first that is.

    `announce` gets one line, the plant page's URL with its token (default: logged); the token is made once, in
    `<edge store>/page-token` (owner-only), and read from there on every start."""
    import importlib.util

    import uvicorn

    from maxfl.page_auth import load_or_create_token

    absent = [name for name in ("prometheus_client", "jinja2") if importlib.util.find_spec(name) is None]
    if absent:
        raise ConfigError(f"the edge server needs {' and '.join(absent)}, which come with the plant's install: pip install 'maxfl[client]'")

    limits = limits or Limits()
    if threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    limits.check()
    import torch

    # The adapters' torch ops are small; more intra-op threads per request only fight the other requests.
    torch.set_num_threads(threads)
    store = EdgeStore(plant.edge_store_path())
    names = store.models()
    if model_name is None and len(names) > 1:
        raise ConfigError(f"the edge store at {store.root} holds several models ({', '.join(names)}): say which to serve with --model")
    watcher = ModelWatcher(store, plant, model_name or (names[0] if names else None), threads=threads, poll_s=poll_s,
                           image_limits=limits.image)
    watcher.check(force=True)
    token_file = store.root / PAGE_TOKEN_FILE
    token = load_or_create_token(token_file)
    sock = bind(host, port)
    app = create_app(watcher, plant.plant_id, limits, page_token=token, page_hint=f"the token is in {token_file}")
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off", ws="none", timeout_graceful_shutdown=10,
                            **uvicorn_limits(limits))
    server = uvicorn.Server(config)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGHUP, lambda *_: watcher.poke()) if in_main else None
    watcher.start()
    rt = watcher.runtime
    log.info("edge server of %s on http://%s:%d: %s (store %s)", plant.plant_id, host, sock.getsockname()[1],
             f"serving {rt.manifest.label}" if rt else f"no model yet, waiting for {watcher.model_name or 'the first install'}", store.root)
    if watcher.problem:
        log.error("degraded: %s", watcher.problem)
    (announce or log.info)(f"plant page: {page_url(host, sock.getsockname()[1], token)}")
    try:
        server.run(sockets=[sock])
    finally:
        watcher.stop()
        sock.close()
        if in_main:
            signal.signal(signal.SIGHUP, previous)


def uvicorn_limits(limits: Limits) -> dict[str, Any]:
    """uvicorn's settings for the connection limits: h11 with head and body deadlines (edge/connection.py)."""
    from edge.connection import deadline_protocol

    return {"http": deadline_protocol(limits.head_timeout_s, limits.body_timeout_s), "timeout_keep_alive": limits.keep_alive_s,
            "h11_max_incomplete_event_size": limits.max_head_bytes, "limit_concurrency": limits.max_connections}
