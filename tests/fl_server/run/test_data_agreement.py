"""The pre-training data check, against a stand-in grid: declines, too few plants, schema disagreement."""

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.error import Error
from flwr.supercore.task_identity import TaskIdentity

from fl_server.run.config import RunConfig
from fl_server.run.data_agreement import agree_on_data
from fl_server.run.strategy import RunAborted
from tasks import get_task
from tasks.defect import DefectProfile

SCHEMA = {"image": "grey 64x64 (resized)", "label": "defect probability >= 0.5"}


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class StandInGrid:
    """Answers each query message with the scripted reply of its node."""

    def __init__(self, answers):
        self.answers = answers
        self.sent = []

    def get_node_ids(self):
        return list(self.answers)

    def send_and_receive(self, messages, *, timeout=None):
        self.sent = list(messages)
        replies = []
        for msg in self.sent:
            TaskIdentity.node_id = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = msg.object_id
            answer = self.answers[msg.metadata.dst_node_id]
            if answer is None:
                continue  # the plant never answers
            if isinstance(answer, str):
                replies.append(Message(Error(code=0, reason=answer), reply_to=msg))
            else:
                plant, profile = answer
                content = RecordDict({"config": ConfigRecord({"profile": profile.model_dump_json(by_alias=True)}),
                                      "plant": ConfigRecord({"plant-id": plant})})
                replies.append(Message(content=content, reply_to=msg))
        return replies


def _profile(schema=SCHEMA, task="defect"):
    return DefectProfile(task=task, fingerprint="ab" * 32, examples=10, schema=schema, class_counts={"good": 7, "defective": 3})


def test_every_connected_plant_is_asked_and_a_spec_is_agreed():
    grid = StandInGrid({7: ("plant-1", _profile()), 9: ("plant-2", _profile())})
    spec, profiles = agree_on_data(grid, RunConfig(min_plants=2), get_task("defect"))
    assert sorted(m.metadata.dst_node_id for m in grid.sent) == [7, 9]
    assert all(m.metadata.message_type == "query" for m in grid.sent)
    assert set(profiles) == {"plant-1", "plant-2"} and spec.num_classes == 2


def test_a_declining_plant_is_left_out_while_enough_remain():
    grid = StandInGrid({1: ("plant-1", _profile()), 2: ("plant-2", _profile()), 3: "plant-3 declined: no manifest.toml"})
    _, profiles = agree_on_data(grid, RunConfig(min_plants=2), get_task("defect"))
    assert set(profiles) == {"plant-1", "plant-2"}


def test_too_few_usable_plants_stops_the_run_with_every_reason():
    grid = StandInGrid({1: ("plant-1", _profile()), 2: "plant-2 declined: quality.csv has no target column", 3: None})
    with pytest.raises(RunAborted) as err:
        agree_on_data(grid, RunConfig(min_plants=2, round_timeout_s=1), get_task("defect"))
    message = str(err.value)
    assert "1 plant(s) have usable data, 2 needed" in message
    assert "plant-2 declined: quality.csv has no target column" in message and "1 plant(s) did not answer" in message


def test_schema_disagreement_stops_the_run_naming_the_plant():
    odd = dict(SCHEMA, image="RGB 128x128")
    grid = StandInGrid({1: ("plant-1", _profile()), 2: ("plant-2", _profile(odd)), 3: ("plant-3", _profile())})
    with pytest.raises(RunAborted, match=r"plant-2: image is 'RGB 128x128' \(plant-1, plant-3: 'grey 64x64"):
        agree_on_data(grid, RunConfig(min_plants=2), get_task("defect"))


def _labelled(counts):
    return DefectProfile(task="defect", fingerprint="ab" * 32, examples=sum(counts.values()), schema=SCHEMA, class_counts=counts)


def test_a_plant_with_its_own_label_names_stops_the_run_naming_both_vocabularies():
    grid = StandInGrid({1: ("plant-1", _labelled({"0": 8, "1": 2})), 2: ("plant-2", _labelled({"no": 8, "yes": 2})),
                        3: ("plant-3", _labelled({"0": 5, "1": 5}))})
    with pytest.raises(RunAborted) as err:
        agree_on_data(grid, RunConfig(min_plants=2), get_task("defect"))
    message = str(err.value)
    assert "plants disagree on the labels" in message
    assert "plant-2: labels 'no', 'yes' are at no other plant (its labels: 'no', 'yes'; the others': '0', '1')" in message
    assert "plant-1" not in message.split("plant-2:")[0].split("labels,")[-1]  # only the odd plant is named


def test_a_class_missing_at_one_plant_is_a_warning_and_the_run_goes_on(caplog):
    grid = StandInGrid({1: ("plant-1", _labelled({"good": 9, "defective": 0})), 2: ("plant-2", _labelled({"good": 6, "defective": 4}))})
    with caplog.at_level("WARNING", logger="maxfl"):
        spec, profiles = agree_on_data(grid, RunConfig(min_plants=2), get_task("defect"))
    assert set(profiles) == {"plant-1", "plant-2"}
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data check: ")]
    assert "data check: only plant-2 has examples of 'defective': no other plant can score the model on them" in said
    assert any(m.startswith("data check: plant-1 has no training examples of 'defective' (other plants do)") for m in said), said


def test_labels_are_not_compared_where_there_are_none():
    from tasks.base import check_labels

    class Unlabelled(DefectProfile):
        def label_counts_or_none(self):
            return None

    profiles = {"a": Unlabelled(task="defect", fingerprint="ab" * 32, examples=1, schema=SCHEMA), "b": _labelled({"x": 1})}
    assert check_labels(profiles) == []
