"""Checkpoints and resume: a run cut after round k and resumed equals the run that never stopped."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM

from fl_server.run.central_dp import CentralDP
from fl_server.run.checkpoint import Checkpoint, CheckpointStore, restore_strategy_state, strategy_state
from fl_server.run.config import RunConfig
from fl_server.run.strategy import TrackedStrategy
from fl_server.run.tracking import FLWR_RUN_ID_TAG, FLWR_RUN_IDS_TAG, tracked_run
from maxfl.errors import ConfigError


class MemoryStore:
    """Stands in for CheckpointStore (the MLflow side is tested below and end to end)."""

    def __init__(self) -> None:
        self.saved: list[Checkpoint] = []

    def save(self, checkpoint: Checkpoint) -> None:
        self.saved.append(Checkpoint.from_bytes(checkpoint.to_bytes()))  # through the bytes, as MLflow keeps them


def _global(value: float = 0.0) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full(3, value, dtype=np.float32)), "b": Array(np.full(2, value, dtype=np.float32))})


def _replies(reply, server_round: int) -> list:
    """Two plants whose updates differ per round, so optimiser state matters."""
    out = []
    for node, plant, shift in ((11, "plant-1", 0.3), (12, "plant-2", -0.1)):
        msg = reply(node, plant, 0.0, 10 + node, 0.5)
        msg.content["arrays"] = ArrayRecord({"w": Array(np.full(3, shift * server_round, np.float32)),
                                             "b": Array(np.full(2, shift / server_round, np.float32))})
        out.append(msg)
    return out


class TwoPlantGrid:
    def get_node_ids(self) -> list[int]:
        return [11, 12]


def _round(strategy: TrackedStrategy, local_round: int, arrays: ArrayRecord, reply) -> ArrayRecord:
    """One round as Flower's `Strategy.start` drives it (local round numbers, from 1 in every ServerApp)."""
    list(strategy.configure_train(local_round, arrays, ConfigRecord(), TwoPlantGrid()))
    new, _ = strategy.aggregate_train(local_round, _replies(reply, local_round + strategy.offset))
    strategy.aggregate_evaluate(local_round, [])
    return new


@pytest.mark.parametrize("make", [lambda: FedAdam(beta_1=0.9, beta_2=0.99), lambda: FedAvgM(server_momentum=0.9)], ids=["fedadam", "fedavgm"])
def test_a_resumed_run_continues_exactly_where_the_uninterrupted_one_goes(make, tracker, reply):
    whole = TrackedStrategy(make(), tracker, min_plants=2, num_rounds=4, checkpoints=MemoryStore())
    arrays = _global()
    for r in range(1, 5):
        arrays = _round(whole, r, arrays, reply)

    store = MemoryStore()
    first = TrackedStrategy(make(), tracker, min_plants=2, num_rounds=4, checkpoints=store)
    cut = _global()
    for r in range(1, 3):
        cut = _round(first, r, cut, reply)
    assert [c.server_round for c in store.saved] == [1, 2]
    assert strategy_state(first.inner)  # moments / momentum exist after two rounds

    again = TrackedStrategy(make(), tracker, min_plants=2, num_rounds=4, checkpoints=MemoryStore())
    resumed = again.resume(store.saved[-1])
    assert again.offset == 2
    for r in range(1, 3):  # Flower counts from 1 again; the wrapper adds the 2 rounds done
        resumed = _round(again, r, resumed, reply)
    for key in ("w", "b"):
        np.testing.assert_allclose(resumed[key].numpy(), arrays[key].numpy(), rtol=1e-6)


def test_without_the_optimiser_state_the_resumed_run_would_differ(tracker, reply):
    """The previous test can fail: dropping FedAdam's moments changes the result."""
    whole = TrackedStrategy(FedAdam(beta_1=0.9, beta_2=0.99), tracker, min_plants=2, num_rounds=3)
    arrays = _global()
    for r in range(1, 4):
        arrays = _round(whole, r, arrays, reply)
    store = MemoryStore()
    first = TrackedStrategy(FedAdam(beta_1=0.9, beta_2=0.99), tracker, min_plants=2, num_rounds=3, checkpoints=store)
    cut = _global()
    for r in range(1, 3):
        cut = _round(first, r, cut, reply)
    stateless = TrackedStrategy(FedAdam(beta_1=0.9, beta_2=0.99), tracker, min_plants=2, num_rounds=3)
    stateless.offset = 2
    out = _round(stateless, 1, store.saved[-1].arrays, reply)
    assert not np.allclose(out["w"].numpy(), arrays["w"].numpy())


def test_checkpoint_bytes_round_trip_every_kind_of_state():
    state = {"A.m_t": {"w": np.arange(3.0)}, "A.inner.momentum_vector": [np.ones(2), np.zeros(1)], "A.dp.releases": 4}
    back = Checkpoint.from_bytes(Checkpoint(5, _global(1.5), {"round_wall_s": 2.0}, state).to_bytes())
    assert back.server_round == 5 and back.metrics == {"round_wall_s": 2.0}
    np.testing.assert_array_equal(back.arrays["w"].numpy(), np.full(3, 1.5, np.float32))
    np.testing.assert_array_equal(back.state["A.m_t"]["w"], np.arange(3.0))
    assert [a.tolist() for a in back.state["A.inner.momentum_vector"]] == [[1.0, 1.0], [0.0]]
    assert back.state["A.dp.releases"] == 4


def test_state_is_found_through_wrappers_and_restored_into_them():
    cfg = RunConfig(central_dp="server-clipping")
    outer = CentralDP(FedAvg(), cfg, num_plants=2)
    outer.releases = 3
    state = strategy_state(outer)
    assert state == {"CentralDP.releases": 3}
    fresh = CentralDP(FedAvg(), cfg, num_plants=2)
    restore_strategy_state(fresh, state)
    assert fresh.releases == 3
    with pytest.raises(ConfigError, match="does not have"):
        restore_strategy_state(FedAvg(), {"FedAdam.m_t": {}})


def test_a_checkpointed_round_is_logged_once_whether_or_not_the_crash_came_before_logging(tracker):
    checkpoint = Checkpoint(3, _global(), {"round_wall_s": 1.0, "plant-1/train_time_s": 0.4})
    TrackedStrategy(FedAvg(), tracker, min_plants=1, num_rounds=5).resume(checkpoint)
    assert tracker.metrics == {("round_wall_s", 3): 1.0, ("plant-1/train_time_s", 3): 0.4}
    tracker.metrics[("round_wall_s", 3)] = 9.0  # already logged: resuming again must not log it twice
    TrackedStrategy(FedAvg(), tracker, min_plants=1, num_rounds=5).resume(checkpoint)
    assert tracker.metrics[("round_wall_s", 3)] == 9.0


@pytest.fixture(params=["sqlite", "postgresql"])
def mlflow_uri(request, tmp_path):
    """MLflow's SQLite store and PostgreSQL (the production store; a fresh database per test); artifacts in a folder."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_uri")
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("resume-test", artifact_location=str(tmp_path / "artifacts"))
    return uri


def test_the_store_commits_with_the_tag_and_resume_reopens_the_same_mlflow_run(mlflow_uri):
    from mlflow import MlflowClient

    cfg = RunConfig(tracking_uri=mlflow_uri, experiment_name="resume-test", num_server_rounds=4)
    client = MlflowClient(mlflow_uri)
    with pytest.raises(RuntimeError), tracked_run(cfg, flwr_run_id=7, fab_hash="fab") as tracker:
        store = CheckpointStore(client, tracker.run_id)
        assert store.load() is None
        store.save(Checkpoint(1, _global(1.0), {"round_wall_s": 1.0}))
        tracker.log_metrics({"round_wall_s": 1.0}, step=1)
        store.save(Checkpoint(2, _global(2.0), {"round_wall_s": 2.0}))  # crash before round 2 is logged
        raise RuntimeError("ServerApp killed")
    run_id = tracker.run_id
    assert client.get_run(run_id).info.status == "FAILED"

    with tracked_run(cfg.model_copy(update={"resume": run_id}), flwr_run_id=9, fab_hash="fab") as again:
        assert again.run_id == run_id and again.run_series == 7
        checkpoint = CheckpointStore(client, run_id).load()
        assert checkpoint is not None and checkpoint.server_round == 2
        np.testing.assert_array_equal(checkpoint.arrays["w"].numpy(), np.full(3, 2.0, np.float32))
        again.ensure_logged(checkpoint.metrics, step=2)
        again.ensure_logged(checkpoint.metrics, step=2)
    run = client.get_run(run_id)
    assert run.data.tags[FLWR_RUN_ID_TAG] == "9" and run.data.tags[FLWR_RUN_IDS_TAG] == "7,9"
    assert [m.step for m in client.get_metric_history(run_id, "round_wall_s")] == [1, 2]  # each round once

    with pytest.raises(ConfigError, match="already finished"), tracked_run(cfg.model_copy(update={"resume": run_id}), 10, "fab"):
        pass


def test_rounds_of_more_metrics_than_one_mlflow_batch_arrive_whole_and_in_order_before_the_run_ends(mlflow_uri):
    """RunTracker writes in the background, one round deep (100 plants' metrics: three of MLflow's batches a round)."""
    from mlflow import MlflowClient

    cfg = RunConfig(tracking_uri=mlflow_uri, experiment_name="resume-test")
    metrics = {f"plant-{p}/m{i}": float(p * i) for p in range(1, 101) for i in range(23)} | {"round_wall_s": 1.0}
    with tracked_run(cfg, flwr_run_id=3, fab_hash="fab") as tracker:
        tracker.log_metrics(metrics, step=1)
        tracker.log_metrics(metrics | {"round_wall_s": 2.0}, step=2)
    client = MlflowClient(mlflow_uri)
    assert client.get_run(tracker.run_id).data.metrics == metrics | {"round_wall_s": 2.0}
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "round_wall_s")] == [(1, 1.0), (2, 2.0)]
    assert sorted(m.step for m in client.get_metric_history(tracker.run_id, "plant-100/m22")) == [1, 2]


def test_resume_refuses_another_run_config_and_unknown_runs(mlflow_uri):
    cfg = RunConfig(tracking_uri=mlflow_uri, experiment_name="resume-test", num_server_rounds=4)
    with pytest.raises(RuntimeError), tracked_run(cfg, flwr_run_id=1, fab_hash="fab") as tracker:
        raise RuntimeError("killed")
    changed = cfg.model_copy(update={"resume": tracker.run_id, "num_server_rounds": 6})
    with pytest.raises(ConfigError, match=r"num-server-rounds \(4 then, 6 now\)"), tracked_run(changed, 2, "fab"):
        pass
    with pytest.raises(ConfigError, match="there is no MLflow run"), tracked_run(cfg.model_copy(update={"resume": "0" * 32}), 2, "fab"):
        pass
