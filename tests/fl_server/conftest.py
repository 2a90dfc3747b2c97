"""Stand-ins for Flower replies and for MLflow, shared by the strategy wrappers' tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.supercore.task_identity import TaskIdentity


class RecordingTracker:
    """Stands in for MLflow: the MLflow side is covered by the end-to-end test."""

    def __init__(self) -> None:
        self.metrics: dict[tuple[str, int], float] = {}
        self.plants: set[str] = set()
        self.events: list[tuple[str, dict]] = []

    def log_metrics(self, metrics, step):
        self.metrics.update({(k, step): v for k, v in metrics.items()})

    def ensure_logged(self, metrics, step):
        if not any(s == step for _, s in self.metrics):
            self.log_metrics(metrics, step)

    def audit_event(self, event, **details):
        self.events.append((event, details))

    def note_plants(self, plants):
        self.plants |= set(plants)


@pytest.fixture(autouse=True)
def _fresh_identities():
    """Each test's replies are attributed afresh: plant ids pinned to nodes in one test do not carry over."""
    from fl_server.run.identity import PlantIdentities, use_identities

    previous = use_identities(PlantIdentities())
    yield
    use_identities(previous)


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _instruction(node_id: int) -> Message:
    TaskIdentity.node_id = node_id
    ins = Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id, message_type=MessageType.TRAIN)
    ins.metadata.__dict__["_message_id"] = ins.object_id
    return ins


@pytest.fixture
def tracker() -> RecordingTracker:
    return RecordingTracker()


@pytest.fixture
def reply() -> Callable[..., Message]:
    def make(node_id: int, plant: str, weight: float | np.ndarray, examples: int, loss: float) -> Message:
        ins = _instruction(node_id)
        values = weight if isinstance(weight, np.ndarray) else np.full(3, weight, dtype=np.float32)
        content = RecordDict({
            "arrays": ArrayRecord([values]),
            "metrics": MetricRecord({"num-examples": examples, "train_loss": loss, "train_time_s": 0.5}),
            "plant": ConfigRecord({"plant-id": plant}),
        })
        return Message(content=content, reply_to=ins)

    return make


@pytest.fixture
def failure() -> Callable[[int, str], Message]:
    def make(node_id: int, reason: str) -> Message:
        return Message(Error(code=0, reason=reason), reply_to=_instruction(node_id))

    return make
