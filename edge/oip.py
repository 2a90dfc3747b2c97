"""KServe's Open Inference Protocol v2 (REST) on the edge server, with Triton's binary tensor data extension.

So that a plant's line software can use any v2 client (tritonclient, KServe's own) instead of maxfl's `/v1`
JSON. A v2 request is turned into the instances of the task's serving adapter and answered by `Runtime.predict`,
through the same gate as `/v1/predict` (edge.gate): one set of checks, limits and admission for both protocols.

Tensors per kind of task (the model's metadata lists them, `GET /v2/models/{name}`):
- image tasks: `image`, BYTES [N] of encoded image files (PNG, JPEG, ...; base64 strings in JSON), or `pixels`,
  FP32 or UINT8 [N, H, W] or [N, H, W, C] of 8-bit levels (0-255), encoded losslessly and read like a file;
- the process task: `window`, FP32 [N, time steps, variables];
- the table task: one tensor per feature column, [N] or [N, 1], FP32 (NaN: missing) or BYTES (UTF-8 text).
Outputs are the adapter's answers as tensors: `label` (BYTES), `probabilities` (FP32 [N, classes], in the
order of the model's `classes` parameter), and whatever else the task answers (`alarm` BOOL, `fault` INT64,
`value` FP32 for a regression).

Errors are `{"error": "one line"}`: 400 for a request the model cannot take, 404 for a model or version not
served here, 503 while no version is loaded, 413/503/504 for the server's limits as on `/v1`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import struct
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edge.gate import Abandoned, Gate, Refused, load_json
from edge.server import Limits, ModelWatcher, Runtime, check_images, decode_base64, reject
from maxfl.errors import describe_validation_error
from tasks.base import BadInput

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger("maxfl.edge")

SERVER_NAME = "maxfl-edge"
PLATFORM = "onnxruntime_onnx"  # Triton's name for what runs the model
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_RANK = 8
NUMPY = {"BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
         "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
SEND = 'an Open Inference Protocol request {"inputs": [{"name", "shape", "datatype", "data"}]}'


# ---- the protocol's messages ----------------------------------------------------------------------------------

Parameters = dict[str, Any]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]  # -1: any size


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, str | int | float | bool]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=MAX_RANK)
    datatype: str
    parameters: Parameters = Field(default_factory=dict)
    data: Any = None  # JSON data, flat or nested in row-major order; absent when `binary_data_size` is set


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: Parameters = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    parameters: Parameters = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1, max_length=256)
    outputs: list[RequestOutput] | None = None


# ---- what a served model takes and gives ------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatypes: tuple[str, ...]  # accepted; the first is the one the metadata names
    shape: tuple[int, ...]  # with the batch; -1: any size


@dataclass(frozen=True)
class Signature:
    inputs: tuple[InputSpec, ...]
    outputs: tuple[TensorMetadata, ...]
    classes: tuple[str, ...] | None

    def metadata_inputs(self) -> list[TensorMetadata]:
        return [TensorMetadata(name=i.name, datatype=i.datatypes[0], shape=list(i.shape)) for i in self.inputs]


_signatures: weakref.WeakKeyDictionary[Runtime, Signature] = weakref.WeakKeyDictionary()
_signatures_lock = threading.Lock()


def signature(rt: Runtime) -> Signature:
    """The model's tensors: inputs from its adapter's kind, outputs from the adapter's answer to a zero output."""
    with _signatures_lock:
        found = _signatures.get(rt)
    if found is not None:
        return found
    sample = rt.serving.answers(np.zeros((1, max(rt.width, 1)), dtype=np.float32))[0]
    outputs, classes = [], None
    for key, value in sample.items():
        datatype, shape = _describe_output(key, value)
        outputs.append(TensorMetadata(name=key, datatype=datatype, shape=shape))
        if key == "probabilities" and isinstance(value, dict):
            classes = tuple(str(c) for c in value)
    found = Signature(inputs=_inputs(rt), outputs=tuple(outputs), classes=classes)
    with _signatures_lock:
        _signatures[rt] = found
    return found


def _inputs(rt: Runtime) -> tuple[InputSpec, ...]:
    serving = rt.serving
    if rt.kind == "image":
        channels = {"L": (), "RGB": (3,), "RGBA": (4,)}.get(str(getattr(serving, "mode", "")), (-1,))
        return (InputSpec("image", ("BYTES",), (-1,)), InputSpec("pixels", ("FP32", "UINT8"), (-1, -1, -1, *channels)))
    if rt.kind == "row":
        spec = getattr(serving, "spec", None)
        categorical = set(getattr(spec, "categorical", ()))
        columns = tuple(getattr(serving, "columns", ()))
        return tuple(InputSpec(c, ("BYTES", "FP32") if c in categorical else ("FP32", "BYTES"), (-1, 1)) for c in columns)
    window, variables = getattr(serving, "window", None), getattr(serving, "variables", None)
    dims = (window, variables) if isinstance(window, int) and isinstance(variables, int) else (-1, -1)
    return (InputSpec("window", ("FP32",), (-1, *dims)),)


def _describe_output(key: str, value: Any) -> tuple[str, list[int]]:
    if key == "label" or isinstance(value, str):
        return "BYTES", [-1]
    if isinstance(value, bool):
        return "BOOL", [-1]
    if isinstance(value, int):
        return "INT64", [-1]
    if isinstance(value, float):
        return "FP32", [-1]
    if isinstance(value, dict | list | tuple):
        return "FP32", [-1, len(value)]
    return "BYTES", [-1]


def model_metadata(rt: Runtime, plant_id: str) -> ModelMetadata:
    sig, m = signature(rt), rt.manifest
    parameters: dict[str, str | int | float | bool] = {
        "version": m.version, "variant": rt.variant, "sha256": m.sha256, "task": m.task, "kind": rt.kind, "plant": plant_id,
    }
    if sig.classes is not None:
        parameters["classes"] = json.dumps(list(sig.classes))
    return ModelMetadata(name=m.model_name, versions=[str(m.version)], platform=PLATFORM, inputs=sig.metadata_inputs(),
                         outputs=list(sig.outputs), parameters=parameters)


# ---- request tensors ---------------------------------------------------------------------------------------------


def _split(body: bytes, header_length: int | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary data after it (binary tensor data extension)."""
    if header_length is None:
        return body, b""
    if header_length < 1 or header_length > len(body):
        raise Refused(400, f"{HEADER_LENGTH} is {header_length} but the body holds {len(body)} bytes; it must be the length of the JSON "
                           "header at the start of the body")
    return body[:header_length], body[header_length:]


def parse_request(body: bytes, header_length: int | None) -> tuple[InferenceRequest, dict[str, np.ndarray]]:
    """The request and its tensors by name, checked against their shapes and datatypes (not yet against the model)."""
    header, tail = _split(body, header_length)
    payload = load_json(header, SEND)
    try:
        request = InferenceRequest.model_validate(payload)
    except ValidationError as exc:
        raise Refused(400, describe_validation_error(exc, "inference request")) from None
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for inp in request.inputs:
        if inp.name in tensors:
            raise Refused(400, f"input {inp.name!r} is sent twice; send each input once")
        size = inp.parameters.get("binary_data_size")
        raw = None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise Refused(400, f"input {inp.name!r}: binary_data_size must be a whole number of bytes, got {size!r}")
            if inp.data is not None:
                raise Refused(400, f"input {inp.name!r} has both JSON data and binary_data_size; send one")
            if offset + size > len(tail):
                raise Refused(400, f"input {inp.name!r}: binary_data_size {size} runs past the end of the body ({len(tail) - offset} "
                                   "bytes of binary data left)")
            raw, offset = tail[offset:offset + size], offset + size
        elif inp.data is None:
            raise Refused(400, f"input {inp.name!r} has no data: send \"data\", or its bytes after the header with binary_data_size")
        tensors[inp.name] = _tensor(inp, raw)
    if offset != len(tail):
        raise Refused(400, f"{len(tail) - offset} bytes of binary data follow the inputs that no input's binary_data_size claims")
    return request, tensors


def _tensor(inp: RequestInput, raw: bytes | None) -> np.ndarray:
    count = math.prod(inp.shape)
    where = f"input {inp.name!r} (shape {inp.shape}, {inp.datatype})"
    if inp.datatype == "BYTES":
        items = _bytes_elements(raw, where) if raw is not None else _json_strings(inp.data, where)
        if len(items) != count:
            raise Refused(400, f"{where} holds {len(items)} element(s), its shape says {count}")
        out = np.empty(count, dtype=object)
        out[:] = items
        return out.reshape(inp.shape)
    dtype = NUMPY.get(inp.datatype)
    if dtype is None:
        raise Refused(400, f"{where}: datatype {inp.datatype!r} is not served here; send {', '.join([*NUMPY, 'BYTES'])}")
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise Refused(400, f"{where} needs {count * dtype.itemsize} bytes of binary data, binary_data_size gives {len(raw)}")
        return np.frombuffer(raw, dtype=dtype).reshape(inp.shape)
    values = _json_numbers(inp.data, inp.datatype, where)
    if len(values) != count:
        raise Refused(400, f"{where} holds {len(values)} value(s), its shape says {count}")
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: infinity, refused by the adapter or the pixel check
        try:
            return np.asarray(values, dtype=dtype).reshape(inp.shape)
        except OverflowError:
            raise Refused(400, f"{where} holds a value out of {inp.datatype}'s range") from None


def _flat(data: Any, where: str) -> list[Any]:
    """JSON data, flat or nested lists in row-major order, as one flat list."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [(iter(data), 0)]
    while stack:
        items, depth = stack[-1]
        for item in items:
            if isinstance(item, list):
                if depth + 1 >= MAX_RANK:
                    raise Refused(400, f"{where}: data is nested deeper than {MAX_RANK} levels")
                stack.append((iter(item), depth + 1))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _json_numbers(data: Any, datatype: str, where: str) -> list[Any]:
    values = _flat(data, where)
    if datatype == "BOOL":
        what, fits = "true or false", lambda v: isinstance(v, bool)
    elif datatype.startswith("FP"):
        what, fits = "numbers", lambda v: isinstance(v, int | float) and not isinstance(v, bool)
    else:
        what, fits = "whole numbers", lambda v: isinstance(v, int) and not isinstance(v, bool)
    for v in values:
        if not fits(v):
            raise Refused(400, f"{where}: data must be {what}, found {type(v).__name__} {str(v)[:40]!r}")
    return values


def _json_strings(data: Any, where: str) -> list[Any]:
    values = _flat(data, where)
    bad = next((v for v in values if not isinstance(v, str)), None)
    if bad is not None:
        raise Refused(400, f"{where}: BYTES data in JSON must be strings, found {type(bad).__name__}")
    return values


def _bytes_elements(raw: bytes, where: str) -> list[bytes]:
    """Triton's binary BYTES: each element is its length (4 bytes, little-endian) and then its bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise Refused(400, f"{where}: binary BYTES data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise Refused(400, f"{where}: a BYTES element says {length} bytes but {len(raw) - offset} are left")
        items.append(raw[offset:offset + length])
        offset += length
    return items


# ---- tensors to the adapter's instances, and its answers to tensors ------------------------------------------------


def instances(rt: Runtime, tensors: dict[str, np.ndarray], limits: Limits) -> list[Any]:
    """The adapter's instances for the request's tensors; Refused(400) naming the input that does not fit."""
    sig = signature(rt)
    known = {i.name: i for i in sig.inputs}
    unknown = [name for name in tensors if name not in known]
    if unknown:
        raise Refused(400, f"unknown input {unknown[0]!r}; {rt.manifest.model_name} takes {_listing(sig.inputs)}")
    for name, tensor in tensors.items():
        if (got := _datatype(tensor)) not in known[name].datatypes:
            raise Refused(400, f"input {name!r} is {got}; {rt.manifest.model_name} takes it as {' or '.join(known[name].datatypes)}")
    sizes = {name: (t.shape[0] if t.ndim else 0) for name, t in tensors.items()}
    if len(set(sizes.values())) > 1:
        raise Refused(400, f"the inputs hold different numbers of instances ({', '.join(f'{k}: {v}' for k, v in sizes.items())}); "
                           "the first dimension is the batch")
    n = next(iter(sizes.values()))
    if n < 1:
        raise Refused(400, "the request holds no instances (the first dimension of its inputs is the batch); send at least one")
    if n > limits.max_batch:
        raise Refused(400, f"{n} instances in one request; this server takes at most {limits.max_batch} (--max-batch)")
    if rt.kind == "image":
        return _images(tensors, sig)
    if rt.kind == "row":
        return _rows(tensors, sig, n)
    (spec,) = sig.inputs
    tensor = tensors.get(spec.name)
    if tensor is None:
        raise Refused(400, f"missing input {spec.name!r}; {rt.manifest.model_name} takes {_listing(sig.inputs)}")
    _check_shape(spec, tensor)
    return list(tensor)


def _datatype(tensor: np.ndarray) -> str:
    if tensor.dtype.kind == "O":
        return "BYTES"
    return next(name for name, dtype in NUMPY.items() if dtype == tensor.dtype)


def _listing(specs: Sequence[InputSpec]) -> str:
    return ", ".join(f"{s.name} ({'/'.join(s.datatypes)} {list(s.shape)})" for s in specs)


def _check_shape(spec: InputSpec, tensor: np.ndarray, ranks: Sequence[int] | None = None) -> None:
    fits = len(tensor.shape) == len(spec.shape) and all(w in (-1, g) for w, g in zip(spec.shape, tensor.shape, strict=True))
    if not fits and not (ranks and tensor.ndim in ranks):
        raise Refused(400, f"input {spec.name!r} has shape {list(tensor.shape)}; this model takes {list(spec.shape)} (-1: any size)")


def _images(tensors: dict[str, np.ndarray], sig: Signature) -> list[bytes]:
    image, pixels = sig.inputs
    if len(tensors) != 1:
        raise Refused(400, f"send one image input: {image.name!r} (BYTES, encoded files) or {pixels.name!r} (8-bit pixel levels), not both")
    if image.name in tensors:
        tensor = tensors[image.name]
        if tensor.ndim == 2 and tensor.shape[1] == 1:
            tensor = tensor[:, 0]
        _check_shape(image, tensor)
        return [bytes(v) if isinstance(v, bytes | bytearray) else decode_base64(v, f"element {i} of input {image.name!r}")
                for i, v in enumerate(tensor)]
    tensor = tensors[pixels.name]
    if tensor.ndim not in (3, 4) or tensor.ndim == 4 and tensor.shape[3] not in (1, 3, 4) or 0 in tensor.shape:
        raise Refused(400, f"input {pixels.name!r} has shape {list(tensor.shape)}; send [N, height, width] (grey) or "
                           "[N, height, width, channels] with 1, 3 or 4 channels")
    if tensor.dtype != np.uint8:
        if not (np.isfinite(tensor).all() and tensor.min() >= 0 and tensor.max() <= 255):
            raise Refused(400, f"input {pixels.name!r} holds values outside 0-255; send 8-bit pixel levels (not scaled to 0-1)")
        tensor = np.rint(tensor).astype(np.uint8)
    return [_png(p) for p in tensor]


def _png(pixels: np.ndarray) -> bytes:
    """Pixels as a PNG (lossless): the adapter then reads them exactly as it reads an image file."""
    from PIL import Image

    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _rows(tensors: dict[str, np.ndarray], sig: Signature, n: int) -> list[dict[str, Any]]:
    missing = [s.name for s in sig.inputs if s.name not in tensors]
    if missing:
        raise Refused(400, f"missing input(s) {', '.join(map(repr, missing))}: send one tensor per feature column, [N] or [N, 1]")
    columns: dict[str, list[Any]] = {}
    for spec in sig.inputs:
        tensor = tensors[spec.name]
        if tensor.ndim == 2 and tensor.shape[1] == 1:
            tensor = tensor[:, 0]
        if tensor.ndim != 1:
            raise Refused(400, f"input {spec.name!r} has shape {list(tensor.shape)}; a column is [N] or [N, 1]")
        columns[spec.name] = [_cell(v, spec.name, i) for i, v in enumerate(tensor)]
    return [{name: values[i] for name, values in columns.items()} for i in range(n)]


def _cell(value: Any, column: str, i: int) -> Any:
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise Refused(400, f"element {i} of input {column!r} is not UTF-8 text") from None
    if isinstance(value, str):
        return value
    number = float(value)
    return None if math.isnan(number) else number  # NaN: the missing value, as an empty cell in training


def outputs(rt: Runtime, answers: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The adapter's answers as one tensor per output of the signature."""
    tensors: dict[str, np.ndarray] = {}
    for out in signature(rt).outputs:
        values = [a.get(out.name) for a in answers]
        try:
            if out.datatype == "BYTES":
                tensor = np.empty(len(values), dtype=object)
                tensor[:] = [str(v).encode() for v in values]
            elif out.datatype == "BOOL":
                tensor = np.asarray(values, dtype=bool)
            elif out.datatype == "INT64":
                tensor = np.asarray(values, dtype=np.int64)
            elif len(out.shape) == 2:
                tensor = np.asarray([list(v.values()) if isinstance(v, dict) else list(v) for v in values], dtype=np.float32)
            else:
                tensor = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise BadInput(f"the answers for these instances cannot be sent as output {out.name!r} ({type(exc).__name__})") from None
        tensors[out.name] = tensor
    return tensors


def _encode(tensor: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in tensor.ravel())
    return np.ascontiguousarray(tensor, dtype=NUMPY[datatype]).tobytes()


def _json_data(tensor: np.ndarray, datatype: str) -> list[Any]:
    if datatype == "BYTES":
        return [v.decode("utf-8", errors="replace") for v in tensor.ravel()]
    return tensor.ravel().tolist()


def _flag(parameters: Parameters, key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise Refused(400, f"{where}: parameter {key!r} must be true or false, got {value!r}")
    return value


def answer(rt: Runtime, body: bytes, header_length: int | None, limits: Limits, run_options: onnxruntime.RunOptions) -> tuple[bytes, bytes]:
    """On a model thread: the request, the adapter and the model, the response's JSON header and binary data."""
    if run_options.terminate:
        raise Abandoned
    request, tensors = parse_request(body, header_length)
    batch = instances(rt, tensors, limits)
    check_images(rt, batch, limits)
    produced = outputs(rt, rt.predict(batch, run_options))
    datatypes = {o.name: o.datatype for o in signature(rt).outputs}
    binary_default = _flag(request.parameters, "binary_data_output", "the request")
    wanted = request.outputs if request.outputs is not None else [RequestOutput(name=name) for name in produced]
    entries, binary = [], []
    for requested in wanted:
        if requested.name not in produced:
            raise Refused(400, f"unknown output {requested.name!r}; {rt.manifest.model_name} gives {', '.join(produced)}")
        tensor, datatype = produced[requested.name], datatypes[requested.name]
        entry: dict[str, Any] = {"name": requested.name, "datatype": datatype, "shape": list(tensor.shape)}
        as_binary = _flag(requested.parameters, "binary_data", f"output {requested.name!r}") if "binary_data" in requested.parameters else binary_default
        if as_binary:
            data = _encode(tensor, datatype)
            entry["parameters"] = {"binary_data_size": len(data)}
            binary.append(data)
        else:
            entry["data"] = _json_data(tensor, datatype)
        entries.append(entry)
    response: dict[str, Any] = {"model_name": rt.manifest.model_name, "model_version": str(rt.manifest.version),
                                "parameters": {"variant": rt.variant}, "outputs": entries}
    if request.id is not None:
        response["id"] = request.id
    try:
        header = json.dumps(response, allow_nan=False).encode()
    except ValueError as exc:
        raise BadInput(f"the answers for these instances are not finite numbers ({exc})") from None
    return header, b"".join(binary)


# ---- endpoints ------------------------------------------------------------------------------------------------------


def _served(watcher: ModelWatcher, name: str, version: str | None = None) -> Runtime:
    """The runtime serving `name` (and `version`, if given); Refused 404 for another model or version, 503 for none yet."""
    rt = watcher.runtime
    if rt is None:
        if watcher.model_name in (None, name):
            why = f" ({watcher.problem})" if watcher.problem else ""
            raise Refused(503, f"model {name!r} is not ready: no version of it is loaded at this plant yet{why}")
        raise Refused(404, f"unknown model {name!r}; this server serves {watcher.model_name}")
    if name != rt.manifest.model_name:
        raise Refused(404, f"unknown model {name!r}; this server serves {rt.manifest.model_name}")
    if version is not None and version != str(rt.manifest.version):
        raise Refused(404, f"{name} version {version} is not served here: version {rt.manifest.version} is; the server serves the edge "
                           f"store's current version (`maxfl edge activate --version {version}` makes an installed one current)")
    return rt


def _header_length(request: Request) -> int | None:
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise Refused(400, f"{HEADER_LENGTH} {value!r} is not a number")
    return int(value)


def routes(watcher: ModelWatcher, plant_id: str, limits: Limits, gate: Gate) -> list[Route]:
    """The protocol's REST endpoints for one server."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        server_version = package_version("maxfl")
    except PackageNotFoundError:
        server_version = "unknown"
    server = ServerMetadata(name=SERVER_NAME, version=server_version, extensions=EXTENSIONS).model_dump()

    async def server_metadata(request: Request) -> Response:
        return JSONResponse(server)

    async def live(request: Request) -> Response:
        return Response(status_code=200)

    async def ready(request: Request) -> Response:
        if watcher.runtime is None:
            why = watcher.problem or "no model is installed at this plant yet"
            return reject(request, 503, f"not ready: {why}")
        return Response(status_code=200)

    async def model_ready(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            _served(watcher, name, request.path_params.get("version"))
        except Refused as exc:
            return reject(request, exc.status, exc.message)
        return JSONResponse({"name": name, "ready": True})

    async def metadata(request: Request) -> Response:
        try:
            rt = _served(watcher, request.path_params["name"], request.path_params.get("version"))
        except Refused as exc:
            return reject(request, exc.status, exc.message)
        return JSONResponse(model_metadata(rt, plant_id).model_dump())

    async def infer(request: Request) -> Response:
        try:
            rt = _served(watcher, request.path_params["name"], request.path_params.get("version"))
            encoding = request.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise Refused(415, f"Content-Encoding {encoding!r} is not accepted; send the request uncompressed")
            header_length = _header_length(request)
            header, data = await gate.run(request, lambda body, run_options: answer(rt, body, header_length, limits, run_options))
        except Refused as exc:
            return reject(request, exc.status, exc.message, exc.headers)
        headers = {"X-Model-Version": f"{rt.manifest.model_name}/{rt.manifest.version}", "X-Model-Variant": rt.variant}
        if not data:
            return Response(header, media_type="application/json", headers=headers)
        return Response(header + data, media_type="application/octet-stream", headers={**headers, HEADER_LENGTH: str(len(header))})

    model = "/v2/models/{name}"
    versioned = model + "/versions/{version}"
    return [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route(model, metadata, methods=["GET"]),
        Route(versioned, metadata, methods=["GET"]),
        Route(model + "/ready", model_ready, methods=["GET"]),
        Route(versioned + "/ready", model_ready, methods=["GET"]),
        Route(model + "/infer", infer, methods=["POST"]),
        Route(versioned + "/infer", infer, methods=["POST"]),
    ]
