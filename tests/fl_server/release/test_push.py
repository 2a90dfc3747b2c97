"""Push bookkeeping: what each plant's answer (or silence) becomes in the registry."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fl_server.run.config import RunConfig
from fl_server.release.push import deliver_pending, push
from fl_server.release.registry import EdgeRecord
from maxfl.messages import ACK, ONNX, RELEASE, DeployAck
from maxfl.release import ReleaseManifest, sha256_hex

from tests.fl_server.conftest import _instruction

ONNX_BYTES = b"onnx bytes"
MANIFEST = ReleaseManifest(
    model_name="maxfl-defect", version=4, task="defect", task_spec="{}", sha256=sha256_hex(ONNX_BYTES), size_bytes=len(ONNX_BYTES),
    input_name="input", output_name="logits", mlflow_run_id="r", flwr_run_id=1, created_at=datetime.now(UTC),
)


class FakeRegistry:
    name = "maxfl-defect"

    def __init__(self, edge: dict[str, EdgeRecord] | None = None) -> None:
        self._edge = dict(edge or {})

    def edge(self) -> dict[str, EdgeRecord]:
        return dict(self._edge)

    def record_edge(self, records: list[EdgeRecord]) -> None:
        self._edge.update({r.plant: r for r in records})


class FakeGrid:
    """Plants by node id; each answers a deploy message with `answer(plant, message)`."""

    def __init__(self, plants: dict[int, str], answer) -> None:
        self.plants, self.answer, self.sent = plants, answer, []

    def get_node_ids(self):
        return list(self.plants)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            ins = _instruction(msg.metadata.dst_node_id)
            replies.append(self.answer(self.plants[msg.metadata.dst_node_id], msg, ins))
        return replies


def ack(status: str, serving: int = 4, detail: str = ""):
    def answer(plant: str, msg: Message, ins: Message) -> Message:
        targets = str(msg.content[RELEASE]["targets"])
        chosen = "not-targeted" if targets and plant not in targets.split(",") else status
        content = DeployAck(status=chosen, version=4, serving=serving, detail=detail).to_flower()
        return Message(RecordDict({ACK: ConfigRecord(content), "plant": ConfigRecord({"plant-id": plant})}), reply_to=ins)

    return answer


CFG = RunConfig(round_timeout_s=5.0)


def test_connected_plants_install_and_known_offline_plants_are_pending():
    registry = FakeRegistry()
    grid = FakeGrid({11: "plant-1", 12: "plant-2"}, ack("installed"))
    records = push(grid, CFG, registry, MANIFEST, ONNX_BYTES, targets=None, known=["plant-1", "plant-2", "plant-3"])
    assert [(r.plant, r.status) for r in records] == [("plant-1", "installed"), ("plant-2", "installed"), ("plant-3", "pending")]
    assert registry.edge()["plant-3"].version == 4
    # the deploy message carries the manifest and the exact bytes
    sent = grid.sent[0]
    assert sent.metadata.message_type == "query.deploy" and bytes(sent.content[ONNX]["model"]) == ONNX_BYTES
    assert ReleaseManifest.model_validate_json(str(sent.content[RELEASE]["manifest"])) == MANIFEST


def test_a_refusal_is_recorded_with_the_plants_reason():
    registry = FakeRegistry()
    grid = FakeGrid({11: "plant-1"}, ack("refused", serving=3, detail="hash mismatch: refusing"))
    (record,) = push(grid, CFG, registry, MANIFEST, ONNX_BYTES, targets=None, known=["plant-1"])
    assert record.status == "refused" and record.detail == "hash mismatch: refusing" and record.serving == 3


def test_a_plant_that_declined_is_recorded_as_refused(failure):
    registry = FakeRegistry()
    grid = FakeGrid({11: "plant-1"}, lambda plant, msg, ins: failure(11, "plant-1 declined: its edge store is damaged"))
    (record,) = push(grid, CFG, registry, MANIFEST, ONNX_BYTES, targets=None, known=["plant-1"])
    assert (record.plant, record.status, record.detail) == ("plant-1", "refused", "its edge store is damaged")


def test_targeted_push_leaves_other_plants_alone():
    registry = FakeRegistry()
    grid = FakeGrid({11: "plant-1", 12: "plant-2"}, ack("installed"))
    records = push(grid, CFG, registry, MANIFEST, ONNX_BYTES, targets={"plant-2"})
    assert [(r.plant, r.status) for r in records] == [("plant-2", "installed")]
    assert set(registry.edge()) == {"plant-2"}


def test_a_pending_plant_gets_the_model_when_it_is_back(monkeypatch):
    old = EdgeRecord(plant="plant-3", version=4, status="pending", at=datetime.now(UTC))
    registry = FakeRegistry({"plant-3": old})
    release = type("R", (), {"manifest": MANIFEST, "onnx": ONNX_BYTES, "weights": np.zeros(4, np.float32)})()
    registry.load_release = lambda version: release  # type: ignore[attr-defined]
    grid = FakeGrid({11: "plant-1", 13: "plant-3"}, ack("installed"))
    delivered = deliver_pending(grid, CFG, registry)
    assert [(r.plant, r.status) for r in delivered] == [("plant-3", "installed")]
    assert registry.edge()["plant-3"].status == "installed"


def test_waiting_push_delivers_to_a_plant_that_connects_late():
    registry = FakeRegistry()
    plants = {11: "plant-1"}
    calls = {"n": 0}

    class LateGrid(FakeGrid):
        def get_node_ids(self):
            calls["n"] += 1
            if calls["n"] == 2:
                plants[12] = "plant-2"  # plant-2 comes back while the anchor waits
            return list(plants)

    grid = LateGrid(plants, ack("installed"))
    records = push(grid, CFG, registry, MANIFEST, ONNX_BYTES, targets={"plant-1", "plant-2"}, wait_s=10.0)
    assert [(r.plant, r.status) for r in records] == [("plant-1", "installed"), ("plant-2", "installed")]
    assert len(grid.sent) == 2  # each node got the model once


@pytest.mark.parametrize("wait_s", [0.0, 0.3])
def test_an_absent_target_stays_pending_after_the_wait(wait_s):
    registry = FakeRegistry()
    grid = FakeGrid({11: "plant-1"}, ack("installed"))
    records = push(grid, CFG, registry, MANIFEST, ONNX_BYTES, targets={"plant-1", "plant-9"}, wait_s=wait_s)
    assert [(r.plant, r.status) for r in records] == [("plant-1", "installed"), ("plant-9", "pending")]
