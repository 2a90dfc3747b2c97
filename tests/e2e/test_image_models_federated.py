"""Each image model other than the default trains for two rounds under DP-SGD on Flower's simulation engine."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from tests.e2e.test_tasks_federated import ROUNDS, _federation

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("model", ["effnet-lite0-mlp", "scatnet", "cnn"])  # effnet-lite0, the default: test_local_federation.py
def test_two_round_simulation_per_image_model(tmp_path, model):
    result = _federation(tmp_path, "defect", **{"model": model, "release": False}).run()
    assert result.status == "finished:completed"
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(result.mlflow_run_id)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_macro_f1")] == list(range(1, ROUNDS + 1))
    spec = json.loads(next((tmp_path / "work" / "mlflow" / "artifacts").rglob("task-spec.json")).read_text())
    assert spec["model"] == model
    assert {f"plant-{k}/dp_epsilon" for k in (1, 2)} <= set(run.data.metrics)  # trained under DP-SGD at both plants
