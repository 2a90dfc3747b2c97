"""The anchor's side of contribution: rounds kept as aggregated, one batched message per plant, logged and read back."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.serverapp.strategy import FedAvg

from fl_server.run import contribution_round
from fl_server.run.config import RunConfig
from fl_server.run.contribution import ContributionSettings, ReconstructedUtility, estimate, reconstruct
from fl_server.run.contribution_round import FederatedScorer, RoundStore, record_rounds, round_store
from fl_server.run.validation import UpdateRules, ValidatedStrategy
from maxfl.messages import ARRAYS, CONFIG, CONTRIBUTION, ContributionRequest

from tests.fl_server.conftest import _instruction

GLOBAL = np.zeros(3, dtype=np.float32)


class NodeGrid:
    def get_node_ids(self):
        return [11, 12, 13]


def test_the_recorder_keeps_exactly_the_updates_validation_lets_through_with_their_capped_weights(reply, failure):
    store = RoundStore()
    rejected = []
    strategy = ValidatedStrategy(record_rounds(FedAvg(min_available_nodes=1, min_train_nodes=1), store), UpdateRules(), 1,
                                 on_reject=lambda r, p, why: rejected.append(p), agreed_examples={"plant-1": 10, "plant-2": 5, "plant-3": 8})
    list(strategy.configure_train(1, ArrayRecord([GLOBAL.copy()]), ConfigRecord(), NodeGrid()))
    replies = [reply(11, "plant-1", np.array([1.0, 2.0, 3.0], np.float32), 10, 0.5),
               reply(12, "plant-2", np.array([0.5, 0.25, 0.0], np.float32), 50, 0.5),  # claims 50, agreed 5: weighted by 5
               reply(13, "plant-3", np.array([np.nan, 0.0, 0.0], np.float32), 8, 0.5),  # rejected: never a contributor
               failure(14, "plant-4 declined: over its ceiling")]
    arrays, _ = strategy.aggregate_train(1, replies)
    (kept,) = store.rounds().values()
    assert rejected == ["plant-3"] and kept.plants == ("plant-1", "plant-2") and kept.weights == (10.0, 5.0)
    assert store.nodes == {11, 12, 14}  # the plants heard in the run score the models: those that trained, or declined, or evaluated
    assert np.array_equal(kept.global_model, GLOBAL) and kept.models.shape == (2, 3)
    # the full set rebuilds the aggregate bit for bit: it is scored once, as round 2's global model
    assert reconstruct(kept, kept.plants).tobytes() == arrays.to_numpy_ndarrays()[0].tobytes()
    store.close()
    assert store.rounds() == {}


def test_contribution_off_keeps_nothing_and_leaves_the_strategy_as_it_is():
    inner = FedAvg()
    assert round_store(RunConfig(contribution="off")) is None and record_rounds(inner, None) is inner
    assert isinstance(round_store(RunConfig()), RoundStore)


def plant_answers(targets: dict[int, tuple[str, np.ndarray]], metric: str = "eval_macro_f1", examples: dict[str, int] | None = None,
                  classes: dict[str, int] | None = None, fail: set[str] = frozenset(), silent: set[str] = frozenset()):
    """Plants by node: each scores a model by closeness to its own target, as a plant's handler would reply."""
    received: list[Message] = []

    class Grid:
        def get_node_ids(self):
            return list(targets)

        def send_and_receive(self, messages, timeout=None):
            replies = []
            for msg in messages:
                received.append(msg)
                plant, target = targets[msg.metadata.dst_node_id]
                if plant in silent:
                    continue
                ins = _instruction(msg.metadata.dst_node_id)
                if plant in fail:
                    replies.append(Message(Error(code=0, reason=f"{plant} declined: data folder missing"), reply_to=ins))
                    continue
                request = ContributionRequest.parse(msg.content[CONTRIBUTION])
                stack = msg.content[ARRAYS].to_numpy_ndarrays()[0]
                scores = [1.0 - float(np.sum((row - target) ** 2)) for row in stack]
                metrics = {request.metric: scores, "num-examples": (examples or {}).get(plant, 10), "model-offset": request.offset}
                if classes and plant in classes:
                    metrics["eval_test_classes"] = classes[plant]
                replies.append(Message(RecordDict({"metrics": MetricRecord(metrics), "plant": ConfigRecord({"plant-id": plant})}), reply_to=ins))
            return replies

    return Grid(), received


PLAN = {"task": "table", "seed": 1}


def test_every_plant_scores_the_whole_batch_from_one_message_and_only_counted_plants_make_the_utility():
    targets = {11: ("plant-1", np.ones(3)), 12: ("plant-2", np.zeros(3)), 13: ("plant-3", np.ones(3)), 14: ("plant-4", np.ones(3)),
               15: ("plant-5", np.ones(3))}
    grid, received = plant_answers(targets, examples={"plant-1": 30, "plant-2": 500}, classes={"plant-3": 1}, fail={"plant-4"}, silent={"plant-5"})
    scorer = FederatedScorer(grid, RunConfig(num_server_rounds=4, round_timeout_s=5), PLAN, "eval_macro_f1", caps={"plant-2": 10})
    models = np.stack([np.ones(3), np.zeros(3), np.full(3, 0.5)]).astype(np.float32)
    got = scorer(models)
    assert len(received) == 5 and {m.metadata.message_type for m in received} == {f"query.{CONTRIBUTION}"}
    assert all(m.content[ARRAYS].to_numpy_ndarrays()[0].shape == (3, 3) for m in received)
    assert received[0].content[CONFIG]["server-round"] == 4 and received[0].content[CONTRIBUTION]["metric"] == "eval_macro_f1"
    assert set(got) == {"plant-1", "plant-2"}
    assert got["plant-1"].scores == pytest.approx([1.0, -2.0, 0.25]) and got["plant-1"].examples == 30
    assert got["plant-2"].examples == 10  # the held-out count it claims is capped by what it declared
    assert "one class" in scorer.problems["plant-3"] and "declined" in scorer.problems["plant-4"]
    assert scorer.problems["node-15"] == "did not answer within 5s"  # silent from the start: known by its node only


def test_only_the_runs_plants_receive_the_rebuilt_models():
    grid, received = plant_answers({11: ("plant-1", np.ones(3)), 12: ("plant-2", np.ones(3)), 99: ("intruder", np.ones(3))})
    got = FederatedScorer(grid, RunConfig(), PLAN, "eval_macro_f1", nodes={11, 12})(np.ones((2, 3), np.float32))
    assert {m.metadata.dst_node_id for m in received} == {11, 12} and set(got) == {"plant-1", "plant-2"}


def test_a_metric_where_lower_is_better_is_turned_so_that_more_utility_is_better():
    grid, _ = plant_answers({11: ("plant-1", np.ones(3))})
    scorer = FederatedScorer(grid, RunConfig(), PLAN, "eval_loss")
    assert scorer(np.ones((1, 3), np.float32))["plant-1"].scores == [-1.0]


def test_a_batch_larger_than_one_message_goes_in_several_and_is_put_back_in_order(monkeypatch):
    monkeypatch.setattr(contribution_round, "MAX_MESSAGE_BYTES", 2 * 3 * 4)  # two models of 3 floats a message
    grid, received = plant_answers({11: ("plant-1", np.zeros(3)), 12: ("plant-2", np.zeros(3))})
    models = np.stack([np.full(3, k, np.float32) for k in range(5)])
    got = FederatedScorer(grid, RunConfig(), PLAN, "eval_macro_f1")(models)
    assert len(received) == 2 * 3
    assert got["plant-1"].scores == pytest.approx([1.0 - 3 * k * k for k in range(5)])


def test_values_from_the_plants_scores_sum_to_the_rounds_gain():
    store = RoundStore()
    w = {"plant-1": np.array([1.0, 1.0, 1.0], np.float32), "plant-2": np.array([1.0, 0.0, 1.0], np.float32),
         "plant-3": np.array([-1.0, -1.0, -1.0], np.float32)}
    store.record(1, GLOBAL, list(w), list(w.values()), [10.0, 10.0, 10.0])
    grid, received = plant_answers({11: ("plant-1", np.ones(3)), 12: ("plant-2", np.ones(3)), 13: ("plant-3", np.ones(3))})
    utility = ReconstructedUtility(store.rounds(), FederatedScorer(grid, RunConfig(), PLAN, "eval_macro_f1"))
    (r,) = estimate(list(store.rounds().values()), utility, ContributionSettings())
    assert len(received) == 3 and r.status == "exact"  # one exchange: 8 models to each of the 3 plants in one message
    assert sum(r.shapley.values()) == pytest.approx(r.v_all - r.v_empty)
    assert r.shapley["plant-3"] < 0 < r.shapley["plant-2"] < r.shapley["plant-1"]  # pulling away from the target costs credit
    store.close()


def test_the_step_logs_metrics_artifacts_and_the_cli_reads_them_back(tmp_path, reply):
    import mlflow
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from fl_server.run.contribution_round import assess_contributions
    from fl_server.run.tracking import RunTracker
    from launcher.cli import app

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("c", artifact_location=str(tmp_path / "artifacts")))
    run_id = run.info.run_id
    from mlflow.entities import Metric

    # round 1 was evaluated with round 2's train message (no exchange of its own: its slowest plant's time counts), round 2 alone
    evaluation = [("round_eval_wall_s", 1.2, 2), ("plant-1/eval_time_s", 0.2, 1), ("plant-2/eval_time_s", 0.3, 1), ("plant-2/eval_time_s", 0.4, 2)]
    client.log_batch(run_id, metrics=[Metric(key, value, 0, step) for key, value, step in evaluation])
    tracker = RunTracker(mlflow, run_id, uri)
    tracker.plants = {"plant-1", "plant-2", "plant-3"}
    store = RoundStore()
    for r, global_model in ((1, GLOBAL), (2, np.full(3, 0.5, np.float32))):
        store.record(r, global_model, ["plant-1", "plant-2"], [np.ones(3, np.float32), np.full(3, 0.8, np.float32)], [10.0, 20.0])
    store.nodes = {11, 12, 13}  # plant-3 evaluated in the run's rounds without training
    grid, _ = plant_answers({11: ("plant-1", np.ones(3)), 12: ("plant-2", np.ones(3)), 13: ("plant-3", np.ones(3))})
    cfg = RunConfig(num_server_rounds=2)
    report = assess_contributions(grid, cfg, store, tracker, PLAN, "eval_macro_f1", resumed_after=0)
    assert report is not None and report.exchanges == 1 and report.eval_s == pytest.approx(1.2 + 0.3)
    assert [p.plant for p in report.plants] == ["plant-1", "plant-2", "plant-3"] and report.evaluators == ["plant-1", "plant-2", "plant-3"]
    assert sum(p.shapley for p in report.plants) == pytest.approx(report.utility_gain)
    logged = client.get_run(run_id).data.metrics
    for p in report.plants:
        assert logged[f"contribution/{p.plant}/shapley"] == pytest.approx(p.shapley)
        assert logged[f"contribution/{p.plant}/loo"] == pytest.approx(p.loo)
    assert logged["contribution/cost_s"] > 0 and logged["contribution/eval_s"] == pytest.approx(1.5)
    assert [m.step for m in client.get_metric_history(run_id, "contribution/v_all")] == [1, 2]
    files = {f.path for f in client.list_artifacts(run_id, "contribution")}
    assert {"contribution/contributions.json", "contribution/contributions.csv", "contribution/contributions.png"} <= files
    assert "plant-3 +0.0000" in client.get_run(run_id).data.tags["maxfl.contribution"]  # it scored, but trained in no round
    out = CliRunner().invoke(app, ["contributions", run_id, "--tracking-uri", uri, "--json"])
    assert out.exit_code == 0, out.output
    shown = json.loads(out.output)
    assert {p["plant"]: p["shapley"] for p in shown["plants"]} == pytest.approx({p.plant: p.shapley for p in report.plants})
    table = CliRunner().invoke(app, ["contributions", run_id, "--tracking-uri", uri])
    assert table.exit_code == 0 and "plant-2" in table.output and "leave-one-out" in table.output
    missing = CliRunner().invoke(app, ["contributions", "0" * 32, "--tracking-uri", uri])
    assert missing.exit_code != 0
    # after a resume, the rounds before it are gone from this ServerApp: computed over the rounds it has, and said so
    store = RoundStore()
    store.record(3, GLOBAL, ["plant-1", "plant-2"], [np.ones(3, np.float32), np.zeros(3, np.float32)], [1.0, 1.0])
    store.nodes = {11, 12, 13}
    resumed = assess_contributions(grid, RunConfig(num_server_rounds=3), store, tracker, PLAN, "eval_macro_f1", resumed_after=2)
    assert [r.round for r in resumed.rounds] == [3] and any("resumed after round 2" in note for note in resumed.notes)


def test_no_plant_scoring_the_models_leaves_the_run_going_with_the_reason_tagged(tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from fl_server.run.contribution_round import assess_contributions
    from fl_server.run.tracking import RunTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("c", artifact_location=str(tmp_path / "artifacts"))).info.run_id
    store = RoundStore()
    store.record(1, GLOBAL, ["plant-1", "plant-2"], [np.ones(3, np.float32), np.zeros(3, np.float32)], [1.0, 1.0])
    store.nodes = {11, 12}
    grid, _ = plant_answers({11: ("plant-1", np.ones(3)), 12: ("plant-2", np.ones(3))}, fail={"plant-1", "plant-2"})
    assert assess_contributions(grid, RunConfig(), store, RunTracker(mlflow, run_id, uri), PLAN, "eval_macro_f1") is None
    tag = client.get_run(run_id).data.tags["maxfl.contribution"]
    assert tag.startswith("failed: no plant scored every model") and "plant-1 declined: data folder missing" in tag


def test_an_error_of_the_step_itself_is_tagged_and_the_run_goes_on(tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from fl_server.run.contribution_round import assess_contributions
    from fl_server.run.tracking import RunTracker

    class BrokenGrid:
        def get_node_ids(self):
            return [11]

        def send_and_receive(self, messages, timeout=None):
            raise RuntimeError("the SuperLink went away")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("c", artifact_location=str(tmp_path / "artifacts"))).info.run_id
    store = RoundStore()
    store.record(1, GLOBAL, ["plant-1"], [np.ones(3, np.float32)], [1.0])
    store.nodes = {11}
    assert assess_contributions(BrokenGrid(), RunConfig(), store, RunTracker(mlflow, run_id, uri), PLAN, "eval_macro_f1") is None
    assert client.get_run(run_id).data.tags["maxfl.contribution"] == "failed: RuntimeError: the SuperLink went away"
    assert store.rounds() == {}  # the kept updates are removed either way
