"""Strategy choice: every name in the run config builds a Flower strategy, and the robust ones hold against a hostile plant."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import Bulyan, FedAdam, FedAvgM, FedTrimmedAvg, Krum, MultiKrum

from fl_server.run.config import RunConfig
from fl_server.run.strategy import build_strategy
from maxfl.errors import ConfigError

NAMES = get_args(RunConfig.model_fields["strategy"].annotation)
DIM = 200


class FakeGrid:
    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(11, 11 + nodes))

    def get_node_ids(self):
        return self.nodes


def test_the_run_config_offers_flowers_robust_and_adaptive_strategies():
    assert set(NAMES) == {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedtrimmedavg", "fedmedian", "krum", "multikrum", "bulyan"}


@pytest.mark.parametrize("name", NAMES)
def test_every_strategy_builds_and_aggregates_clean_updates(reply, name):
    cfg = RunConfig(strategy=name, min_plants=7)  # Bulyan needs 4f + 3 plants
    strategy = build_strategy(cfg)
    assert strategy.min_train_nodes == 7 and strategy.weighted_by_key == "num-examples"
    sent = ArrayRecord([np.zeros(DIM, np.float32)])
    assert len(list(strategy.configure_train(1, sent, ConfigRecord(), FakeGrid(7)))) == 7
    rng = np.random.default_rng(0)
    replies = [reply(11 + i, f"plant-{i + 1}", (1.0 + 0.1 * rng.standard_normal(DIM)).astype(np.float32), 10, 0.5) for i in range(7)]
    arrays, _ = strategy.aggregate_train(1, replies)
    (agg,) = arrays.to_numpy_ndarrays()
    assert agg.shape == (DIM,) and np.all(np.isfinite(agg)) and np.mean(agg) > 0  # every one moves toward the plants


def test_run_config_options_reach_the_strategy():
    cfg = dict(min_plants=5, server_momentum=0.5, server_learning_rate=0.3, trim_fraction=0.4, num_malicious=2)
    fedavgm = build_strategy(RunConfig(strategy="fedavgm", **cfg))
    assert isinstance(fedavgm, FedAvgM) and (fedavgm.server_learning_rate, fedavgm.server_momentum) == (0.3, 0.5)
    fedadam = build_strategy(RunConfig(strategy="fedadam", **cfg))
    assert isinstance(fedadam, FedAdam) and (fedadam.eta, fedadam.beta_1) == (0.3, 0.5)
    trimmed = build_strategy(RunConfig(strategy="fedtrimmedavg", **cfg))
    assert isinstance(trimmed, FedTrimmedAvg) and trimmed.beta == 0.4
    krum = build_strategy(RunConfig(strategy="krum", **cfg))
    assert isinstance(krum, Krum) and (krum.num_malicious_nodes, krum.num_nodes_to_select) == (2, 1)
    multikrum = build_strategy(RunConfig(strategy="multikrum", **cfg))
    assert isinstance(multikrum, MultiKrum) and (multikrum.num_malicious_nodes, multikrum.num_nodes_to_select) == (2, 3)
    bulyan = build_strategy(RunConfig(strategy="bulyan", min_plants=11, num_malicious=2))
    assert isinstance(bulyan, Bulyan) and bulyan.num_malicious_nodes == 2


def test_a_server_learning_rate_of_zero_keeps_each_optimisers_own_default():
    assert build_strategy(RunConfig(strategy="fedavgm")).server_learning_rate == 1.0
    assert build_strategy(RunConfig(strategy="fedadam")).eta == 0.1
    assert build_strategy(RunConfig(strategy="fedyogi")).eta == 0.01
    assert build_strategy(RunConfig(strategy="fedadagrad")).eta == 0.1


def _round(reply, name: str, attack: str) -> tuple[np.ndarray, np.ndarray]:
    """Five plants, plant-5 hostile; returns (the strategy's aggregate, the honest plants' mean)."""
    rng = np.random.default_rng(7)
    honest = [(1.0 + 0.1 * rng.standard_normal(DIM)).astype(np.float32) for _ in range(4)]
    update = (1.0 + 0.1 * rng.standard_normal(DIM)).astype(np.float32)  # what plant-5 really trained
    hostile = 50 * update if attack == "scaled x50" else -10 * update  # the global model is 0: weights = update
    strategy = build_strategy(RunConfig(strategy=name, min_plants=5, num_malicious=1))
    list(strategy.configure_train(1, ArrayRecord([np.zeros(DIM, np.float32)]), ConfigRecord(), FakeGrid(5)))
    replies = [reply(11 + i, f"plant-{i + 1}", w, 10, 0.5) for i, w in enumerate([*honest, hostile])]
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays.to_numpy_ndarrays()[0], np.mean(honest, axis=0)


@pytest.mark.parametrize("attack", ["scaled x50", "sign-flipped x10"])
def test_one_hostile_plant_of_five_drags_fedavg_far_from_the_honest_mean(reply, attack):
    aggregate, honest = _round(reply, "fedavg", attack)
    # scaled: (4 x 1 + 50) / 5 = 10.8 per coordinate; flipped: (4 - 10) / 5 = -1.2. The honest mean is 1.
    assert np.linalg.norm(aggregate - honest) / np.linalg.norm(honest) > 1.0  # measured: 10.0 and 2.24


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum"])
@pytest.mark.parametrize("attack", ["scaled x50", "sign-flipped x10"])
def test_robust_strategies_stay_close_to_the_honest_mean(reply, name, attack):
    aggregate, honest = _round(reply, name, attack)
    # an honest plant's own spread is ~0.1 relative; measured: 0.04 (median, trimmed), 0.08 (Krum), 0 (MultiKrum)
    assert np.linalg.norm(aggregate - honest) / np.linalg.norm(honest) < 0.15


@pytest.mark.parametrize(("values", "field"), [
    ({"strategy": "bulyan", "min-plants": 5}, "bulyan needs min-plants >= 4 x num-malicious + 3 = 7"),
    ({"strategy": "multikrum", "min-plants": 2, "num-malicious": 2}, "min-plants must exceed num-malicious"),
    ({"strategy": "fedmedian", "central-dp": "server-clipping"}, "central-dp calibrates its noise for a plain average"),
    ({"update-norm-factor": 0.5}, "update-norm-factor must be 0 (off) or above 1"),
    ({"trim-fraction": 0.5}, "'trim-fraction'"),
    ({"server-momentum": 1.0}, "'server-momentum'"),
    ({"num-malicious": -1}, "'num-malicious'"),
    ({"max-update-norm": -1.0}, "'max-update-norm'"),
])
def test_combinations_flower_would_refuse_mid_run_are_one_line_config_errors(values, field):
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_flower(values)
    assert field in str(exc.value) and "\n" not in str(exc.value)


def test_bulyan_with_enough_plants_is_accepted():
    assert RunConfig.from_flower({"strategy": "bulyan", "min-plants": 7}).num_malicious == 1
    assert RunConfig.from_flower({"strategy": "bulyan", "min-plants": 3, "num-malicious": 0}).strategy == "bulyan"
