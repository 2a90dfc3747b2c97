"""What the release step derives from the run: the gate's rule and the version's lineage tags."""

from __future__ import annotations

from types import SimpleNamespace

from fl_server.run.config import RunConfig
from fl_server.release.gate import GateRule, decide
from fl_server.release.chain import gate_rule, lineage_tags
from tasks.base import TaskSpec


def test_gate_metric_defaults_to_macro_f1_for_classifiers_and_r2_for_regression():
    cfg = RunConfig(gate_margin=0.01, gate_tolerance=0.03, gate_floor=0.4)
    assert gate_rule(cfg, TaskSpec(task="defect", model="cnn", num_classes=2)) == GateRule(
        metric="eval_macro_f1", margin=0.01, tolerance=0.03, floor=0.4)
    assert gate_rule(cfg, TaskSpec(task="table", model="mlp", num_classes=1)).metric == "eval_r2"
    assert gate_rule(RunConfig(gate_metric="eval_auroc"), TaskSpec(task="defect", model="cnn", num_classes=2)).metric == "eval_auroc"


def test_lineage_names_run_plants_privacy_data_and_the_exact_bytes():
    tracker = SimpleNamespace(
        run_id="abc", git_commit="deadbeef", fingerprints={"plant-1": "f" * 64, "plant-2": "e" * 64}, schema="5" * 64,
        latest={"plant-1/dp_epsilon_run": 2.9, "plant-1/dp_epsilon": 5.8, "plant-2/dp_epsilon_run": 3.0, "plant-2/dp_epsilon": 3.0},
    )
    cfg = RunConfig(num_server_rounds=7)
    report = decide(GateRule(metric="m"), ["plant-1", "plant-2"], {p: {"m": 0.9, "num-examples": 5} for p in ("plant-1", "plant-2")}, None)
    tags = lineage_tags(cfg, tracker, 42, ["plant-1", "plant-2"], "0" * 64, report)
    assert tags["maxfl.run_id"] == "abc" and tags["flwr.run_id"] == "42" and tags["maxfl.rounds"] == "7"
    assert tags["maxfl.plants"] == "plant-1,plant-2" and tags["maxfl.privacy"] == "dp-sgd target-epsilon=3"
    assert (tags["maxfl.epsilon.plant-1"], tags["maxfl.epsilon-lifetime.plant-1"]) == ("2.9000", "5.8000")
    assert tags["maxfl.data.plant-2"] == "e" * 64 and tags["maxfl.onnx.sha256"] == "0" * 64
    assert tags["maxfl.schema"] == "5" * 64  # which later runs' champions this version is the reference for
    assert tags["maxfl.gate"] == "passed" and tags["mlflow.source.git.commit"] == "deadbeef"
    assert '"plant":"plant-1"' in tags["maxfl.metrics"]
    no_dp = lineage_tags(RunConfig(privacy="none"), SimpleNamespace(**{**tracker.__dict__, "latest": {}}), 42, ["plant-1"], "0" * 64, report)
    assert no_dp["maxfl.epsilon.plant-1"] == "inf"
