"""Update validation: only updates shaped like the global model, finite and of ordinary size are aggregated."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fl_server.run.config import RunConfig
from fl_server.run.strategy import RunAborted, build_strategy
from fl_server.run.validation import UpdateRules, ValidatedStrategy, check_update

GLOBAL = np.zeros(3, dtype=np.float32)


class FakeGrid:
    def get_node_ids(self):
        return [11, 12, 13, 14, 15]


class Rejections(list):
    def __call__(self, server_round: int, plant: str, reason: str) -> None:
        self.append((server_round, plant, reason))


def _validated(inner=None, min_plants: int = 2, rejections: Rejections | None = None, **rules) -> ValidatedStrategy:
    strategy = ValidatedStrategy(inner or FedAvg(min_available_nodes=1, min_train_nodes=1), UpdateRules(**rules), min_plants, on_reject=rejections)
    list(strategy.configure_train(1, ArrayRecord([GLOBAL.copy()]), ConfigRecord(), FakeGrid()))
    return strategy


def _honest(reply, n: int = 3):
    return [reply(11 + i, f"plant-{i + 1}", np.full(3, 1.0 + 0.1 * i, dtype=np.float32), 10, 0.5) for i in range(n)]


def test_valid_updates_reach_the_inner_strategy_untouched(reply):
    rejections = Rejections()
    arrays, metrics = _validated(rejections=rejections).aggregate_train(1, _honest(reply))
    assert np.allclose(arrays.to_numpy_ndarrays()[0], 1.1) and arrays["0"].dtype == "float32"
    assert metrics["train_loss"] == pytest.approx(0.5)
    assert rejections == []


def _with_arrays(record: ArrayRecord):
    def change(msg):
        msg.content["arrays"] = record
    return change


def _with_weight(value):
    def change(msg):
        msg.content["metrics"] = MetricRecord({"num-examples": value, "train_loss": 0.5, "train_time_s": 0.5})
    return change


@pytest.mark.parametrize(("damage", "reason"), [
    (_with_arrays(ArrayRecord({"conv1.weight": Array(np.ones(3, np.float32))})), "array '0' is missing"),
    (_with_arrays(ArrayRecord({"0": Array(np.ones(3, np.float32)), "extra": Array(np.ones(1, np.float32))})), "array 'extra' is not in the global model"),
    (_with_arrays(ArrayRecord([np.ones(4, np.float32)])), "array '0' has shape (4,), expected (3,)"),
    (_with_arrays(ArrayRecord([np.ones(3, np.float64)])), "array '0' has dtype float64, expected float32"),
    (_with_arrays(ArrayRecord([np.ones(3, np.int64)])), "array '0' has dtype int64, expected float32"),
    (_with_arrays(ArrayRecord([np.array([np.nan, 1.0, np.nan], np.float32)])), "array '0' has 2 non-finite values"),
    (_with_arrays(ArrayRecord([np.array([np.inf, 1.0, 1.0], np.float32)])), "array '0' has 1 non-finite value"),
    (_with_weight(0), "metric 'num-examples' is 0, not a positive number"),
    (_with_weight(float("nan")), "metric 'num-examples' is nan, not a positive number"),
])
def test_a_malformed_update_is_rejected_with_its_reason_and_never_aggregated(reply, damage, reason):
    rejections = Rejections()
    bad = reply(19, "plant-9", 1000.0, 10, 0.5)
    damage(bad)
    arrays, _ = _validated(rejections=rejections).aggregate_train(2, [*_honest(reply), bad])
    assert np.allclose(arrays.to_numpy_ndarrays()[0], 1.1)  # the honest plants' mean: plant-9 left no trace
    assert rejections == [(2, "plant-9", reason)]


def test_an_update_over_the_absolute_norm_bound_is_rejected(reply):
    rejections = Rejections()
    big = reply(19, "plant-9", 10.0, 10, 0.5)  # ||(10, 10, 10) - 0|| = 17.32
    arrays, _ = _validated(rejections=rejections, max_update_norm=5.0, norm_factor=0).aggregate_train(1, [*_honest(reply), big])
    assert np.allclose(arrays.to_numpy_ndarrays()[0], 1.1)
    assert rejections == [(1, "plant-9", "update norm 17.32 exceeds max-update-norm 5")]


def test_an_update_far_above_the_rounds_median_is_rejected(reply):
    rejections = Rejections()
    big = reply(19, "plant-9", 100.0, 10, 0.5)
    strategy = _validated(rejections=rejections)
    arrays, _ = strategy.aggregate_train(1, [*_honest(reply), big])
    assert np.allclose(arrays.to_numpy_ndarrays()[0], 1.1)
    # norms: 1.732, 1.905, 2.078 (honest) and 173.2: median 1.992
    assert rejections == [(1, "plant-9", "update norm 173.2 exceeds 10 x the round's median 1.992")]
    assert strategy.update_norms == pytest.approx({"plant-1": 3**0.5, "plant-2": 1.1 * 3**0.5, "plant-3": 1.2 * 3**0.5, "plant-9": 100 * 3**0.5})


def test_the_relative_bound_can_be_turned_off(reply):
    arrays, _ = _validated(norm_factor=0).aggregate_train(1, [*_honest(reply), reply(19, "plant-9", 100.0, 10, 0.5)])
    assert np.allclose(arrays.to_numpy_ndarrays()[0], (1.0 + 1.1 + 1.2 + 100.0) / 4)


def test_with_two_plants_a_scaled_update_is_rejected_in_the_first_round(reply):
    rejections = Rejections()
    pair = [reply(11, "plant-1", 1.0, 10, 0.5), reply(12, "plant-2", 100.0, 10, 0.5)]
    with pytest.raises(RunAborted, match="1 plant.s. sent a valid update, 2 needed"):
        _validated(rejections=rejections).aggregate_train(1, pair)
    assert rejections == [(1, "plant-2", "update norm 173.2 exceeds 10 x the round's smaller update norm 1.732")]


def test_with_two_plants_later_rounds_are_bounded_by_the_earlier_rounds_medians(reply):
    rejections = Rejections()
    strategy = _validated(min_plants=1, rejections=rejections)
    strategy.aggregate_train(1, [reply(11, "plant-1", 1.0, 10, 0.5), reply(12, "plant-2", 1.2, 10, 0.5)])
    assert strategy.norm_history == pytest.approx([3**0.5])
    list(strategy.configure_train(2, ArrayRecord([GLOBAL.copy()]), ConfigRecord(), FakeGrid()))
    arrays, _ = strategy.aggregate_train(2, [reply(11, "plant-1", 1.1, 10, 0.5), reply(12, "plant-2", 50.0, 10, 0.5)])
    assert np.allclose(arrays.to_numpy_ndarrays()[0], 1.1)
    assert [(r, p) for r, p, _ in rejections] == [(2, "plant-2")]
    assert "exceeds 10 x the median of this round's norms and the last 1 round(s)' medians" in rejections[0][2]


def test_a_plant_just_under_the_bound_round_after_round_is_rejected(reply):
    rejections = Rejections()
    strategy = _validated(min_plants=1, rejections=rejections)  # defaults: 5 x the median in 3 consecutive rounds
    for server_round in (1, 2, 3):
        list(strategy.configure_train(server_round, ArrayRecord([GLOBAL.copy()]), ConfigRecord(), FakeGrid()))
        arrays, _ = strategy.aggregate_train(server_round, [reply(11, "plant-1", 1.0, 10, 0.5), reply(12, "plant-2", 9.0, 10, 0.5)])
    assert [(r, p) for r, p, _ in rejections] == [(3, "plant-2")]  # 9 x the median: under 10 x, but three rounds running
    assert "above 5 x in 3 consecutive rounds" in rejections[0][2]
    assert np.allclose(arrays.to_numpy_ndarrays()[0], 1.0)


def test_an_honest_plant_that_dips_below_the_persistent_bound_starts_its_count_again(reply):
    rejections = Rejections()
    strategy = _validated(min_plants=1, rejections=rejections)
    for server_round, big in enumerate((6.0, 6.0, 2.0, 6.0, 6.0), start=1):
        list(strategy.configure_train(server_round, ArrayRecord([GLOBAL.copy()]), ConfigRecord(), FakeGrid()))
        strategy.aggregate_train(server_round, [reply(11, "plant-1", 1.0, 10, 0.5), reply(12, "plant-2", big, 10, 0.5)])
    assert rejections == []


def test_an_inflated_example_count_is_capped_at_the_agreed_training_records(reply):
    capped: list[tuple[int, str, float, int]] = []
    strategy = ValidatedStrategy(FedAvg(min_available_nodes=1, min_train_nodes=1), UpdateRules(), 2,
                                 agreed_examples={"plant-1": 10, "plant-2": 30}, on_cap=lambda *a: capped.append(a))
    list(strategy.configure_train(1, ArrayRecord([GLOBAL.copy()]), ConfigRecord(), FakeGrid()))
    liar = reply(12, "plant-2", 3.0, 10, 0.5)
    liar.content["metrics"]["num-examples"] = 1e308  # would overflow FedAvg's weighted sum (1e308 x 3.0 = inf)
    arrays, _ = strategy.aggregate_train(1, [reply(11, "plant-1", 1.0, 10, 0.5), liar])
    assert np.allclose(arrays.to_numpy_ndarrays()[0], (1.0 * 10 + 3.0 * 30) / 40)
    assert capped == [(1, "plant-2", 1e308, 30)]
    assert liar.content["metrics"]["num-examples"] == 30


def test_a_plant_outside_the_data_agreement_is_rejected(reply):
    rejections = Rejections()
    strategy = ValidatedStrategy(FedAvg(min_available_nodes=1, min_train_nodes=1), UpdateRules(), 1, on_reject=rejections,
                                 agreed_examples={"plant-1": 10})
    list(strategy.configure_train(1, ArrayRecord([GLOBAL.copy()]), ConfigRecord(), FakeGrid()))
    strategy.aggregate_train(1, [reply(11, "plant-1", 1.0, 10, 0.5), reply(12, "plant-2", 1.1, 10, 0.5)])
    assert rejections == [(1, "plant-2", "this plant took no part in the run's data agreement")]


def test_too_few_valid_updates_stop_the_run_naming_every_rejected_plant(reply):
    rejections = Rejections()
    nan = reply(12, "plant-2", float("nan"), 10, 0.5)
    wide = reply(13, "plant-3", np.ones(5, np.float32), 10, 0.5)
    with pytest.raises(RunAborted) as exc:
        _validated(min_plants=2, rejections=rejections).aggregate_train(4, [reply(11, "plant-1", 1.0, 10, 0.5), nan, wide])
    message = str(exc.value)
    assert message.startswith("round 4: 1 plant(s) sent a valid update, 2 needed")
    assert "plant-2: array '0' has 3 non-finite values" in message and "plant-3: array '0' has shape (5,), expected (3,)" in message
    assert "\n" not in message
    assert [plant for _, plant, _ in rejections] == ["plant-2", "plant-3"]


@pytest.mark.parametrize("name", ["fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum"])
@pytest.mark.parametrize("attack", ["nan", "scaled"])
def test_validation_works_in_front_of_robust_strategies(reply, name, attack):
    rejections = Rejections()
    inner = build_strategy(RunConfig(strategy=name, min_plants=4))
    strategy = ValidatedStrategy(inner, UpdateRules(), min_plants=4, on_reject=rejections)
    list(strategy.configure_train(1, ArrayRecord([GLOBAL.copy()]), ConfigRecord(), FakeGrid()))
    honest = [reply(11 + i, f"plant-{i + 1}", np.full(3, 1.0 + 0.01 * i, dtype=np.float32), 10, 0.5) for i in range(4)]
    hostile = reply(15, "plant-5", float("nan") if attack == "nan" else 1e4, 10, 0.5)
    arrays, _ = strategy.aggregate_train(1, [*honest, hostile])
    assert np.all(np.abs(arrays.to_numpy_ndarrays()[0] - 1.015) < 0.02)
    assert [plant for _, plant, _ in rejections] == ["plant-5"]


def test_a_non_finite_aggregate_stops_the_run_before_it_becomes_the_model(reply):
    class Broken(FedAvg):
        def aggregate_train(self, server_round, replies):
            return ArrayRecord([np.array([np.nan, 0.0, 0.0], np.float32)]), None

    with pytest.raises(RunAborted, match=r"round 3: the aggregate of 3 valid update\(s\) is unusable \(array '0' has 1 non-finite value\)"):
        _validated(Broken()).aggregate_train(3, _honest(reply))


def test_a_server_optimisers_float64_aggregate_goes_out_as_the_models_float32(reply):
    strategy = _validated(build_strategy(RunConfig(strategy="fedadam", min_plants=2)))
    for server_round in (1, 2):
        arrays, _ = strategy.aggregate_train(server_round, _honest(reply))
        assert arrays["0"].dtype == "float32" and np.all(np.isfinite(arrays.to_numpy_ndarrays()[0]))
        # the next round is validated against what was sent, so float32 replies still pass
        list(strategy.configure_train(server_round + 1, arrays, ConfigRecord(), FakeGrid()))


def test_rejections_are_logged_by_default(reply, caplog):
    strategy = ValidatedStrategy(FedAvg(min_available_nodes=1, min_train_nodes=1), UpdateRules(), min_plants=1)
    list(strategy.configure_train(1, ArrayRecord([GLOBAL.copy()]), ConfigRecord(), FakeGrid()))
    logger = logging.getLogger("maxfl")
    logger.addHandler(caplog.handler)
    try:
        strategy.aggregate_train(2, [*_honest(reply), reply(19, "plant-9", float("inf"), 10, 0.5)])
    finally:
        logger.removeHandler(caplog.handler)
    assert "round 2: plant-9's update rejected: array '0' has 3 non-finite values" in caplog.text


def test_rules_come_from_the_run_config():
    cfg = RunConfig.from_flower({"max-update-norm": 50.0, "update-norm-factor": 5.0})
    assert UpdateRules.from_config(cfg) == UpdateRules(max_update_norm=50.0, norm_factor=5.0)
    assert UpdateRules.from_config(RunConfig()) == UpdateRules(max_update_norm=0.0, norm_factor=10.0, persistent_factor=5.0, persistent_rounds=3)


def test_check_update_reports_the_norm_of_a_good_update(reply):
    problem, norm = check_update(reply(11, "plant-1", 2.0, 10, 0.5).content, {"0": GLOBAL})
    assert problem is None and norm == pytest.approx(np.sqrt(12))
