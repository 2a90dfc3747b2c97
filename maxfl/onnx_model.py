"""ONNX: the format a released model is served in at the edge (onnxruntime), exported once by the anchor."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnxruntime
    from torch import nn

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 18


def export(model: nn.Module, example: np.ndarray, dynamo: bool = True) -> bytes:
    """The model as ONNX bytes, with a dynamic batch dimension (`example` must be a batch of two or more).

    The anchor exports with torch.export (dynamo); a plant, whose install has no onnx/onnxscript, exports its own
    personalised variant with torch's TorchScript exporter (`dynamo=False`), which needs neither."""
    import torch

    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(example, dtype=np.float32))
    # torch's exporter warns about optional torchvision ops and its own internals on every call; nothing actionable.
    for noisy in ("torch.onnx", "torch.export", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not dynamo:
            torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
            return buf.getvalue()
        program = torch.onnx.export(
            model, (x,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, verbose=False,
        )
    assert program is not None
    program.save(buf)
    return buf.getvalue()


def session(model: bytes | Path, threads: int = 1) -> onnxruntime.InferenceSession:
    """An onnxruntime session on the CPU; raises ValueError if the bytes are not a loadable ONNX model."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    try:
        return onnxruntime.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own (Fail, InvalidProtobuf, ...) for damaged files
        raise ValueError(f"not a loadable ONNX model ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def run(sess: onnxruntime.InferenceSession, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def max_deviation(sess: onnxruntime.InferenceSession, model: nn.Module, x: np.ndarray, batch_size: int = 256,
                  onnx_inputs: np.ndarray | None = None) -> float:
    """Largest absolute difference between the ONNX and the torch model's outputs on `x`; with `onnx_inputs`, the
    ONNX model runs on those instead (the same records before feature extraction, for an exported pipeline)."""
    import torch

    model.eval()
    served = x if onnx_inputs is None else onnx_inputs
    worst = 0.0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            chunk = np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32)
            expected = model(torch.from_numpy(chunk)).numpy()
            worst = max(worst, float(np.abs(run(sess, served[start : start + batch_size]) - expected).max(initial=0.0)))
    return worst
