"""The local federation as a user runs it: real MLflow, SuperLink and SuperNodes on loopback."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from maxfl.local.federation import FederationSettings, LocalFederation, find_app_dir
from maxfl.local.processes import descendants

pytestmark = pytest.mark.e2e

ROUNDS = 2


def _federate(tmp_path, mode: str) -> tuple:
    settings = FederationSettings(
        app_dir=find_app_dir(), workdir=tmp_path / "work", mode=mode, plants=2, images_per_plant=80,
        run_overrides={"num-server-rounds": ROUNDS},
    )
    federation = LocalFederation(settings, echo=print)
    result = federation.run()
    return federation, result


def _assert_tracked(tmp_path, result) -> None:
    # The federation's MLflow server is stopped: read the same store directly.
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["num-server-rounds"] == str(ROUNDS) and run.data.params["task"] == "defect"
    assert run.data.tags["maxfl.plants"] == "plant-1,plant-2"
    assert run.data.tags["flwr.run_id"] == str(result.flwr_run_id) and run.data.tags["flwr.version"]
    for key in ("train_loss", "eval_loss", "eval_accuracy", "eval_macro_f1"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, ROUNDS + 1)), key
    for plant in ("plant-1", "plant-2"):
        for key in ("num-examples", "train_loss", "eval_accuracy"):
            history = client.get_metric_history(run.info.run_id, f"{plant}/{key}")
            assert sorted({m.step for m in history}) == list(range(1, ROUNDS + 1)), (plant, key)
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert len(models) == 1 and models[0].name == "model"


def _assert_nothing_left(federation: LocalFederation) -> None:
    assert federation.procs.alive() == []
    import os

    assert descendants(os.getpid()) == []


def test_deployment_two_plants_two_rounds_tracked_in_mlflow(tmp_path):
    federation, result = _federate(tmp_path, "deployment")
    assert result.status == "finished:completed"
    _assert_tracked(tmp_path, result)
    _assert_nothing_left(federation)


def test_simulation_engine_runs_the_same_app(tmp_path):
    federation, result = _federate(tmp_path, "simulation")
    assert result.status == "finished:completed"
    _assert_tracked(tmp_path, result)
    _assert_nothing_left(federation)
