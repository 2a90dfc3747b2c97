"""The fault drill corrupts what a plant sends, as its node config says, and nothing else."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.client.mod.utils import make_ffn
from flwr.common.config import parse_config_args
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fl_client.config import PlantConfig
from fl_client.fault_drill import fault_drill_mod
from fl_client.mods import central_clipping_mod

RECEIVED = np.array([1.0, 2.0, 3.0], np.float32)
TRAINED = np.array([1.5, 1.0, 3.0], np.float32)  # update (0.5, -1, 0)


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 3, 1


def _context(tmp_path, drill: str = "none", scale: float = 10.0) -> Context:
    plant = PlantConfig(plant_id="plant-5", data_dir=tmp_path, fault_drill=drill, fault_drill_scale=scale)
    return Context(run_id=7, node_id=3, node_config=parse_config_args([plant.as_node_config()]), state=RecordDict(), run_config={})


def _message(message_type: str = MessageType.TRAIN, config: dict | None = None) -> Message:
    msg = Message(content=RecordDict({"arrays": ArrayRecord([RECEIVED.copy()]), "config": ConfigRecord(config or {})}),
                  dst_node_id=3, message_type=message_type)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def _trains(msg: Message, context: Context) -> Message:
    """Stands in for the train handler: the weights after local training."""
    return Message(content=RecordDict({"arrays": ArrayRecord([TRAINED.copy()]), "metrics": MetricRecord({"num-examples": 10})}), reply_to=msg)


def _sent(reply: Message) -> np.ndarray:
    return reply.content["arrays"].to_numpy_ndarrays()[0]


@pytest.mark.parametrize(("drill", "expected"), [
    ("scale", RECEIVED + 10 * (TRAINED - RECEIVED)),
    ("sign-flip", RECEIVED - 10 * (TRAINED - RECEIVED)),
])
def test_the_drill_scales_or_flips_the_update_that_leaves_the_plant(tmp_path, drill, expected):
    reply = fault_drill_mod(_message(), _context(tmp_path, drill), _trains)
    np.testing.assert_allclose(_sent(reply), expected)
    assert _sent(reply).dtype == np.float32 and reply.content["metrics"]["num-examples"] == 10


def test_the_scale_comes_from_the_node_config(tmp_path):
    reply = fault_drill_mod(_message(), _context(tmp_path, "scale", scale=3.0), _trains)
    np.testing.assert_allclose(_sent(reply), RECEIVED + 3 * (TRAINED - RECEIVED))


def test_the_nan_drill_fills_every_float_array(tmp_path):
    reply = fault_drill_mod(_message(), _context(tmp_path, "nan"), _trains)
    assert _sent(reply).shape == (3,) and np.all(np.isnan(_sent(reply)))


def test_the_drill_is_announced_in_the_plants_log(tmp_path, caplog):
    import logging

    logger = logging.getLogger("maxfl")
    logger.addHandler(caplog.handler)
    try:
        fault_drill_mod(_message(), _context(tmp_path, "sign-flip"), _trains)
    finally:
        logger.removeHandler(caplog.handler)
    assert "plant-5: FAULT DRILL 'sign-flip'" in caplog.text


def test_no_drill_sends_the_update_as_trained(tmp_path):
    reply = fault_drill_mod(_message(), _context(tmp_path), _trains)
    np.testing.assert_array_equal(_sent(reply), TRAINED)


@pytest.mark.parametrize("message_type", [MessageType.EVALUATE, MessageType.QUERY, f"{MessageType.QUERY}.deploy"])
def test_evaluate_and_query_messages_pass_untouched(tmp_path, message_type):
    reply = fault_drill_mod(_message(message_type), _context(tmp_path, "nan"), _trains)
    np.testing.assert_array_equal(_sent(reply), TRAINED)


def test_a_declined_round_passes_untouched(tmp_path):
    def declines(msg: Message, context: Context) -> Message:
        return Message(Error(code=0, reason="plant-5 declined: over its ceiling"), reply_to=msg)

    reply = fault_drill_mod(_message(), _context(tmp_path, "nan"), declines)
    assert reply.has_error() and reply.error.reason == "plant-5 declined: over its ceiling"


def test_the_drill_acts_after_plant_side_clipping(tmp_path):
    """In the ClientApp's order (`fault_drill_mod` outside `central_clipping_mod`), what leaves is the clipped
    update, then scaled: the anchor sees exactly what a hostile plant past its own clipping would send."""
    train = make_ffn(_trains, [fault_drill_mod, central_clipping_mod])
    reply = train(_message(config={KEY_CLIPPING_NORM: 0.5}), _context(tmp_path, "scale", scale=10.0))
    assert np.linalg.norm(_sent(reply) - RECEIVED) == pytest.approx(5.0, rel=1e-5)  # clipped to 0.5, then x10
