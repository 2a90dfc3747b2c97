"""Update encodings: an fp16 delta takes half the bytes and decodes to the plant's weights within fp16's precision."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from maxfl.encoding import UPDATE, decode_fp16_delta, decode_reply, encode_fp16_delta, encode_reply, update_bytes


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _weights(seed: int, n: int = 10_000) -> ArrayRecord:
    return ArrayRecord([np.random.default_rng(seed).normal(0, 1, n).astype(np.float32)])


def test_an_fp16_delta_is_half_the_bytes_and_decodes_to_the_trained_weights() -> None:
    received = _weights(0)
    step = np.random.default_rng(1).normal(0, 1e-3, 10_000).astype(np.float32)  # a round's small update
    trained = ArrayRecord([received["0"].numpy() + step])
    encoded = encode_fp16_delta(trained, received)
    assert encoded["0"].dtype == "float16"
    assert update_bytes(encoded) / update_bytes(trained) < 0.51
    back = decode_fp16_delta(encoded, received)["0"].numpy()
    assert back.dtype == np.float32
    # The delta keeps fp16's relative precision: the decoded update is within 1e-3 of the real one, relative.
    assert np.abs((back - received["0"].numpy()) - step).max() <= 1e-3 * np.abs(step).max()


def test_arrays_that_are_not_float32_travel_as_they_are() -> None:
    received = ArrayRecord({"w": Array(np.zeros(3, np.float32)), "steps": Array(np.array([4], np.int64))})
    trained = ArrayRecord({"w": Array(np.ones(3, np.float32)), "steps": Array(np.array([5], np.int64))})
    encoded = encode_fp16_delta(trained, received)
    assert encoded["steps"].numpy().tolist() == [5] and encoded["w"].dtype == "float16"
    assert decode_fp16_delta(encoded, received)["w"].numpy().tolist() == [1.0, 1.0, 1.0]


def test_a_reply_is_encoded_only_when_the_run_asks_and_decoded_back_to_fp32() -> None:
    received = _weights(2, 8)
    for encoding, dtype in (("fp32", "float32"), ("fp16", "float16")):
        reply = Message(RecordDict({"arrays": _weights(3, 8)}), dst_node_id=1, message_type="train")
        encoded = encode_reply(reply, received, encoding)  # type: ignore[arg-type]
        assert encoded.content["arrays"]["0"].dtype == dtype and (UPDATE in encoded.content.config_records) == (encoding == "fp16")
        decoded = decode_reply(encoded, received)
        assert decoded.content["arrays"]["0"].dtype == "float32" and UPDATE not in decoded.content.config_records
        assert np.allclose(decoded.content["arrays"]["0"].numpy(), _weights(3, 8)["0"].numpy(), atol=1e-2)


def test_an_unknown_encoding_is_refused() -> None:
    reply = Message(RecordDict({"arrays": _weights(3, 8), UPDATE: ConfigRecord({"encoding": "zip"})}), dst_node_id=1, message_type="train")
    with pytest.raises(ValueError, match="unknown encoding 'zip'"):
        decode_reply(reply, _weights(2, 8))
