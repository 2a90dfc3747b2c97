"""A reply is its node's plant: spoofed plant ids in replies are attributed to the node that sent them."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord

from fl_server.run.config import RunConfig
from fl_server.run.data_agreement import agree_on_data
from fl_server.run.identity import PlantIdentities, use_identities
from fl_server.federation.provision import PlantBook, PlantRecord
from fl_server.run.strategy import RunAborted, TrackedStrategy, build_strategy, failed_plant, failure_reason, plant_of
from fl_server.run.validation import UpdateRules, ValidatedStrategy
from tasks import get_task

from tests.fl_server.run.test_data_agreement import StandInGrid, _profile


class Spoofs(list):
    def __call__(self, node: int, claimed: str, plant: str, kind: str) -> None:
        self.append((node, claimed, plant, kind))


def write_plants(path: Path, nodes: dict[str, tuple[int, str]]) -> Path:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    book = PlantBook(plants={plant: PlantRecord(plant_id=plant, key_fingerprint="f" * 64, public_key="ecdsa-sha2-nistp384 AAAA", node_id=node,
                                                status=status, joined_at=now, revoked_at=now if status == "revoked" else None)
                             for plant, (node, status) in nodes.items()})
    path.write_text(book.model_dump_json(indent=2))
    return path


@pytest.fixture
def federation(tmp_path) -> tuple[PlantIdentities, Spoofs]:
    spoofs = Spoofs()
    plants = write_plants(tmp_path / "plants.json", {"plant-1": (11, "active"), "plant-2": (12, "active"), "plant-3": (13, "revoked")})
    identities = PlantIdentities(plants, on_spoof=spoofs)
    use_identities(identities)
    return identities, spoofs


def _tracked(tracker, inner=None, min_plants=1):
    strategy = TrackedStrategy(inner or build_strategy(RunConfig(min_plants=min_plants)), tracker, min_plants=min_plants, num_rounds=3)
    strategy._phase_started = 0.0
    return strategy


def test_a_spoofed_plant_id_in_a_reply_is_attributed_to_its_real_node(federation, reply, tracker):
    _, spoofs = federation
    liar = reply(12, "plant-1", 4.0, 30, 0.9)  # node 12 is plant-2 but says it is plant-1
    assert plant_of(liar) == "plant-2"
    strategy = _tracked(tracker)
    strategy.aggregate_train(1, [reply(11, "plant-1", 1.0, 10, 0.5), liar])
    strategy.aggregate_evaluate(1, [])
    assert tracker.metrics[("plant-1/num-examples", 1)] == 10  # plant-1's own figures, not overwritten by the liar's
    assert tracker.metrics[("plant-2/num-examples", 1)] == 30
    assert tracker.plants == {"plant-1", "plant-2"}
    assert spoofs == [(12, "plant-1", "plant-2", "train")]  # once per reply, however often it is looked at


def test_a_declined_reply_is_named_by_its_node_not_by_the_plant_it_names(federation, failure):
    _, spoofs = federation
    declined = failure(12, "plant-1 declined: no defect data at /srv")
    assert failure_reason(declined) == "plant-2 declined: no defect data at /srv"
    assert failed_plant(declined) == ("plant-2", "no defect data at /srv")
    assert spoofs == [(12, "plant-1", "plant-2", "train")]


def test_a_node_registered_outside_maxfl_speaks_for_no_plant(federation, reply, tracker):
    rogue = reply(66, "plant-1", 1.0, 10, 0.5)
    assert plant_of(rogue) == "node-66"
    strategy = _tracked(tracker, ValidatedStrategy(build_strategy(RunConfig(min_plants=1)), UpdateRules(), 1, on_reject=lambda *a: None))
    list(strategy.inner.configure_train(1, ArrayRecord([np.zeros(3, np.float32)]), ConfigRecord(), StandInGrid({11: None, 66: None})))
    arrays, _ = strategy.aggregate_train(1, [reply(11, "plant-1", 1.0, 10, 0.5), rogue])
    assert np.allclose(arrays.to_numpy_ndarrays()[0], 1.0)  # the rogue's update was never aggregated
    assert tracker.plants == {"plant-1"}
    event, details = tracker.events[0]
    assert event == "reply.refused" and details["plant"] == "node-66" and "not in" in details["reason"]


def test_a_revoked_plants_node_is_not_heard_and_the_run_says_why(federation, reply, tracker):
    strategy = _tracked(tracker, min_plants=2)
    with pytest.raises(RunAborted, match="plant-3 was revoked"):
        strategy.aggregate_train(1, [reply(11, "plant-1", 1.0, 10, 0.5), reply(13, "plant-3", 1.0, 10, 0.5)])


def test_a_plant_added_during_the_run_is_known_from_its_first_reply(federation, reply, tmp_path):
    identities, _ = federation
    assert plant_of(reply(14, "plant-4", 1.0, 10, 0.5)) == "node-14"
    write_plants(identities.plants_file, {"plant-1": (11, "active"), "plant-4": (14, "active")})
    assert plant_of(reply(14, "plant-4", 1.0, 10, 0.5)) == "plant-4"


def test_without_a_plants_file_a_node_keeps_the_first_plant_id_it_claimed(reply, tracker):
    spoofs = Spoofs()
    use_identities(PlantIdentities(on_spoof=spoofs))
    assert plant_of(reply(11, "plant-1", 1.0, 10, 0.5)) == "plant-1"
    assert plant_of(reply(11, "plant-2", 1.0, 10, 0.5)) == "plant-1"  # cannot become another plant within the run
    assert spoofs == [(11, "plant-2", "plant-1", "train")]


def test_without_a_plants_file_a_second_node_claiming_a_plant_is_refused(reply, tracker):
    use_identities(PlantIdentities())
    strategy = _tracked(tracker, min_plants=2)
    with pytest.raises(RunAborted, match="node 12 claims to be plant-1, which node 11 already is in this run"):
        strategy.aggregate_train(1, [reply(11, "plant-1", 1.0, 10, 0.5), reply(12, "plant-1", 100.0, 10, 0.5)])


def test_the_data_agreement_files_a_profile_under_its_nodes_plant(federation):
    grid = StandInGrid({11: ("plant-1", _profile()), 12: ("plant-1", _profile()), 66: ("plant-2", _profile())})
    with pytest.raises(RunAborted) as exc:
        agree_on_data(grid, RunConfig(min_plants=3), get_task("defect"))
    assert "2 plant(s) have usable data" in str(exc.value)  # plant-1 and plant-2 (node 12), not the rogue node 66
    assert "node-66: node 66 is no plant of this federation" in str(exc.value)
    _, profiles = agree_on_data(grid, RunConfig(min_plants=2), get_task("defect"))
    assert set(profiles) == {"plant-1", "plant-2"}


def test_a_missing_plants_file_is_a_one_line_config_error(tmp_path):
    from maxfl.errors import ConfigError

    with pytest.raises(ConfigError, match="federation-dir"):
        PlantIdentities(tmp_path / "plants.json")


class EvaluatingGrid:
    """Every node answers each evaluate message with its scripted (claimed plant, macro-F1)."""

    def __init__(self, answers: dict[int, tuple[str, float]]) -> None:
        self.answers = answers

    def get_node_ids(self):
        return list(self.answers)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Message, MetricRecord, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        replies = []
        for msg in messages:
            TaskIdentity.node_id = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = msg.object_id
            claimed, score = self.answers[msg.metadata.dst_node_id]
            content = RecordDict({"metrics": MetricRecord({"eval_macro_f1": score, "num-examples": 10}),
                                  "plant": ConfigRecord({"plant-id": claimed})})
            replies.append(Message(content=content, reply_to=msg))
        return replies


def test_the_gates_tables_hold_each_score_under_its_nodes_plant(federation):
    from flwr.app import RecordDict

    from fl_server.release.chain import evaluate_at_plants

    grid = EvaluatingGrid({11: ("plant-1", 0.9), 12: ("plant-1", 0.1), 66: ("plant-2", 0.99)})
    candidate, _, problems = evaluate_at_plants(grid, RunConfig(), ["plant-1", "plant-2"], RecordDict({}), None)
    assert candidate == {"plant-1": {"eval_macro_f1": 0.9, "num-examples": 10}, "plant-2": {"eval_macro_f1": 0.1, "num-examples": 10}}
    assert problems == {}


def test_the_serverapp_audits_a_spoofed_reply_in_the_runs_audit_log(tmp_path, reply, tracker):
    from fl_server.run.server_app import plant_identities

    write_plants(tmp_path / "plants.json", {"plant-1": (11, "active"), "plant-2": (12, "active")})
    use_identities(plant_identities(RunConfig(federation_dir=str(tmp_path)), tracker))
    assert plant_of(reply(12, "plant-1", 1.0, 10, 0.5)) == "plant-2"
    assert tracker.events == [("reply.spoofed", {"node_id": 12, "claimed": "plant-1", "plant": "plant-2", "message_type": "train"})]


def test_the_superlinks_own_notice_that_a_node_did_not_answer_is_that_plants(federation):
    """Flower writes an error reply itself (from node 1, the SuperLink) when a node went offline or a message expired;
    it speaks for the node the message went to, never for an unknown 'node-1'."""
    from flwr.app import Message, MessageType, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_ins_message

    from fl_server.run.identity import note_sent, refusal

    sent = Message(content=RecordDict({}), dst_node_id=12, message_type=MessageType.TRAIN)
    sent.metadata.__dict__["_message_id"] = sent.object_id
    note_sent(sent.metadata.message_id, 12)  # fl_server.run.grid.PollingGrid notes every message it pushes
    notice = create_message_error_unavailable_ins_message(sent.metadata.message_id, run_id=1)  # as the SuperLink makes it
    assert notice.metadata.src_node_id == SUPERLINK_NODE_ID
    assert refusal(notice) is None and plant_of(notice) == "plant-2"
    assert failure_reason(notice).startswith("plant-2: ") and "node" not in failure_reason(notice).split(":")[0]
