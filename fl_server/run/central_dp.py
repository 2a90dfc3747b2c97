"""Optional server-side privacy from Flower, composed around the strategy: central DP at the plant level.

Each plant's whole round update is clipped, either by the anchor when it arrives ("server-clipping") or by
the plant before it leaves ("plant-clipping": Flower's `fixedclipping_mod`, applied by
`fl_client.mods.central_clipping_mod`), and Gaussian noise is added to the average. The unit it protects is
one plant's participation, not one record (that is DP-SGD's job at the plant, and both can run together).

Flower's wrappers calibrate the noise for a uniform average over a fixed number of plants. This wrapper
makes that true: plants are averaged with equal weights (example counts would let a plant scale its clipped
update) and the noise is set for the plants that actually replied. Epsilon over the rounds so far is computed
with the same RDP accountant the plants use (sample rate 1: no amplification is claimed).

Not composable here: SecAgg+. Flower 1.41 has it only in the legacy workflow API (`SecAggPlusWorkflow` +
`secaggplus_mod`), which drives legacy strategies and `fitins`/`fitres` messages, not Message-API strategies.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fl_server.run.config import RunConfig
from maxfl.messages import METRICS, WEIGHT_KEY

EPSILON_KEY = "central_dp_epsilon"


class CentralDP(Strategy):
    def __init__(self, inner: Strategy, cfg: RunConfig, num_plants: int) -> None:
        wrapper = DifferentialPrivacyServerSideFixedClipping if cfg.central_dp == "server-clipping" else DifferentialPrivacyClientSideFixedClipping
        self.dp = wrapper(inner, cfg.central_dp_noise_multiplier, cfg.central_dp_clipping_norm, num_plants)
        self.noise_multiplier = cfg.central_dp_noise_multiplier
        self.delta = cfg.central_dp_delta
        self.releases = 0

    def summary(self) -> None:
        self.dp.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.dp.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        from privacy.accountant import Mechanism, epsilon  # here: Opacus is a 3 s import the anchor needs only for central DP

        replies = list(replies)
        for msg in replies:
            msg.content[METRICS][WEIGHT_KEY] = 1
        self.dp.num_sampled_clients = max(1, len(replies))  # noise for the average actually taken
        arrays, metrics = self.dp.aggregate_train(server_round, replies)
        if arrays is not None:
            self.releases += 1
            spent = epsilon([Mechanism(noise_multiplier=self.noise_multiplier, sample_rate=1.0, steps=self.releases)], self.delta)
            metrics = MetricRecord({**(metrics or {}), EPSILON_KEY: spent})
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.dp.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.dp.aggregate_evaluate(server_round, replies)


def with_central_dp(strategy: Strategy, cfg: RunConfig, num_plants: int) -> Strategy:
    return strategy if cfg.central_dp == "off" else CentralDP(strategy, cfg, num_plants)
