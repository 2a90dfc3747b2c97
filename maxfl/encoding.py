"""How a plant's update travels: the trained weights in fp32, or in half the bytes as an fp16 delta.

`update-encoding = "fp16"` (run config) sends `trained - global` in float16, where `global` is the model the
plant received that round: the delta of a round is small, so float16 keeps its leading three digits, where
float16 weights would round away updates smaller than a weight's own precision. The anchor adds the delta back
to the global model it sent (fl_server.run.encoding) before any validation or aggregation sees the update, so
robust rules, central DP and every strategy work on fp32 weights as before. Only the upload is encoded: what a
plant receives stays fp32.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from maxfl.messages import ARRAYS

UpdateEncoding = Literal["fp32", "fp16"]
UPDATE = "update"  # ConfigRecord in an encoded train reply: {"encoding": "fp16-delta"}
FP16_DELTA = "fp16-delta"


def encode_fp16_delta(trained: ArrayRecord, received: ArrayRecord) -> ArrayRecord:
    """float32 arrays become float16 deltas from what the plant received; any other array travels as it is."""
    out = {}
    for key, array in trained.items():
        new = array.numpy()
        old = received[key].numpy() if key in received else None
        fits = old is not None and new.dtype == np.float32 and old.dtype == np.float32 and old.shape == new.shape
        out[key] = Array((new - old).astype(np.float16)) if fits else array
    return ArrayRecord(out)


def decode_fp16_delta(update: ArrayRecord, sent: ArrayRecord) -> ArrayRecord:
    """The plant's fp32 weights: the global model the anchor sent plus the plant's float16 delta."""
    out = {}
    for key, array in update.items():
        delta = array.numpy()
        base = sent[key].numpy() if key in sent else None
        fits = base is not None and delta.dtype == np.float16 and base.dtype == np.float32 and base.shape == delta.shape
        out[key] = Array(base + delta.astype(np.float32)) if fits else array
    return ArrayRecord(out)


def encode_reply(reply: Message, received: ArrayRecord, encoding: UpdateEncoding) -> Message:
    """The train reply as it leaves the plant, in the run's encoding."""
    if encoding == "fp16" and not reply.has_error() and ARRAYS in reply.content.array_records:
        reply.content[ARRAYS] = encode_fp16_delta(reply.content[ARRAYS], received)
        reply.content[UPDATE] = ConfigRecord({"encoding": FP16_DELTA})
    return reply


def decode_reply(reply: Message, sent: ArrayRecord) -> Message:
    """A train reply with fp32 weights, whatever encoding it came in."""
    if reply.has_error() or UPDATE not in reply.content.config_records:
        return reply
    encoding = reply.content[UPDATE].get("encoding")
    if encoding != FP16_DELTA:
        raise ValueError(f"an update in an unknown encoding {encoding!r}")
    if ARRAYS in reply.content.array_records:
        reply.content[ARRAYS] = decode_fp16_delta(reply.content[ARRAYS], sent)
    del reply.content[UPDATE]
    return reply


def update_bytes(arrays: ArrayRecord) -> int:
    """The bytes an update's arrays take on the wire (their data; Flower's framing adds a few dozen per array)."""
    return sum(len(a.data) for a in arrays.values())
