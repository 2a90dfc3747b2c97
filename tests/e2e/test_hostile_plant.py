"""A broken plant in a real federation: its NaN updates are rejected every round and the run carries on."""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from launcher.federation import FederationSettings, LocalFederation, find_app_dir

from .test_local_federation import _assert_nothing_left

pytestmark = pytest.mark.e2e

ROUNDS = 2


def test_a_plant_sending_nan_updates_is_rejected_every_round_and_the_others_train_on(tmp_path):
    lines: list[str] = []
    settings = FederationSettings(
        app_dir=find_app_dir(), workdir=tmp_path / "work", plants=3, examples_per_plant=80, fault_drills={"plant-3": "nan"},
        run_overrides={"num-server-rounds": ROUNDS, "release": False, "min-plants": 2},
    )
    federation = LocalFederation(settings, echo=lines.append)
    result = federation.run()
    assert result.status == "finished:completed"
    rejections = [line for line in lines if "plant-3's update rejected" in line]
    assert [f"round {r}:" in line for r, line in zip(range(1, ROUNDS + 1), rejections, strict=True)] == [True] * ROUNDS, lines
    assert all("non-finite values" in line for line in rejections)
    assert not any("plant-1's update rejected" in line or "plant-2's update rejected" in line for line in lines)
    # The global model stayed finite: every round's federated evaluation scored it (non-finite metrics are not logged).
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow' / 'mlflow.db'}")
    for key in ("eval_loss", "plant-1/eval_accuracy", "plant-3/eval_accuracy"):
        history = client.get_metric_history(result.mlflow_run_id, key)
        assert sorted(m.step for m in history) == list(range(1, ROUNDS + 1)), key
        assert all(math.isfinite(m.value) for m in history)
    _assert_nothing_left(federation)
