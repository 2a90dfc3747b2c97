"""A fault drill: this plant corrupts the updates it sends, so the anchor can rehearse its defences.

With node config `fault-drill = "scale" | "sign-flip" | "nan"` (and `fault-drill-scale`, default 10), the
plant's train reply leaves as:
- scale:     global + s x update    (an update blown up, as a diverged or boosted plant sends)
- sign-flip: global - s x update    (pushed the opposite way, the classic poisoning attack)
- nan:       every float array NaN  (a broken plant)

where update = the trained weights - the weights received. The drill acts on what leaves the plant, after
any clipping (it wraps `central_clipping_mod`). It grants nothing to anyone: a real hostile plant controls
its own node and can send whatever it likes; the drill only makes that reproducible for tests and exercises.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from fl_client.config import PlantConfig
from maxfl.messages import ARRAYS

log = logging.getLogger("maxfl")


def corrupt(received: dict[str, np.ndarray], trained: ArrayRecord, drill: str, scale: float) -> ArrayRecord:
    """The ArrayRecord a plant running `drill` sends instead of `trained`."""
    out = ArrayRecord()
    for key, array in trained.items():
        arr = array.numpy()
        if not np.issubdtype(arr.dtype, np.floating):
            out[key] = Array(arr)  # integer buffers (counters) carry no gradient signal to corrupt
            continue
        if drill == "nan":
            bad = np.full_like(arr, np.nan)
        else:
            update = arr - received[key]
            bad = received[key] + (scale if drill == "scale" else -scale) * update
        out[key] = Array(np.asarray(bad, dtype=arr.dtype))
    return out


def fault_drill_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Corrupt a successful train reply as the plant's `fault-drill` says; every other message passes untouched."""
    if msg.metadata.message_type != MessageType.TRAIN or ARRAYS not in msg.content.array_records:
        return call_next(msg, context)
    plant = PlantConfig.from_context(context)  # a bad node config: the handler would decline the same way
    if plant.fault_drill == "none":
        return call_next(msg, context)
    received = {k: np.array(a.numpy(), copy=True) for k, a in msg.content[ARRAYS].items()}
    reply = call_next(msg, context)
    if reply.has_error() or ARRAYS not in reply.content.array_records:
        return reply
    log.warning("%s: FAULT DRILL '%s' (x%g): this round's update is deliberately corrupted (node config fault-drill)",
                plant.plant_id, plant.fault_drill, plant.fault_drill_scale)
    reply.content[ARRAYS] = corrupt(received, reply.content[ARRAYS], plant.fault_drill, plant.fault_drill_scale)
    return reply
