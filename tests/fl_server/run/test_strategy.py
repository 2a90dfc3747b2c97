import numpy as np
import pytest

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from fl_server.run.config import RunConfig
from fl_server.run.strategy import RunAborted, TrackedStrategy, build_strategy


def _strategy(tracker, min_plants=2):
    cfg = RunConfig(min_plants=min_plants)
    strategy = TrackedStrategy(build_strategy(cfg), tracker, min_plants=min_plants, num_rounds=3)
    strategy._phase_started = 0.0
    return strategy


def test_per_plant_and_aggregate_metrics_are_logged_at_the_round_step(tracker, reply):
    strategy = _strategy(tracker)
    arrays, metrics = strategy.aggregate_train(2, [reply(11, "plant-1", 1.0, 10, 0.5), reply(12, "plant-2", 4.0, 30, 0.9)])
    assert np.allclose(arrays.to_numpy_ndarrays()[0], 3.25)  # weighted by examples: (1*10 + 4*30) / 40
    assert tracker.metrics == {}  # a round is logged once it is complete (and checkpointed)
    strategy.aggregate_evaluate(2, [])
    assert tracker.metrics[("plant-1/train_loss", 2)] == 0.5
    assert tracker.metrics[("plant-2/num-examples", 2)] == 30
    assert tracker.metrics[("train_loss", 2)] == pytest.approx((0.5 * 10 + 0.9 * 30) / 40)
    assert ("round_train_overhead_s", 2) in tracker.metrics
    assert tracker.plants == {"plant-1", "plant-2"}


def test_a_failed_plant_is_skipped_while_enough_plants_remain(tracker, reply, failure):
    strategy = _strategy(tracker, min_plants=1)
    arrays, _ = strategy.aggregate_train(1, [reply(11, "plant-1", 2.0, 10, 0.5), failure(12, "disk full")])
    strategy.aggregate_evaluate(1, [])
    assert np.allclose(arrays.to_numpy_ndarrays()[0], 2.0)
    assert tracker.plants == {"plant-1"}
    assert tracker.events == [("plant.failed", {"round": 1, "phase": "train", "plant": "node-12", "reason": "disk full"})]


def test_run_stops_with_every_plants_reason_when_too_few_answer(tracker, reply, failure):
    strategy = _strategy(tracker, min_plants=2)
    with pytest.raises(RunAborted) as exc:
        strategy.aggregate_train(1, [reply(11, "plant-1", 2.0, 10, 0.5), failure(12, "no defect data at /srv")])
    assert "1 plant(s) returned an update, 2 needed" in str(exc.value)
    assert "node-12: no defect data at /srv" in str(exc.value)


def test_flower_exception_wrapping_is_removed_from_reasons(failure):
    from fl_server.run.strategy import failure_reason

    wrapped = failure(12, "<class 'maxfl.errors.DataError'>:<'/srv/defect.npz is not readable'>")
    assert failure_reason(wrapped) == "node-12: DataError: /srv/defect.npz is not readable"
    declined = failure(13, "plant-3 declined: no defect data at /srv")
    assert failure_reason(declined) == "plant-3 declined: no defect data at /srv"


def test_round_wall_and_overhead_are_logged_once_the_round_is_evaluated(tracker, reply):
    strategy = _strategy(tracker)
    strategy._round_started = strategy._phase_started = __import__("time").perf_counter()
    strategy.aggregate_train(4, [reply(11, "plant-1", 1.0, 10, 0.5), reply(12, "plant-2", 4.0, 30, 0.9)])
    strategy.aggregate_evaluate(4, [])
    assert tracker.metrics[("round_overhead_s", 4)] == pytest.approx(tracker.metrics[("round_wall_s", 4)] - 0.5)


def test_metrics_only_some_plants_report_are_logged_per_plant_and_left_out_of_the_average(tracker, reply):
    strategy = _strategy(tracker)
    a, b = reply(11, "plant-1", 1.0, 10, 0.5), reply(12, "plant-2", 3.0, 10, 0.7)
    a.content["metrics"]["eval_detection_idv06"] = 0.9
    strategy.aggregate_train(1, [a, b])
    strategy.aggregate_evaluate(1, [])
    assert tracker.metrics[("plant-1/eval_detection_idv06", 1)] == 0.9
    assert ("eval_detection_idv06", 1) not in tracker.metrics
    assert tracker.metrics[("train_loss", 1)] == pytest.approx(0.6)


def test_epsilon_is_logged_per_plant_and_as_the_largest_never_as_an_average(tracker, reply):
    strategy = _strategy(tracker)
    a, b = reply(11, "plant-1", 1.0, 10, 0.5), reply(12, "plant-2", 3.0, 30, 0.7)
    a.content["metrics"]["dp_epsilon"], b.content["metrics"]["dp_epsilon"] = 1.5, 2.5
    strategy.aggregate_train(1, [a, b])
    strategy.aggregate_evaluate(1, [])
    assert tracker.metrics[("plant-1/dp_epsilon", 1)] == 1.5 and tracker.metrics[("plant-2/dp_epsilon", 1)] == 2.5
    assert tracker.metrics[("dp_epsilon_max", 1)] == 2.5
    assert ("dp_epsilon", 1) not in tracker.metrics


def test_federated_evaluation_every_k_rounds_and_always_the_final_model(tracker):
    strategy = TrackedStrategy(FedAvg(), tracker, min_plants=1, num_rounds=7, evaluate_every=3)
    assert [r for r in range(1, 8) if strategy.evaluates(r)] == [3, 6, 7]
    assert list(strategy.configure_evaluate(2, ArrayRecord(), ConfigRecord(), grid=None)) == []
    assert strategy.aggregate_evaluate(2, []) is None
    assert {k for k, _ in tracker.metrics} == {"round_wall_s", "round_overhead_s"}  # no evaluation was logged


def test_a_plant_whose_update_was_rejected_does_not_count_as_a_contributor(tracker, reply):
    strategy = _strategy(tracker, min_plants=1)
    strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid=type("G", (), {"get_node_ids": lambda self: [11, 12]})())
    strategy.reject("plant-2")  # what update validation reports
    strategy.aggregate_train(1, [reply(11, "plant-1", 1.0, 10, 0.5), reply(12, "plant-2", 4.0, 30, 0.9)])
    assert tracker.plants == {"plant-1"}


def test_a_failure_reason_never_shows_a_heap_address(failure):
    from fl_server.run.strategy import failure_reason

    leaky = failure(12, "<class 'ValueError'>:<'cannot batch <torch.utils.data.DataLoader object at 0x7f3a2c1d9e50>'>")
    assert failure_reason(leaky) == "node-12: ValueError: cannot batch <torch.utils.data.DataLoader>"
    assert "0x" not in failure_reason(failure(13, "plant-3 declined: <function load at 0x7F00AB> failed"))


def test_each_round_after_the_first_says_about_how_long_the_rest_will_take(tracker, reply, monkeypatch, caplog):
    import logging

    from fl_server.run import strategy as module

    strategy = _strategy(tracker)  # 3 rounds
    monkeypatch.setattr(strategy.inner, "configure_train", lambda *args: [])
    clock = iter([100.0, 100.0, 160.0, 160.0])  # round 1 starts at 100 s, round 2 at 160 s: 60 s a round
    monkeypatch.setattr(module.time, "perf_counter", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="maxfl")
    for server_round in (1, 2):
        strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), None)
        strategy.aggregate_train(server_round, [reply(11, "plant-1", 1.0, 10, 0.5), reply(12, "plant-2", 4.0, 30, 0.9)])
    first, second = [r.getMessage() for r in caplog.records if " train (" in r.getMessage()]
    assert "left" not in first
    assert second.startswith("round 2/3 train (0.0s; about 120 s left)")  # rounds 2 and 3 at 60 s each


def _with_evaluation(msg, loss: float, examples: int):
    from flwr.app import MetricRecord

    msg.content["evaluation"] = MetricRecord({"num-examples": examples, "eval_loss": loss, "eval_time_s": 0.1})
    return msg


class _Grid:
    def get_node_ids(self):
        return [11, 12]


def test_a_rounds_evaluation_rides_on_the_next_train_message_and_is_logged_at_its_own_round(tracker, reply, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="maxfl")
    strategy = TrackedStrategy(build_strategy(RunConfig()), tracker, min_plants=2, num_rounds=3, fold_evaluation=True)
    strategy._phase_started = strategy._round_started = 0.0
    round_1 = list(strategy.configure_train(1, ArrayRecord([np.zeros(3, dtype=np.float32)]), ConfigRecord({"a": 1}), _Grid()))
    assert all("evaluate-first" not in m.content["config"] for m in round_1)  # nothing to evaluate yet: the initial weights
    strategy.aggregate_train(1, [reply(11, "plant-1", 1.0, 10, 0.5), reply(12, "plant-2", 4.0, 30, 0.9)])
    assert list(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), _Grid())) == []  # no exchange of its own
    strategy.aggregate_evaluate(1, [])
    round_2 = list(strategy.configure_train(2, ArrayRecord([np.zeros(3, dtype=np.float32)]), ConfigRecord({"a": 1}), _Grid()))
    assert all(m.content["config"]["evaluate-first"] is True for m in round_2)
    a = _with_evaluation(reply(11, "plant-1", 1.0, 10, 0.5), loss=0.2, examples=5)
    b = _with_evaluation(reply(12, "plant-2", 4.0, 30, 0.9), loss=0.6, examples=15)
    arrays, _ = strategy.aggregate_train(2, [a, b])
    assert np.allclose(arrays.to_numpy_ndarrays()[0], 3.25)  # the train aggregation saw one MetricRecord per reply
    assert ("eval_loss", 1) not in tracker.metrics  # logged with round 2, when round 2 is complete
    strategy.aggregate_evaluate(2, [])
    assert tracker.metrics[("eval_loss", 1)] == pytest.approx((0.2 * 5 + 0.6 * 15) / 20)  # at the round it evaluates
    assert tracker.metrics[("plant-2/eval_loss", 1)] == 0.6 and ("round_eval_wall_s", 1) not in tracker.metrics
    assert ("eval_loss", 2) not in tracker.metrics
    # the final model has no next train message: it is evaluated in an exchange of its own
    assert strategy.folds(2) and not strategy.folds(3)
    assert any("round 1/3 eval (with round 2's train message)" in r.getMessage() for r in caplog.records)


def test_a_folded_evaluation_is_in_the_checkpoint_and_logged_again_on_resume(tracker, reply, tmp_path):
    from fl_server.run.checkpoint import Checkpoint

    saved = []
    store = type("Store", (), {"save": lambda self, c: saved.append(Checkpoint.from_bytes(c.to_bytes()))})()
    strategy = TrackedStrategy(build_strategy(RunConfig()), tracker, min_plants=2, num_rounds=3, checkpoints=store, fold_evaluation=True)
    strategy._phase_started = strategy._round_started = 0.0
    strategy.configure_train(2, ArrayRecord([np.zeros(3, dtype=np.float32)]), ConfigRecord(), _Grid())
    strategy.aggregate_train(2, [_with_evaluation(reply(11, "plant-1", 1.0, 10, 0.5), 0.2, 5),
                                 _with_evaluation(reply(12, "plant-2", 4.0, 30, 0.9), 0.6, 15)])
    strategy.aggregate_evaluate(2, [])
    assert saved[-1].server_round == 2 and saved[-1].earlier["eval_loss"] == pytest.approx(0.5)
    tracker.metrics.clear()  # the ServerApp died after the checkpoint, before MLflow had the round
    resumed = TrackedStrategy(build_strategy(RunConfig()), tracker, min_plants=2, num_rounds=3, fold_evaluation=True)
    resumed.resume(saved[-1])
    assert tracker.metrics[("eval_loss", 1)] == pytest.approx(0.5) and ("train_loss", 2) in tracker.metrics


def test_without_folding_every_evaluation_has_its_exchange(tracker):
    strategy = TrackedStrategy(FedAvg(), tracker, min_plants=1, num_rounds=3, fold_evaluation=False)
    assert not any(strategy.folds(r) for r in (1, 2, 3))
    assert RunConfig(fraction_evaluate=0.5).folds_evaluation() is False and RunConfig().folds_evaluation() is True
