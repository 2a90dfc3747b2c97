"""After training: evaluate the model against the champion at every plant, gate it, register it with its
lineage and ONNX export, and push it to the plants' edge stores if it passed (DESIGN.md, steps 4 to 7)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import nn

import maxfl
from fl_server.run.config import RunConfig
from fl_server.release.gate import GateReport, GateRule, decide
from fl_server.run.contribution import ContributionReport
from fl_server.run.identity import refusal
from fl_server.release.push import push
from fl_server.release.registry import CANDIDATE, CHAMPION, GATE_SUMMARY_TAG, GATE_TAG, SCHEMA_TAG, SHA_TAG, Registry
from fl_server.run.strategy import RunAborted, failed_plant, failure_reason, plant_of
from fl_server.run.tracking import RunTracker
from maxfl import onnx_model
from maxfl.messages import ARRAYS, CONFIG, METRICS, ONNX, PRIVACY_PREFIX
from maxfl.release import ReleaseManifest, sha256_hex
from tasks.base import Task, TaskSpec

log = logging.getLogger("maxfl")

CANDIDATE_GROUP = "release-candidate"
CHAMPION_GROUP = "release-champion"


def gate_rule(cfg: RunConfig, spec: TaskSpec) -> GateRule:
    # Regression models (one output) are gated on R^2, classifiers on macro-F1: both weigh every class/plant.
    metric = cfg.gate_metric or ("eval_r2" if spec.num_classes == 1 else "eval_macro_f1")
    return GateRule(metric=metric, margin=cfg.gate_margin, tolerance=cfg.gate_tolerance, floor=cfg.gate_floor,
                    trivial_margin=cfg.gate_trivial_margin, onnx_tolerance=cfg.gate_onnx_tolerance)


def _evaluate_content(arrays: ArrayRecord, plan: Mapping[str, Any], onnx: bytes | None = None) -> RecordDict:
    content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(dict(plan))})
    if onnx is not None:
        content[ONNX] = ConfigRecord({"model": onnx})
    return content


def evaluate_at_plants(
    grid: Grid, cfg: RunConfig, plants: list[str], candidate: RecordDict, champion: RecordDict | None
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]] | None, dict[str, str]]:
    """Both models evaluated by every connected plant in one exchange, so both see the same records at the same time."""
    messages = []
    for node in grid.get_node_ids():
        messages.append(Message(content=candidate, message_type=MessageType.EVALUATE, dst_node_id=node, group_id=CANDIDATE_GROUP))
        if champion is not None:
            messages.append(Message(content=champion, message_type=MessageType.EVALUATE, dst_node_id=node, group_id=CHAMPION_GROUP))
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout_s))
    tables: dict[str, dict[str, dict[str, float]]] = {CANDIDATE_GROUP: {}, CHAMPION_GROUP: {}}
    problems: dict[str, str] = {}
    for msg in replies:
        if refusal(msg) is not None:  # a node that speaks for no plant: its scores count for none
            log.warning("release: a reply from %s is ignored: %s", plant_of(msg), refusal(msg))
            continue
        if msg.has_error():
            plant, _ = failed_plant(msg)
            problems[plant] = failure_reason(msg)
            continue
        tables[msg.metadata.group_id][plant_of(msg)] = {k: float(v) for k, v in msg.content[METRICS].items()}  # type: ignore[arg-type]
    for plant in plants:
        if plant not in tables[CANDIDATE_GROUP] and plant not in problems:
            problems[plant] = f"no answer within {cfg.round_timeout_s:.0f}s"
    return tables[CANDIDATE_GROUP], (tables[CHAMPION_GROUP] if champion is not None else None), problems


def lineage_tags(cfg: RunConfig, tracker: RunTracker, flwr_run_id: int, plants: list[str], sha256: str, report: GateReport) -> dict[str, str]:
    """Everything needed to trace a version back to its run, rounds, plants, privacy spend, data and code."""
    tags = {
        "maxfl.run_id": tracker.run_id,
        "flwr.run_id": str(flwr_run_id),
        "maxfl.task": cfg.task,
        "maxfl.rounds": str(cfg.num_server_rounds),
        "maxfl.strategy": cfg.strategy,
        "maxfl.plants": ",".join(plants),
        "maxfl.privacy": cfg.privacy if cfg.privacy == "none" else f"{cfg.privacy} target-epsilon={cfg.target_epsilon:g}",
        "maxfl.version": maxfl.__version__,
        "maxfl.metrics": report.model_dump_json(include={"plants", "candidate_aggregate", "champion_aggregate", "aggregate_gain"}),
        SHA_TAG: sha256,
        SCHEMA_TAG: tracker.schema,
        GATE_TAG: "passed" if report.passed else "failed",
        GATE_SUMMARY_TAG: report.summary,
    }
    for plant in plants:
        # The run's own spend (this model alone), and the data set's lifetime spend over every run so far.
        for tag, metric in (("epsilon", "epsilon_run"), ("epsilon-lifetime", "epsilon")):
            value = tracker.latest.get(f"{plant}/{PRIVACY_PREFIX}{metric}")
            tags[f"maxfl.{tag}.{plant}"] = f"{value:.4f}" if value is not None else ("inf" if cfg.privacy == "none" else "-")
        tags[f"maxfl.data.{plant}"] = tracker.fingerprints.get(plant, "")
    if tracker.git_commit:
        tags["mlflow.source.git.commit"] = tracker.git_commit
    return tags


def release_model(
    grid: Grid, cfg: RunConfig, task: Task, spec: TaskSpec, model: nn.Module, arrays: ArrayRecord, plan: Mapping[str, Any],
    tracker: RunTracker, model_uri: str, contributions: ContributionReport | None = None,
) -> GateReport:
    """Gate, register and (if it passed) push the run's final model. `contributions` goes into the gate's report."""
    plants = sorted(tracker.plants)
    onnx = onnx_model.export(task.deployable(spec, model), task.input_example(spec))
    sha256 = sha256_hex(onnx)
    registry = Registry(tracker.tracking_uri, cfg.model_name())
    champion = registry.champion()
    plan = {**plan, "server-round": cfg.num_server_rounds}  # the plants' handlers read a round's instructions
    champion_content = None
    if champion is not None and (theirs := champion.tags.get(SCHEMA_TAG)) and tracker.schema and theirs != tracker.schema:
        log.warning("release: %s v%d was trained on other data (schema %s, this run's %s): no comparable champion, this is a "
                    "first release for this data", registry.name, champion.version, theirs[:12], tracker.schema[:12])
        tracker.audit_event("release.other_data", champion=champion.version, champion_schema=theirs, schema=tracker.schema)
        champion = None
    if champion is not None:
        held = registry.load_release(champion.version)
        if held.manifest.task != cfg.task:
            raise RunAborted(f"registered model '{registry.name}' holds {held.manifest.task} models, this run trains {cfg.task}; "
                             "set run config 'registered-model' to another name")
        champion_plan = {**plan, "task-spec": held.manifest.task_spec}
        champion_content = _evaluate_content(ArrayRecord([held.weights]), champion_plan)
    log.info("release: evaluating the candidate%s at %d plant(s)", "" if champion is None else f" and champion v{champion.version}", len(plants))
    cand, champ, problems = evaluate_at_plants(grid, cfg, plants, _evaluate_content(arrays, plan, onnx), champion_content)
    report = decide(gate_rule(cfg, spec), plants, cand, champ, None if champion is None else champion.version, problems,
                    caps=tracker.agreed_examples)
    if contributions is not None:
        report = report.model_copy(update={"contributions": contributions})
    tracker.log_gate(report, cand, champ)
    version = registry.register(model_uri, tracker.run_id, lineage_tags(cfg, tracker, grid.run.run_id, plants, sha256, report))
    manifest = ReleaseManifest(
        model_name=registry.name, version=version, task=cfg.task, task_spec=spec.model_dump_json(), sha256=sha256, size_bytes=len(onnx),
        input_name=onnx_model.INPUT_NAME, output_name=onnx_model.OUTPUT_NAME, mlflow_run_id=tracker.run_id, flwr_run_id=grid.run.run_id,
        created_at=datetime.now(UTC), seed=cfg.seed,
    )
    tracker.log_release(manifest, onnx, arrays.to_numpy_ndarrays()[0])
    if report.passed:
        left = registry.make_champion(version)
        log.info("release: %s v%d is the new %s (was %s): %s", registry.name, version, CHAMPION, f"v{left}" if left else "none", report.summary)
        records = push(grid, cfg, registry, manifest, onnx, targets=None, known=plants, weights=arrays.to_numpy_ndarrays()[0])
        tracker.log_push(records)
    else:
        registry.make_candidate(version)
        log.warning("release: %s v%d stays %s, not pushed: %s", registry.name, version, CANDIDATE, report.summary)
    return report
