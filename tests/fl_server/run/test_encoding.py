"""The anchor decodes fp16-delta updates against the round's global model before validation and aggregation."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from fl_server.run.encoding import DecodedUpdates
from fl_server.run.strategy import TrackedStrategy
from fl_server.run.validation import UpdateRules, ValidatedStrategy
from maxfl.encoding import encode_reply

GLOBAL = np.linspace(-1.0, 1.0, 1000, dtype=np.float32)


class FakeGrid:
    def get_node_ids(self):
        return [11, 12]


def test_fp16_and_fp32_updates_aggregate_to_the_same_model_and_the_bytes_are_logged(reply, tracker) -> None:
    inner = ValidatedStrategy(FedAvg(min_available_nodes=1, min_train_nodes=1), UpdateRules(), min_plants=2)
    strategy = TrackedStrategy(DecodedUpdates(inner), tracker, min_plants=2, num_rounds=1)
    sent = ArrayRecord([GLOBAL.copy()])
    list(strategy.configure_train(1, sent, ConfigRecord(), FakeGrid()))
    fp32 = reply(11, "plant-1", GLOBAL + 0.25, 10, 0.5)
    fp16 = encode_reply(reply(12, "plant-2", GLOBAL - 0.125, 10, 0.5), sent, "fp16")
    assert fp16.content["arrays"]["0"].dtype == "float16"
    arrays, _ = strategy.aggregate_train(1, [fp32, fp16])
    assert arrays is not None and arrays["0"].dtype == "float32"
    assert np.allclose(arrays["0"].numpy(), GLOBAL + (0.25 - 0.125) / 2, atol=1e-3)
    assert inner.update_norms == pytest.approx({"plant-1": np.linalg.norm(np.full(1000, 0.25)), "plant-2": np.linalg.norm(np.full(1000, 0.125))}, rel=1e-3)
    strategy._finish_round(1)  # noqa: SLF001
    logged = {k: v for (k, step), v in tracker.metrics.items() if k.endswith("bytes")}
    assert logged["plant-2/update_bytes"] < 0.55 * logged["plant-1/update_bytes"] and logged["model_bytes"] == logged["plant-1/update_bytes"]
