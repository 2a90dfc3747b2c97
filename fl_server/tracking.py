"""MLflow tracking for a federated run: one MLflow run per Flower run, one step per round."""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
from pydantic import BaseModel
from torch import nn

import maxfl
from fl_server.config import RunConfig
from maxfl.errors import ConfigError

log = logging.getLogger("maxfl")

# pt2 (torch.export) needs no maxfl code to load the model back; pinned so MLflow does not write `torch==x+cpu`.
MODEL_PIP_REQUIREMENTS = ["torch>=2.13,<2.14", "numpy>=2.0"]
FLWR_RUN_ID_TAG = "flwr.run_id"


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

    def __init__(self, mlflow_module: Any, run_id: str) -> None:
        self._mlflow = mlflow_module
        self.run_id = run_id
        self.plants: set[str] = set()

    def note_plants(self, plants: list[str]) -> None:
        if not set(plants) <= self.plants:
            self.plants |= set(plants)
            self._mlflow.set_tag("maxfl.plants", ",".join(sorted(self.plants)))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        finite = {k: float(v) for k, v in metrics.items() if np.isfinite(v)}
        # Asynchronous: a round does not wait for the tracking server; the run's end flushes the queue.
        self._mlflow.log_metrics(finite, step=step, synchronous=False)

    def log_data_agreement(self, spec: BaseModel, profiles: Mapping[str, BaseModel]) -> None:
        """The merged spec and each plant's profile (schema, statistics, data fingerprint), for lineage."""
        self._mlflow.log_dict(spec.model_dump(mode="json"), "data/task-spec.json")
        self._mlflow.log_dict({p: prof.model_dump(mode="json", by_alias=True) for p, prof in profiles.items()}, "data/profiles.json")
        self._mlflow.set_tags({f"maxfl.data.{p}": getattr(prof, "fingerprint", "")[:16] for p, prof in profiles.items()})

    def log_model(self, model: nn.Module, input_example: np.ndarray) -> None:
        import mlflow.pytorch

        model.eval()
        mlflow.pytorch.log_model(
            model,
            name="model",
            serialization_format="pt2",
            input_example=input_example,
            pip_requirements=MODEL_PIP_REQUIREMENTS,
        )


@contextmanager
def tracked_run(cfg: RunConfig, flwr_run_id: int, fab_hash: str) -> Iterator[RunTracker]:
    """Open the MLflow run of one federated training run; it ends FAILED if the body raises."""
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
        "mlflow.source.git.commit": os.environ.get("MAXFL_GIT_COMMIT", ""),
        "python.version": platform.python_version(),
    }
    with mlflow.start_run(run_name=f"{cfg.task}-flwr-{flwr_run_id}", tags={k: v for k, v in tags.items() if v}) as run:
        mlflow.log_params(cfg.to_flower())
        yield RunTracker(mlflow, run.info.run_id)
