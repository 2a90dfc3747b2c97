"""Contribution per plant in a real training run: MLflow, SuperLink and plants on loopback, then the anchor's commands.

One federation for the whole file (table task, 3 plants, 2 rounds); MLflow stays up while the tests read it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from launcher.federation import FederationSettings, LocalFederation, find_app_dir

pytestmark = pytest.mark.e2e

PLANTS = ["plant-1", "plant-2", "plant-3"]
ROUNDS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("contribution") / "work"
    # Two short rounds on a few dozen rows are about the path, not the model: the gate's absolute floors are off. Updates
    # travel as fp16 deltas: contributions are rebuilt from the decoded updates the strategy aggregated.
    overrides = {"task": "table", "num-server-rounds": ROUNDS, "update-encoding": "fp16", "gate-floor": -1e9, "gate-trivial-margin": -1.0}
    settings = FederationSettings(app_dir=find_app_dir(), workdir=work, mode="simulation", plants=len(PLANTS), examples_per_plant=80,
                                  run_overrides=overrides)
    with LocalFederation(settings, echo=print) as federation:
        result = federation.submit_run()
        yield federation, result, MlflowClient(result.tracking_uri)


def _maxfl(*args: str) -> str:
    out = subprocess.run([str(Path(sys.executable).parent / "maxfl"), *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _report(client: MlflowClient, run_id: str, tmp_path: Path) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, "contribution/contributions.json", str(tmp_path))).read_text())


def test_every_plant_has_its_values_in_mlflow_and_the_shapley_values_add_up_to_the_logged_gain(run, tmp_path):
    _, result, client = run
    logged = client.get_run(result.mlflow_run_id).data.metrics
    for plant in PLANTS:
        for key in ("shapley", "loo", "share"):
            assert [m.step for m in client.get_metric_history(result.mlflow_run_id, f"contribution/{plant}/{key}")] == [0], (plant, key)
    shapley = {p: logged[f"contribution/{p}/shapley"] for p in PLANTS}
    assert sum(shapley.values()) == pytest.approx(logged["contribution/utility_gain"], abs=1e-9)
    v_all = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "contribution/v_all")}
    v_empty = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "contribution/v_empty")}
    assert sorted(v_all) == sorted(v_empty) == list(range(1, ROUNDS + 1))
    report = _report(client, result.mlflow_run_id, tmp_path)
    valued = [r["round"] for r in report["rounds"] if r["status"] not in ("truncated", "over-budget")]
    assert logged["contribution/utility_gain"] == pytest.approx(sum(v_all[r] - v_empty[r] for r in valued))
    assert report["method"] == "exact Shapley + leave-one-out" and report["metric"] == "eval_macro_f1"
    assert report["evaluators"] == PLANTS and [p["plant"] for p in report["plants"]] == PLANTS
    assert all(p["rounds_contributed"] == ROUNDS for p in report["plants"])
    # the cost: the step's wall time against the run's own federated evaluation, both logged; a round evaluated with the next
    # round's train message (evaluate-with-train) had no exchange of its own: its slowest plant's evaluation time counts
    exchanges = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "round_eval_wall_s")}
    slowest = {step: max(m.value for p in PLANTS for m in client.get_metric_history(result.mlflow_run_id, f"{p}/eval_time_s") if m.step == step)
               for step in range(1, ROUNDS + 1) if step not in exchanges}
    eval_s = sum(exchanges.values()) + sum(slowest.values())
    assert logged["contribution/eval_s"] == pytest.approx(eval_s) and logged["contribution/cost_s"] > 0
    assert logged["contribution/cost_ratio"] == pytest.approx(logged["contribution/cost_s"] / eval_s)
    # 2 rounds of 3 plants: v(empty) of round 1, 7 subsets of each round, round 1's full set is round 2's v(empty)
    assert logged["contribution/models_evaluated"] == 1 + 7 + 7 and logged["contribution/exchanges"] == 1
    files = {f.path for f in client.list_artifacts(result.mlflow_run_id, "contribution")}
    assert {"contribution/contributions.json", "contribution/contributions.csv", "contribution/contributions.png"} <= files


def test_maxfl_contributions_prints_the_logged_numbers(run):
    _, result, client = run
    shown = json.loads(_maxfl("contributions", result.mlflow_run_id, "--tracking-uri", result.tracking_uri, "--json"))
    logged = client.get_run(result.mlflow_run_id).data.metrics
    for row in shown["plants"]:
        assert row["shapley"] == pytest.approx(logged[f"contribution/{row['plant']}/shapley"], abs=1e-12)
        assert row["loo"] == pytest.approx(logged[f"contribution/{row['plant']}/loo"], abs=1e-12)
    table = _maxfl("contributions", result.mlflow_run_id, "--tracking-uri", result.tracking_uri)
    assert all(p in table for p in PLANTS) and "Shapley values add up to" in table


def test_the_gate_report_and_model_status_carry_the_contributions(run, tmp_path):
    _, result, client = run
    gate = json.loads(Path(client.download_artifacts(result.mlflow_run_id, "gate/report.json", str(tmp_path))).read_text())
    assert [p["plant"] for p in gate["contributions"]["plants"]] == PLANTS
    markdown = Path(client.download_artifacts(result.mlflow_run_id, "gate/report.md", str(tmp_path))).read_text()
    assert "## Contribution per plant" in markdown
    status = json.loads(_maxfl("model", "status", "--model", "maxfl-table", "--tracking-uri", result.tracking_uri, "--json"))
    assert status["contributions"]["run_id"] == result.mlflow_run_id
    assert status["contributions"]["report"]["plants"] == gate["contributions"]["plants"]
