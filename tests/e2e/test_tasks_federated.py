"""Every registered task trains for two rounds on Flower's simulation engine; schemas are checked first."""

from __future__ import annotations

import json

import pytest

from edge.store import EdgeStore
from mlflow.tracking import MlflowClient

from maxfl.errors import ProcessError
from launcher.federation import FederationSettings, LocalFederation, find_app_dir
from tasks import task_names

pytestmark = pytest.mark.e2e

ROUNDS = 2


def _federation(tmp_path, task: str, mode: str = "simulation", **overrides) -> LocalFederation:
    settings = FederationSettings(
        app_dir=find_app_dir(), workdir=tmp_path / "work", mode=mode, plants=2, examples_per_plant=80,
        run_overrides={"num-server-rounds": ROUNDS, "task": task, **overrides},
    )
    return LocalFederation(settings, echo=print)


@pytest.mark.parametrize("task", [t for t in task_names() if t != "defect"])  # defect: test_local_federation.py
def test_two_round_simulation_per_task(tmp_path, task):
    # 2 rounds on 80 records are about the pipeline, not a model worth releasing: the trivial-baseline rule is off
    result = _federation(tmp_path, task, **{"gate-floor": -1e9 if task == "table" else 0.0, "gate-trivial-margin": -1.0}).run()
    assert result.status == "finished:completed"
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["task"] == task and run.data.tags["maxfl.plants"] == "plant-1,plant-2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == list(range(1, ROUNDS + 1))
    spec = json.loads(next((tmp_path / "work" / "mlflow" / "artifacts").rglob("task-spec.json")).read_text())
    assert spec["task"] == task
    assert {f"maxfl.data.plant-{k}" for k in (1, 2)} <= set(run.data.tags)
    # every task's model exports to ONNX, matches torch at each plant, and reaches the virtual plants' edge stores
    version = client.get_model_version_by_alias(f"maxfl-{task}", "champion")
    report = json.loads(version.tags["maxfl.metrics"])
    assert all(row["onnx_max_abs_diff"] < 1e-4 for row in report["plants"])
    for k in (1, 2):
        store = EdgeStore(tmp_path / "work" / "plants" / "edge" / f"plant-{k}")
        assert store.current(f"maxfl-{task}").manifest.sha256 == version.tags["maxfl.onnx.sha256"]


def test_plants_whose_schemas_disagree_are_named_before_anyone_trains(tmp_path):
    federation = _federation(tmp_path, "table", mode="deployment")
    plants = federation.prepare_data("table", seed=42)
    manifest = plants[1].data_dir / "manifest.toml"
    manifest.write_text(manifest.read_text().replace('temperature_c = "numeric"', 'temperature_c = "categorical"'))
    with pytest.raises(ProcessError) as exc:
        federation.run()
    message = str(exc.value)
    assert "disagree on the data schema" in message and "plant-2: column:temperature_c is 'categorical'" in message
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("maxfl").experiment_id])
    assert run.info.status == "FAILED" and "train_loss" not in run.data.metrics


def test_central_dp_with_plant_side_clipping_composes_with_dp_sgd(tmp_path):
    overrides = {"release": False, "central-dp": "plant-clipping", "central-dp-noise-multiplier": 0.5, "central-dp-clipping-norm": 2.0}
    result = _federation(tmp_path, "table", **overrides).run()
    assert result.status == "finished:completed"
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(result.mlflow_run_id)
    central = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "central_dp_epsilon"), key=lambda m: m.step)]
    assert len(central) == ROUNDS and central == sorted(central) and central[0] > 0
    assert run.data.params["central-dp"] == "plant-clipping"
    assert {f"plant-{k}/dp_epsilon" for k in (1, 2)} <= set(run.data.metrics)  # DP-SGD at the plants as well
