"""The plant's side of contribution per plant: a stack of rebuilt models scored on the held-out split, metrics only back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fl_client.client_app import app
from fl_client.config import PlantConfig
from maxfl.messages import ARRAYS, CONFIG, CONTRIBUTION, METRICS, ContributionRequest, TrainingPlan
from maxfl.weights import pack
from tasks import get_task
from tasks.base import TaskOptions


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 3, 1


@pytest.fixture(scope="module")
def table_plants(tmp_path_factory):
    task = get_task("table")
    root = tmp_path_factory.mktemp("plants")
    dirs = task.prepare_plants(2, root, 42, 80)
    spec = task.make_spec({d.name: task.profile(d, 42) for d in dirs}, TaskOptions())
    return task, spec, dirs


def ask(plant: PlantConfig, content: RecordDict) -> Message:
    from flwr.common.config import parse_config_args

    context = Context(run_id=7, node_id=3, node_config=parse_config_args([plant.as_node_config()]), state=RecordDict(), run_config={})
    msg = Message(content=content, dst_node_id=3, message_type=f"query.{CONTRIBUTION}")
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return app(msg, context)


def test_each_model_of_the_stack_is_scored_as_the_plants_evaluation_would_and_nothing_is_spent(table_plants, tmp_path):
    task, spec, dirs = table_plants
    plant = PlantConfig(plant_id="plant-1", data_dir=dirs[0], ledger=tmp_path / "ledger.json")
    models = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        models.append(task.build_model(spec))
    stack = np.stack([pack(m).to_numpy_ndarrays()[0] for m in models])
    plan = TrainingPlan(task="table", seed=42, task_spec=spec.model_dump_json()).to_flower() | {"server-round": 3}
    reply = ask(plant, RecordDict({CONFIG: ConfigRecord(plan), ARRAYS: ArrayRecord([stack]),
                                   CONTRIBUTION: ConfigRecord(ContributionRequest(metric="eval_macro_f1", offset=6).to_flower())}))
    assert not reply.has_error(), reply.error
    assert list(reply.content.array_records) == []  # metrics only leave the plant
    metrics = reply.content[METRICS]
    data = task.load_plant_data(dirs[0], 42, spec)
    expected = [task.evaluate(m, data, spec)["eval_macro_f1"] for m in models]
    assert metrics["eval_macro_f1"] == pytest.approx(expected)
    assert metrics["num-examples"] == len(data.y_test) and metrics["model-offset"] == 6 and metrics["eval_test_classes"] == 2
    assert not (tmp_path / "ledger.json").exists()  # no training, no epsilon: the ledger is never opened


def test_models_that_do_not_come_as_one_stack_are_declined_with_the_reason(table_plants, tmp_path):
    task, spec, dirs = table_plants
    plant = PlantConfig(plant_id="plant-2", data_dir=dirs[1], ledger=tmp_path / "ledger.json")
    plan = TrainingPlan(task="table", seed=42, task_spec=spec.model_dump_json()).to_flower() | {"server-round": 1}
    flat = pack(task.build_model(spec))
    reply = ask(plant, RecordDict({CONFIG: ConfigRecord(plan), ARRAYS: flat,
                                   CONTRIBUTION: ConfigRecord(ContributionRequest(metric="eval_macro_f1").to_flower())}))
    assert reply.has_error() and "plant-2 declined: the anchor sent contribution models as arrays" in reply.error.reason
