"""Each image model other than the default trains for two rounds under DP-SGD on Flower's simulation engine."""

from __future__ import annotations

import json

import mlflow.pytorch
import pytest
import torch
from mlflow.tracking import MlflowClient

from tasks.defect.data import IMAGE_SIZE
from tasks.features import get_backbone

from tests.e2e.test_tasks_federated import ROUNDS, _federation

pytestmark = pytest.mark.e2e


def _input(model: str) -> torch.Tensor:
    """A batch of 3 for the logged model: cells for a pipeline or the CNN, the backbone's features for a head."""
    backbone = get_backbone(model)
    if backbone is not None and not backbone.exportable:
        return torch.zeros(3, backbone.dim)
    size = IMAGE_SIZE if backbone is None else backbone.input_size
    return torch.zeros(3, 1, size, size)


@pytest.mark.parametrize("model", ["effnet-lite0-mlp", "scatnet", "cnn"])  # effnet-lite0, the default: test_local_federation.py
def test_two_round_simulation_per_image_model(tmp_path, model):
    result = _federation(tmp_path, "defect", **{"model": model, "release": False}).run()
    assert result.status == "finished:completed"
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(result.mlflow_run_id)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_macro_f1")] == list(range(1, ROUNDS + 1))
    spec = json.loads(next((tmp_path / "work" / "mlflow" / "artifacts").rglob("task-spec.json")).read_text())
    assert spec["model"] == model
    # scatnet's graph is never exported (not releasable; torch.export takes minutes): its trained head is logged
    takes = run.data.tags["maxfl.model.input"]
    assert takes.startswith("scatnet-64") if model == "scatnet" else takes.startswith("the task's input")
    mlflow_model = next((tmp_path / "work" / "mlflow" / "artifacts").rglob("MLmodel"))
    assert mlflow.pytorch.load_model(str(mlflow_model.parent))(_input(model)).shape == (3, 2)
    assert {f"plant-{k}/dp_epsilon" for k in (1, 2)} <= set(run.data.metrics)  # trained under DP-SGD at both plants
