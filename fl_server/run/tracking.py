"""MLflow tracking for a federated run: one MLflow run per Flower run, one step per round."""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel
from torch import nn

import maxfl
from fl_server.run.config import RunConfig
from fl_server.release.gate import GateReport
from fl_server.release.registry import GATE_TAG, RELEASE_DIR, SCHEMA_TAG, SHA_TAG, WEIGHTS_FILE, EdgeRecord
from maxfl.audit import AuditLog
from maxfl.errors import ConfigError
from maxfl.release import MANIFEST_FILE, ONNX_FILE, ReleaseManifest
from tasks.base import schema_fingerprint

log = logging.getLogger("maxfl")

# pt2 (torch.export) needs no maxfl code to load the model back; pinned so MLflow does not write `torch==x+cpu`.
MODEL_PIP_REQUIREMENTS = ["torch>=2.13,<2.14", "numpy>=2.0"]
LOGGED_MODEL_TAG = "maxfl.model.input"  # what the logged model takes: the edge's input, or (a head only) features
FLWR_RUN_ID_TAG = "flwr.run_id"  # the latest Flower run of this MLflow run
FLWR_RUN_IDS_TAG = "flwr.run_ids"  # every Flower run it had: more than one after a resume
# Keys that may change when a run is resumed (where things are, how long to wait); the rest of the run config
# must equal the params the run started with.
RESUME_KEYS = frozenset({"resume", "tracking-uri", "audit-log", "federation-dir", "round-timeout-s", "poll-interval-s"})
ROUND_PROBE = "round_wall_s"  # every round logs it; `ensure_logged` asks MLflow for it


def resolve_tracking_uri(configured: str) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise ConfigError("no MLflow tracking URI: set run config 'tracking-uri' or MLFLOW_TRACKING_URI")
    return uri


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in one line before training if the tracking server is down, instead of after the first round."""
    if not uri.startswith(("http://", "https://")):
        return
    import httpx

    try:
        httpx.get(f"{uri.rstrip('/')}/health", timeout=timeout_s).raise_for_status()
    except httpx.HTTPError as exc:
        raise ConfigError(f"MLflow tracking server {uri} is unreachable ({exc}); start it or fix 'tracking-uri'") from None


class RunTracker:
    """Logs into one active MLflow run; created by `tracked_run`."""

    def __init__(self, mlflow_module: Any, run_id: str, tracking_uri: str, git_commit: str = "") -> None:
        self._mlflow = mlflow_module
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.git_commit = git_commit
        self.plants: set[str] = set()
        self.latest: dict[str, float] = {}  # every metric's last logged value: the lineage of the run's model
        self.fingerprints: dict[str, str] = {}  # plant -> SHA-256 of the data it trained on
        self.agreed_examples: dict[str, int] = {}  # plant -> training records it declared (data agreement): its most weight
        self.schema = ""  # tasks.base.schema_fingerprint of the agreed data: which champions are comparable
        self.run_series = 0  # the first Flower run of a resumed run (0: not resumed)
        self.audit: AuditLog | None = None  # the anchor's audit log: runs, rejections, gate results, deployments
        self._writer: ThreadPoolExecutor | None = None  # writes rounds' metrics, one at a time, in order
        self._writing: Future[None] | None = None

    def audit_event(self, event: str, **details: Any) -> None:
        if self.audit is not None:
            self.audit.record(event, "anchor", mlflow_run=self.run_id, **details)

    def logged_spec(self) -> dict[str, Any] | None:
        """The task spec this run logged when it started (a resumed run checks the plants still agree with it)."""
        client = self._mlflow.MlflowClient(self.tracking_uri)
        with tempfile.TemporaryDirectory(prefix="maxfl-spec-") as tmp:
            try:
                path = client.download_artifacts(self.run_id, "data/task-spec.json", tmp)
            except Exception:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
                return None
            return dict(json.loads(Path(path).read_text()))

    def note_plants(self, plants: list[str]) -> None:
        if not set(plants) <= self.plants:
            self.plants |= set(plants)
            self._mlflow.set_tag("maxfl.plants", ",".join(sorted(self.plants)))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """One completed round, right after its checkpoint (fl_server.run.checkpoint), in MLflow's batches (1000 a call).

        Written in the background, one round deep: the next round waits for this one's write (and raises its error),
        `ensure_logged` and the end of the run wait too. The store's own work per round - 0.2 s at 20 plants, about 1 s
        at 100 on PostgreSQL (experiments/tracking_cost.py) - then overlaps the next round instead of lengthening this
        one. `ROUND_PROBE` goes last: a round cut between two batches is not taken as logged, and is logged again.
        """
        finite = {k: float(v) for k, v in metrics.items() if np.isfinite(v)}
        self.latest.update(finite)
        self.flush()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maxfl-mlflow-metrics")
        self._writing = self._writer.submit(self._write, finite, step, int(time.time() * 1000))

    def _write(self, metrics: dict[str, float], step: int, timestamp_ms: int) -> None:
        from mlflow.entities import Metric

        keys = sorted(metrics, key=lambda k: k == ROUND_PROBE)  # stable: the probe last, the rest as given
        self._mlflow.MlflowClient(self.tracking_uri).log_batch(
            self.run_id, metrics=[Metric(k, metrics[k], timestamp_ms, step) for k in keys], synchronous=True)

    def flush(self) -> None:
        """Wait until the metrics being written are in MLflow; raises what writing them raised."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None

    def ensure_logged(self, metrics: Mapping[str, float], step: int) -> None:
        """Log a checkpointed round's metrics unless the ServerApp that checkpointed it already did (its probe key is
        written last, so it tells)."""
        if not metrics:
            return
        self.flush()
        client = self._mlflow.MlflowClient(self.tracking_uri)
        probe = ROUND_PROBE if ROUND_PROBE in metrics else next(iter(metrics))
        if not any(m.step == step for m in client.get_metric_history(self.run_id, probe)):
            self.log_metrics(metrics, step)

    def log_data_agreement(self, spec: BaseModel, profiles: Mapping[str, BaseModel]) -> None:
        """The merged spec and each plant's profile (schema, statistics, data fingerprint), for lineage."""
        self._mlflow.log_dict(spec.model_dump(mode="json"), "data/task-spec.json")
        self._mlflow.log_dict({p: prof.model_dump(mode="json", by_alias=True) for p, prof in profiles.items()}, "data/profiles.json")
        self.fingerprints = {p: str(getattr(prof, "fingerprint", "")) for p, prof in profiles.items()}
        self.agreed_examples = {p: int(getattr(prof, "examples", 0)) for p, prof in profiles.items()}
        self.schema = schema_fingerprint(profiles)  # type: ignore[arg-type]
        self._mlflow.set_tags({**{f"maxfl.data.{p}": fp[:16] for p, fp in self.fingerprints.items()}, SCHEMA_TAG: self.schema[:16]})

    def log_model(self, model: nn.Module, input_example: np.ndarray, takes: str = "the task's input, as the edge serves it") -> str:
        """Log the torch model (pt2); returns its `models:/` URI for the registry. `takes` (tag LOGGED_MODEL_TAG)
        says what it takes as input."""
        import mlflow.pytorch

        self._mlflow.set_tag(LOGGED_MODEL_TAG, takes)
        model.eval()
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            serialization_format="pt2",
            input_example=input_example,
            pip_requirements=MODEL_PIP_REQUIREMENTS,
        )
        return str(info.model_uri)

    def log_gate(self, report: GateReport, candidate: Mapping[str, Mapping[str, float]], champion: Mapping[str, Mapping[str, float]] | None) -> None:
        """The gate's report (markdown and JSON) and the full per-plant evaluation table of both models."""
        import pandas as pd

        self._mlflow.log_text(report.markdown(), "gate/report.md")
        self._mlflow.log_dict(report.model_dump(mode="json"), "gate/report.json")
        rows = [{"model": "candidate", "plant": p, **m} for p, m in sorted(candidate.items())]
        rows += [{"model": "champion", "plant": p, **m} for p, m in sorted((champion or {}).items())]
        if rows:
            self._mlflow.log_table(pd.DataFrame(rows), "gate/evaluation.json")
        metrics = {"gate_passed": float(report.passed)}
        if report.candidate_aggregate is not None:
            metrics[f"gate_candidate_{report.rule.metric}"] = report.candidate_aggregate
        if report.champion_aggregate is not None:
            metrics[f"gate_champion_{report.rule.metric}"] = report.champion_aggregate
        self._mlflow.log_metrics(metrics)
        self._mlflow.set_tag(GATE_TAG, report.summary)
        self.audit_event("model.gated", passed=report.passed, summary=report.summary)

    def log_release(self, manifest: ReleaseManifest, onnx: bytes, weights: np.ndarray) -> None:
        """The exact bytes a plant will verify, with the weights a later gate evaluates the champion from."""
        with tempfile.TemporaryDirectory(prefix="maxfl-release-") as tmp:
            folder = Path(tmp)
            (folder / ONNX_FILE).write_bytes(onnx)
            np.save(folder / WEIGHTS_FILE, weights, allow_pickle=False)
            (folder / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
            self._mlflow.log_artifacts(str(folder), RELEASE_DIR)
        self._mlflow.set_tags({"maxfl.release": manifest.label, SHA_TAG: manifest.sha256})

    def log_push(self, records: list[EdgeRecord]) -> None:
        self._mlflow.log_dict({"plants": [r.model_dump(mode="json") for r in records]}, "push/acks.json")
        for status in ("installed", "pending", "refused"):
            self._mlflow.log_metric(f"push_{status}", float(sum(r.status == status for r in records)))
        self.audit_deployments(records)

    def audit_deployments(self, records: list[EdgeRecord]) -> None:
        for r in records:
            self.audit_event("model.deployed", plant=r.plant, version=r.version, status=r.status, serving=r.serving, detail=r.detail)


@contextmanager
def tracked_run(cfg: RunConfig, flwr_run_id: int, fab_hash: str) -> Iterator[RunTracker]:
    """Open the MLflow run of one federated run (or reopen it, `resume`); it ends FAILED if the body raises."""
    uri = resolve_tracking_uri(cfg.tracking_uri)
    check_reachable(uri)
    import flwr
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.experiment_name)
    tags = {
        FLWR_RUN_ID_TAG: str(flwr_run_id),
        "flwr.fab_hash": fab_hash,
        "flwr.version": flwr.__version__,
        "maxfl.version": maxfl.__version__,
        "maxfl.task": cfg.task,
        "maxfl.action": cfg.action,
        "mlflow.source.git.commit": os.environ.get("MAXFL_GIT_COMMIT", ""),
        "python.version": platform.python_version(),
    }
    tags = {k: v for k, v in tags.items() if v}
    if cfg.resume:
        tags[FLWR_RUN_IDS_TAG] = _check_resumable(mlflow.MlflowClient(uri), cfg, flwr_run_id)
        with mlflow.start_run(run_id=cfg.resume) as run:
            mlflow.set_tags(tags)
            tracker = RunTracker(mlflow, run.info.run_id, uri, tags.get("mlflow.source.git.commit", ""))
            tracker.run_series = int(tags[FLWR_RUN_IDS_TAG].split(",")[0])
            tracker.latest = dict(run.data.metrics)
            tracker.plants = {p for p in run.data.tags.get("maxfl.plants", "").split(",") if p}
            with _closing(tracker):
                yield tracker
        return
    name = cfg.task if cfg.action == "train" else f"push-{cfg.model_name()}"
    with mlflow.start_run(run_name=f"{name}-flwr-{flwr_run_id}", tags=tags | {FLWR_RUN_IDS_TAG: str(flwr_run_id)}) as run:
        mlflow.log_params({k: v for k, v in cfg.to_flower().items() if k != "resume"})
        with _closing(RunTracker(mlflow, run.info.run_id, uri, tags.get("mlflow.source.git.commit", ""))) as tracker:
            yield tracker


@contextmanager
def _closing(tracker: RunTracker) -> Iterator[RunTracker]:
    """Every round's metrics are in MLflow before its run ends; when the body failed, its error is the one raised."""
    try:
        yield tracker
    except BaseException:
        try:
            tracker.close()
        except Exception as exc:  # noqa: BLE001 - the body's error is what the run ends with
            log.warning("MLflow: the last round's metrics could not be written (%s)", exc)
        raise
    tracker.close()


def _check_resumable(client: Any, cfg: RunConfig, flwr_run_id: int) -> str:
    """The run exists, is a training run, and this run config is the one it started with; returns the Flower
    run ids it has had, this one included."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(cfg.resume)
    except MlflowException:
        raise ConfigError(f"resume: there is no MLflow run '{cfg.resume}' at {cfg.tracking_uri or 'the tracking server'}; "
                          "give the run id `maxfl federate` printed (or the MLflow UI shows)") from None
    if run.data.tags.get("maxfl.action", "train") != "train":
        raise ConfigError(f"resume: MLflow run '{cfg.resume}' is not a training run")
    if run.info.status == "FINISHED":
        raise ConfigError(f"resume: MLflow run '{cfg.resume}' already finished; nothing to resume")
    wanted = {k: str(v) for k, v in cfg.to_flower().items() if k not in RESUME_KEYS}
    differs = sorted(k for k in (set(wanted) | set(run.data.params)) - RESUME_KEYS if wanted.get(k) != run.data.params.get(k))
    if differs:
        shown = ", ".join(f"{k} ({run.data.params.get(k, '-')} then, {wanted.get(k, '-')} now)" for k in differs[:4])
        raise ConfigError(f"resume: the run config differs from the one MLflow run '{cfg.resume}' started with: {shown}; "
                          "resume with the same run config")
    previous = run.data.tags.get(FLWR_RUN_IDS_TAG) or run.data.tags.get(FLWR_RUN_ID_TAG, "")
    return ",".join([p for p in previous.split(",") if p] + [str(flwr_run_id)])
