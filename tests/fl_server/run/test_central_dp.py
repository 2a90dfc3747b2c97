import numpy as np
import pytest
from flwr.app import ArrayRecord

from fl_server.run.central_dp import EPSILON_KEY, CentralDP, with_central_dp
from fl_server.run.config import RunConfig
from fl_server.run.strategy import build_strategy
from privacy.accountant import Mechanism, epsilon


def _central(mode: str, noise: float = 1e-6, clip: float = 0.5) -> CentralDP:
    cfg = RunConfig(central_dp=mode, central_dp_noise_multiplier=noise, central_dp_clipping_norm=clip)
    strategy = with_central_dp(build_strategy(cfg), cfg, num_plants=3)
    assert isinstance(strategy, CentralDP)
    return strategy


def test_off_by_default():
    cfg = RunConfig()
    assert with_central_dp(build_strategy(cfg), cfg, 3).__class__.__name__ == "FedAvg"


def test_server_clipping_bounds_each_plant_and_averages_them_uniformly(reply):
    central = _central("server-clipping")
    central.dp.current_arrays = ArrayRecord([np.zeros(3, dtype=np.float32)])  # what the anchor sent this round
    big, small = reply(11, "plant-1", 10.0, 1000, 0.5), reply(12, "plant-2", 0.1, 10, 0.5)
    arrays, metrics = central.aggregate_train(1, [big, small])
    update = arrays.to_numpy_ndarrays()[0]
    clipped_big = np.full(3, 0.5 / np.sqrt(3))  # norm 0.5, same direction
    assert np.allclose(update, (clipped_big + np.full(3, 0.1)) / 2, atol=1e-4)  # equal weights despite 1000 vs 10 examples
    assert metrics[EPSILON_KEY] == pytest.approx(epsilon([Mechanism(noise_multiplier=1e-6, sample_rate=1.0, steps=1)], 1e-5))


def test_noise_is_set_for_the_plants_that_replied_and_epsilon_composes_over_rounds(reply):
    central = _central("server-clipping", noise=1.0)
    for server_round in (1, 2):
        central.dp.current_arrays = ArrayRecord([np.zeros(3, dtype=np.float32)])
        _, metrics = central.aggregate_train(server_round, [reply(11, "plant-1", 1.0, 10, 0.5), reply(12, "plant-2", 1.0, 10, 0.5)])
        assert central.dp.num_sampled_clients == 2  # three plants agreed, two replied: noise for an average of two
    assert metrics[EPSILON_KEY] == pytest.approx(epsilon([Mechanism(noise_multiplier=1.0, sample_rate=1.0, steps=2)], 1e-5))


def test_plant_clipping_sends_the_clipping_norm_with_the_training_plan():
    from flwr.app import ConfigRecord

    central = _central("plant-clipping", clip=0.25)

    class Grid:
        def get_node_ids(self):
            return [11, 12, 13]

    messages = list(central.configure_train(1, ArrayRecord([np.zeros(3, dtype=np.float32)]), ConfigRecord({"task": "defect"}), Grid()))
    assert messages and all(m.content["config"]["clipping_norm"] == 0.25 for m in messages)
