"""The local federation as a user runs it: real MLflow, SuperLink and SuperNodes on loopback."""

from __future__ import annotations

import os

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from maxfl.errors import ProcessError
from launcher.federation import FederationSettings, LocalFederation, find_app_dir
from launcher.processes import descendants, pid_alive
from privacy.ledger import Ledger

pytestmark = pytest.mark.e2e

ROUNDS = 2


def _federation(tmp_path, mode: str = "deployment", release: bool = True, **options) -> LocalFederation:
    """`release=False` for tests about something else: training then skips the gate, registry and push."""
    settings = FederationSettings(
        app_dir=find_app_dir(), workdir=tmp_path / "work", mode=mode, plants=options.pop("plants", 2), examples_per_plant=80,
        run_overrides={"num-server-rounds": ROUNDS, "release": release}, **options,
    )
    return LocalFederation(settings, echo=print)


def _federate(tmp_path, mode: str, release: bool = True) -> tuple:
    federation = _federation(tmp_path, mode, release)
    return federation, federation.run()


def _assert_tracked(tmp_path, result) -> None:
    # The federation's MLflow server is stopped: read the same store directly.
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["num-server-rounds"] == str(ROUNDS) and run.data.params["task"] == "defect"
    assert run.data.tags["maxfl.plants"] == "plant-1,plant-2"
    assert run.data.tags["flwr.run_id"] == str(result.flwr_run_id) and run.data.tags["flwr.version"]
    for key in ("eval_loss", "eval_accuracy", "eval_macro_f1", "round_overhead_s", "dp_epsilon_max"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, ROUNDS + 1)), key
    # DP-SGD by default: the plants keep their training loss; MLflow gets their epsilon every round
    assert "train_loss" not in run.data.metrics and "dp_epsilon" not in run.data.metrics
    for plant in ("plant-1", "plant-2"):
        for key in ("num-examples", "eval_accuracy", "dp_epsilon", "dp_noise_multiplier"):
            history = client.get_metric_history(run.info.run_id, f"{plant}/{key}")
            assert sorted({m.step for m in history}) == list(range(1, ROUNDS + 1)), (plant, key)
        epsilons = [m.value for m in sorted(client.get_metric_history(run.info.run_id, f"{plant}/dp_epsilon"), key=lambda m: m.step)]
        assert epsilons == sorted(epsilons) and 0 < epsilons[-1] <= 3.0  # the run's default target
        # what MLflow shows is what the plant's own ledger says
        ledger = Ledger(tmp_path / "work" / "plants" / "ledgers" / f"{plant}.json", plant).read()
        (data_set,) = ledger.data_sets.values()
        assert data_set.runs() == [result.flwr_run_id] and data_set.spent(1e-5) == pytest.approx(epsilons[-1])
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert len(models) == 1 and models[0].name == "model"
    # The logged model loads without maxfl's code and takes any batch size.
    import mlflow.pytorch
    import torch

    (mlmodel,) = [p.parent for p in (tmp_path / "work" / "mlflow" / "artifacts").rglob("MLmodel") if models[0].model_id in str(p)]
    exported = mlflow.pytorch.load_model(str(mlmodel))  # the whole pipeline: frozen extractor + head, on raw 160 px cells
    assert exported(torch.zeros(3, 1, 160, 160)).shape == (3, 2)
    assert "torch<2.14,>=2.13" in (mlmodel / "requirements.txt").read_text().splitlines()


def _processes_using(workdir: Path) -> list[int]:
    """Live processes whose command line or environment mention `workdir` (orphans included)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            text = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if str(workdir).encode() in text and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _assert_nothing_left(federation: LocalFederation) -> None:
    assert federation.procs.alive() == []
    assert descendants(os.getpid()) == []
    assert _processes_using(federation.work) == []


def test_deployment_two_plants_two_rounds_tracked_in_mlflow(tmp_path):
    federation, result = _federate(tmp_path, "deployment")
    assert result.status == "finished:completed"
    # the whole chain by default: the gate's verdict and what each plant's edge server serves are reported
    assert result.release[0].startswith("gate ") and sum("edge server" in line for line in result.release) == 2
    _assert_tracked(tmp_path, result)
    _assert_nothing_left(federation)


def test_simulation_engine_runs_the_same_app(tmp_path):
    federation, result = _federate(tmp_path, "simulation", release=False)  # release in simulation: test_tasks_federated.py
    assert result.status == "finished:completed"
    _assert_tracked(tmp_path, result)
    _assert_nothing_left(federation)


def test_a_plant_with_corrupt_data_declines_and_the_run_stops_naming_it(tmp_path):
    federation = _federation(tmp_path, release=False)
    plants = federation.prepare_data("defect", seed=42)
    (plants[1].data_dir / "defect.npz").write_bytes(b"not an archive")
    with pytest.raises(ProcessError) as exc:
        federation.run()
    message = str(exc.value)
    assert "finished:failed" in message and "plant-2 declined" in message and "not an .npz archive" in message
    assert "\n" not in message
    _assert_nothing_left(federation)


def test_a_plant_at_its_ceiling_declines_and_the_others_carry_on(tmp_path):
    federation = _federation(tmp_path, release=False, plants=3, ceilings={"plant-3": 0.5})
    result = federation.run()
    assert result.status == "finished:completed"
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(result.mlflow_run_id)
    assert {"plant-1/dp_epsilon", "plant-2/dp_epsilon"} <= set(run.data.metrics) and "plant-3/dp_epsilon" not in run.data.metrics
    assert "plant-3/eval_accuracy" in run.data.metrics  # evaluating the shared model spends no training budget
    assert Ledger(tmp_path / "work" / "plants" / "ledgers" / "plant-3.json", "plant-3").read().data_sets == {}
    assert any("plant-3: no DP training recorded" in line for line in result.privacy)
    _assert_nothing_left(federation)


def test_ctrl_c_stops_every_process_the_command_started(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    workdir = tmp_path / "work"
    proc = subprocess.Popen(
        [sys.executable, "-m", "maxfl", "federate", "--plants", "2", "--rounds", "50", "--examples-per-plant", "40",
         "--workdir", str(workdir), "--set", "release=false"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "started" in line and "Flower run" in line:
                break
        assert _processes_using(workdir.resolve()), "the federation should be running before the interrupt"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "interrupted" in stderr and "Traceback" not in stderr
    deadline = time.monotonic() + 120  # orphans may take a moment to notice their parent is gone; no speed is asserted
    while _processes_using(workdir.resolve()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_using(workdir.resolve()) == []


def test_keep_mlflow_serves_the_finished_run_until_ctrl_c(tmp_path):
    import re
    import signal
    import subprocess
    import sys

    import httpx

    workdir = tmp_path / "work"
    proc = subprocess.Popen(
        [sys.executable, "-m", "maxfl", "federate", "--plants", "2", "--rounds", "1", "--examples-per-plant", "40",
         "--workdir", str(workdir), "--keep-mlflow", "--set", "release=false"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:
            if "stays up" in line:
                url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
                break
        assert url is not None, "the run should finish and leave MLflow up"
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "finished:completed" in out and "MLflow run id:" in out
    assert _processes_using(workdir.resolve()) == []
