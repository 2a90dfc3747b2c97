"""A run's contribution report read back from MLflow, and its table for `maxfl contributions` and `maxfl model status`."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pydantic import ValidationError
from rich import box
from rich.table import Table

from fl_server.run.contribution import CONTRIBUTION_JSON, CONTRIBUTION_TAG, ContributionReport
from maxfl.errors import ConfigError


def load_report(tracking_uri: str, run_id: str) -> ContributionReport | None:
    """The report of MLflow run `run_id`; None when the run has none (contribution off, or it failed: see its
    `maxfl.contribution` tag). An unknown run is a ConfigError."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"there is no MLflow run '{run_id}' at {tracking_uri}; give the run id `maxfl federate` printed") from None
    with tempfile.TemporaryDirectory(prefix="maxfl-contribution-") as tmp:
        try:
            path = client.download_artifacts(run_id, CONTRIBUTION_JSON, tmp)
        except Exception:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
            return None
        try:
            return ContributionReport.model_validate(json.loads(Path(path).read_text()))
        except (ValueError, ValidationError) as exc:
            raise ConfigError(f"run {run_id}'s {CONTRIBUTION_JSON} is unreadable ({exc.__class__.__name__}); it was not written by maxfl") from None


def why_missing(tracking_uri: str, run_id: str) -> str:
    """Why a run has no report: its `maxfl.contribution` tag (a failure), or that contribution was off."""
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri).get_run(run_id)
    tag = run.data.tags.get(CONTRIBUTION_TAG, "")
    if tag:
        return tag
    return "contribution was off" if run.data.params.get("contribution") == "off" else "this run logged no contribution report"


def table(report: ContributionReport, title: str = "") -> Table:
    """Per plant: Shapley, leave-one-out, share of the credit, rounds contributed, whether it scored the models."""
    out = Table("plant", "Shapley", "leave-one-out", "share", "rounds valued/contributed", "scored", box=box.SIMPLE,
                title=title or f"contribution to {report.metric} ({report.method})")
    for p in report.plants:
        out.add_row(p.plant, _fmt(p.shapley), _fmt(p.loo), "-" if p.share is None else f"{p.share:.1%}",
                    f"{p.rounds_valued}/{p.rounds_contributed}", "yes" if p.evaluated else "no")
    return out


def footer(report: ContributionReport) -> list[str]:
    """The lines under the table: what the values add up to, the cost, and what was left out."""
    ratio = f", {report.cost_ratio:.2f}x the run's federated evaluation ({report.eval_s:.1f} s)" if report.cost_ratio is not None else ""
    lines = [f"Shapley values add up to {report.utility_gain:+.4f} ({report.metric} gained over the valued rounds)",
             f"cost: {report.models_evaluated} rebuilt models in {report.exchanges} exchange(s), {report.cost_s:.1f} s{ratio}"]
    return lines + report.notes


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"
