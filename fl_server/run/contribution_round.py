"""The anchor's side of contribution per plant (fl_server.run.contribution): each round's validated updates are kept,
sub-federation models are rebuilt from them after training, and the plants score those models on their held-out splits
in one message per plant per exchange (`query.contribution`); only metrics come back.

The updates are kept on disk, not in memory (a temporary folder, memory-mapped when read), as the strategy aggregated
them: after update validation, fp16 decoding and weight capping, before central DP's clipping and noise.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_server.release.gate import higher_is_better
from fl_server.run.config import RunConfig
from fl_server.run.contribution import (
    CONTRIBUTION_JSON, CONTRIBUTION_TAG, ContributionError, ContributionReport, ContributionSettings, PlantScores, ReconstructedUtility,
    RoundUpdates, estimate, method_label, totals, utility_gain,
)
from fl_server.run.identity import node_label, refusal
from fl_server.run.strategy import failed_plant, failure_reason, plant_of
from fl_server.run.tracking import RunTracker
from maxfl.messages import ARRAYS, CONFIG, CONTRIBUTION, METRICS, WEIGHT_KEY, ContributionRequest

log = logging.getLogger("maxfl")

MAX_MESSAGE_BYTES = 64 * 2**20  # models per message at most this many bytes; a larger batch goes in several messages
EVAL_WALL_METRIC = "round_eval_wall_s"  # fl_server.run.strategy: each round's federated evaluation


def _flat(record: ArrayRecord) -> np.ndarray:
    """A record's arrays as one float32 vector, in key order (maxfl.weights packs a model as exactly that)."""
    arrays = [a.numpy().reshape(-1) for a in record.values()]
    flat = np.concatenate(arrays) if len(arrays) != 1 else arrays[0]
    return np.asarray(flat, dtype=np.float32)


class RoundStore:
    """Each round's global model and aggregated updates, on disk until the contribution step has used them."""

    def __init__(self) -> None:
        self._dir: tempfile.TemporaryDirectory[str] | None = None  # removed by `close`, or at exit if the run fails first
        self._rounds: dict[int, tuple[tuple[str, ...], tuple[float, ...]]] = {}
        # Nodes heard as plants in this run (training or evaluating): only they receive rebuilt models to score.
        self.nodes: set[int] = set()

    def record(self, server_round: int, global_model: np.ndarray, plants: list[str], models: list[np.ndarray], weights: list[float]) -> None:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="maxfl-contribution-")
        folder = Path(self._dir.name)
        np.save(folder / f"round-{server_round}-global.npy", global_model, allow_pickle=False)
        np.save(folder / f"round-{server_round}-models.npy", np.stack(models), allow_pickle=False)
        self._rounds[server_round] = (tuple(plants), tuple(weights))

    def rounds(self) -> dict[int, RoundUpdates]:
        if self._dir is None:
            return {}
        folder = Path(self._dir.name)
        return {r: RoundUpdates(r, np.load(folder / f"round-{r}-global.npy"), plants, np.load(folder / f"round-{r}-models.npy", mmap_mode="r"), weights)
                for r, (plants, weights) in sorted(self._rounds.items())}

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
        self._rounds = {}


class UpdateRecorder(Strategy):
    """Wraps the aggregating strategy (inside update validation): keeps the round's global model and every update it
    aggregates, with its example weight, in aggregation order."""

    def __init__(self, inner: Strategy, store: RoundStore) -> None:
        self.inner = inner
        self.store = store
        self._global: np.ndarray | None = None

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = np.array(_flat(arrays), copy=True)
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)  # heard replies only (fl_server.run.strategy): valid updates and plants that declined
        self.store.nodes |= {int(m.metadata.src_node_id) for m in replies}
        used = [m for m in replies if not m.has_error()]
        if used and self._global is not None:
            weights = [float(next(iter(m.content.metric_records.values()))[WEIGHT_KEY]) for m in used]  # type: ignore[arg-type]
            self.store.record(server_round, self._global, [plant_of(m) for m in used], [_flat(m.content[ARRAYS]) for m in used], weights)
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self.store.nodes |= {int(m.metadata.src_node_id) for m in replies}
        return self.inner.aggregate_evaluate(server_round, replies)


def record_rounds(strategy: Strategy, store: RoundStore | None) -> Strategy:
    """`strategy` with its rounds kept for the contribution step; as it is when contribution is off (`store` None)."""
    return strategy if store is None else UpdateRecorder(strategy, store)


def round_store(cfg: RunConfig) -> RoundStore | None:
    return None if cfg.contribution == "off" else RoundStore()


class FederatedScorer:
    """Stacked models -> each plant's scores of them: one `query.contribution` message per plant (more only when the
    models exceed MAX_MESSAGE_BYTES), evaluated against the plant's loaded held-out split; metrics only come back.
    Only `nodes` (the run's plants: heard in its rounds) receive the models, a node of no plant never does.

    Scores are the gate's metric, sign-flipped where lower is better, so a larger utility is always a better model.
    Plants with one class in their held-out split are left out (their macro-F1 says nothing), as in the gate.
    """

    def __init__(self, grid: Grid, cfg: RunConfig, plan: Mapping[str, Any], metric: str, caps: Mapping[str, int] | None = None,
                 nodes: Iterable[int] | None = None) -> None:
        self.grid = grid
        self.nodes = None if nodes is None else set(nodes)  # who may receive the models (None: every connected node)
        self.timeout = cfg.round_timeout_s
        self.plan = {**plan, "server-round": cfg.num_server_rounds}  # the plants' handlers read a round's instructions
        self.metric = metric
        self.sign = 1.0 if higher_is_better(metric) else -1.0
        self.caps = dict(caps or {})
        self.problems: dict[str, str] = {}  # plant -> why its scores of some exchange are missing
        self.exchange_s = 0.0  # time spent waiting on the plants
        self.exchanges = 0
        self._plants: dict[int, str] = {}  # node id -> the plant its replies came from

    def _messages(self, models: np.ndarray, exchange: int) -> list[Message]:
        per_message = max(1, MAX_MESSAGE_BYTES // max(1, models[0].nbytes))
        contents = []
        for start in range(0, len(models), per_message):
            request = ContributionRequest(metric=self.metric, offset=start).to_flower()
            contents.append(RecordDict({CONFIG: ConfigRecord(self.plan), ARRAYS: ArrayRecord([np.ascontiguousarray(models[start:start + per_message])]),
                                        CONTRIBUTION: ConfigRecord(request)}))
        return [Message(content=content, message_type=f"{MessageType.QUERY}.{CONTRIBUTION}", dst_node_id=node, group_id=f"contribution-{exchange}")
                for node in self.grid.get_node_ids() if self.nodes is None or node in self.nodes for content in contents]

    def __call__(self, models: np.ndarray) -> dict[str, PlantScores]:
        started = time.perf_counter()
        self.exchanges += 1
        messages = self._messages(models, self.exchanges)
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        took = time.perf_counter() - started
        self.exchange_s += took
        log.info("contribution: exchange %d: %d model(s) to %d plant(s) in %d message(s), %.1f s", self.exchanges, len(models),
                 len({m.metadata.dst_node_id for m in messages}), len(messages), took)
        scores: dict[str, dict[int, list[float]]] = {}
        examples: dict[str, float] = {}
        for msg in replies:
            plant = self._plants[int(msg.metadata.src_node_id)] = plant_of(msg)
            if (why_not := refusal(msg)) is not None:
                log.warning("contribution: a reply from %s is ignored: %s", plant, why_not)
                continue
            if msg.has_error():
                who, _ = failed_plant(msg)
                self.problems.setdefault(who, failure_reason(msg))
                continue
            got = msg.content[METRICS]
            values = got.get(self.metric)
            if not isinstance(values, list):
                self.problems.setdefault(plant, f"reported no {self.metric} scores")
                continue
            if float(got.get("eval_test_classes", 2.0)) < 2:  # type: ignore[arg-type]
                self.problems.setdefault(plant, "has one class in its held-out split: its scores are not counted (as in the gate)")
                continue
            claimed = float(got.get(WEIGHT_KEY, 0.0))  # type: ignore[arg-type]
            examples[plant] = min(claimed, self.caps[plant]) if plant in self.caps and math.isfinite(claimed) else claimed
            scores.setdefault(plant, {})[int(got.get("model-offset", 0))] = [self.sign * float(v) for v in values]  # type: ignore[arg-type]
        for node in {int(m.metadata.dst_node_id) for m in messages} - {int(m.metadata.src_node_id) for m in replies}:
            self.problems.setdefault(self._plants.get(node, node_label(node)), f"did not answer within {self.timeout:.0f}s")
        out = {}
        for plant, parts in scores.items():
            joined = [s for _, part in sorted(parts.items()) for s in part]
            if len(joined) == len(models):
                out[plant] = PlantScores(joined, examples[plant])
            else:
                self.problems.setdefault(plant, f"answered for {len(joined)} of {len(models)} models")
        return out


def run_eval_seconds(tracking_uri: str, run_id: str, plants: Iterable[str]) -> float:
    """The run's own federated evaluation time, what the contribution step is compared with: each round's evaluation
    exchange (round_eval_wall_s); a round whose evaluation rode on the next round's train message (evaluate-with-train)
    had no exchange of its own, and counts the slowest plant's evaluation time in it (<plant>/eval_time_s)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)

    def per_step(key: str) -> dict[int, float]:
        return {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}

    exchanges = per_step(EVAL_WALL_METRIC)
    slowest: dict[int, float] = {}
    for plant in plants:
        for step, seconds in per_step(f"{plant}/eval_time_s").items():
            slowest[step] = max(slowest.get(step, 0.0), seconds)
    return float(sum(exchanges.values()) + sum(v for step, v in slowest.items() if step not in exchanges))


def assess_contributions(grid: Grid, cfg: RunConfig, store: RoundStore | None, tracker: RunTracker, plan: Mapping[str, Any], metric: str,
                         resumed_after: int = 0) -> ContributionReport | None:
    """After training: every plant's contribution, logged to MLflow; None when contribution is off or it failed.

    A failure here (no plant scored the models, or an error of the step itself, whose traceback goes to the ServerApp's
    log) is tagged on the run and audited, and the run goes on to its release: the model is trained either way.
    """
    if store is None:
        return None
    started = time.perf_counter()
    try:
        report = _assess(grid, cfg, store, tracker, plan, metric, resumed_after, started)
        log_contributions(tracker, report)
    except Exception as exc:  # noqa: BLE001 - a report about the run must not cost the run its release
        reason = str(exc) if isinstance(exc, ContributionError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ContributionError):
            log.warning("contribution: not computed: %s", reason)
        else:
            log.exception("contribution: not computed: %s", reason)
        tracker.audit_event("contribution.failed", reason=reason)
        _tag_failure(tracker, reason)
        return None
    finally:
        store.close()
    log.info("contribution: %s", summary(report))
    tracker.audit_event("contribution.assessed", method=report.method, models=report.models_evaluated, cost_s=round(report.cost_s, 3),
                        shapley={p.plant: p.shapley for p in report.plants})
    return report


def _tag_failure(tracker: RunTracker, reason: str) -> None:
    from mlflow import MlflowClient

    try:
        MlflowClient(tracker.tracking_uri).set_tag(tracker.run_id, CONTRIBUTION_TAG, f"failed: {reason}"[:5000])
    except Exception as exc:  # noqa: BLE001 - MLflow itself may be what failed; the log and the audit have the reason
        log.warning("contribution: could not tag the run (%s)", exc)


def settings_for(cfg: RunConfig) -> ContributionSettings:
    return ContributionSettings(method=cfg.contribution, exact_max_plants=cfg.contribution_exact_max_plants,  # type: ignore[arg-type]
                                max_models=cfg.contribution_max_models, truncation=cfg.contribution_truncation, seed=cfg.seed)


def _assess(grid: Grid, cfg: RunConfig, store: RoundStore, tracker: RunTracker, plan: Mapping[str, Any], metric: str, resumed_after: int,
            started: float) -> ContributionReport:
    settings = settings_for(cfg)
    rounds = store.rounds()
    notes = []
    if cfg.privacy == "none":
        notes.append("privacy=none: the plants scored models rebuilt from single plants' updates, which without DP-SGD are not "
                     "differentially private; set contribution=off where plants must not see models built from one plant's data")
        log.warning("contribution: %s", notes[-1])
    if cfg.central_dp != "off":
        notes.append("central DP: the sub-federation models are rebuilt from the updates before the anchor's clipping and noise")
    if resumed_after:
        notes.append(f"the run was resumed after round {resumed_after}: updates are not kept across a restart, so rounds 1-{resumed_after} "
                     "are not valued")
    scorer = FederatedScorer(grid, cfg, plan, metric, tracker.agreed_examples, nodes=store.nodes)
    utility = ReconstructedUtility(rounds, scorer)
    try:
        values = estimate(list(rounds.values()), utility, settings) if rounds else []
    except ContributionError as exc:
        problems = "; ".join(f"{plant}: {why}" for plant, why in sorted(scorer.problems.items()))
        raise ContributionError(f"{exc}" + (f" ({problems})" if problems else "")) from None
    if not rounds:
        notes.append("no round's updates were recorded by this ServerApp: nothing to value")
    for plant, why in sorted((utility.dropped | scorer.problems).items()):
        notes.append(f"{plant}: {why}; the values use the plants that scored every model")
    if over := [r.round for r in values if r.status == "over-budget"]:
        notes.append(f"round(s) {', '.join(map(str, over))} exceeded contribution-max-models ({settings.max_models}): not valued by Shapley")
    if truncated := [r.round for r in values if r.status == "truncated"]:
        notes.append(f"round(s) {', '.join(map(str, truncated))} improved {metric} by less than {settings.truncation:g}: worth 0 to every plant")
    cost_s = time.perf_counter() - started
    plants = totals(values, tracker.plants, utility.evaluators)
    tracker.flush()  # the last round's metrics are written in the background (fl_server.run.tracking)
    return ContributionReport(
        method=method_label(values, settings), metric=metric, plants=plants, rounds=values, utility_gain=utility_gain(values),
        models_evaluated=utility.models_evaluated, exchanges=utility.exchanges, cost_s=cost_s,
        eval_s=run_eval_seconds(tracker.tracking_uri, tracker.run_id, [p.plant for p in plants]), evaluators=utility.evaluators,
        truncation=settings.truncation, max_models=settings.max_models, notes=notes,
    )


def summary(report: ContributionReport) -> str:
    """One line: the method, each plant's Shapley value (or leave-one-out) and the cost."""
    key = "shapley" if any(p.shapley is not None for p in report.plants) else "loo"
    values = ", ".join(f"{p.plant} {getattr(p, key):+.4f}" for p in report.plants if getattr(p, key) is not None)
    ratio = f", {report.cost_ratio:.2f}x the run's evaluation time" if report.cost_ratio is not None else ""
    return f"{report.method} of {report.metric}: {values or 'none'} ({report.models_evaluated} models, {report.cost_s:.1f} s{ratio})"


def metrics_of(report: ContributionReport) -> dict[str, float]:
    """The MLflow metrics: per plant contribution/<plant>/shapley|loo|share (the federation page reads them), and the cost."""
    out: dict[str, float] = {}
    for p in report.plants:
        for key in ("shapley", "loo", "share"):
            if (value := getattr(p, key)) is not None:
                out[f"contribution/{p.plant}/{key}"] = float(value)
    out |= {"contribution/utility_gain": report.utility_gain, "contribution/models_evaluated": float(report.models_evaluated),
            "contribution/exchanges": float(report.exchanges), "contribution/cost_s": report.cost_s, "contribution/eval_s": report.eval_s}
    if report.cost_ratio is not None:
        out["contribution/cost_ratio"] = report.cost_ratio
    return out


def table_csv(report: ContributionReport) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["plant", "shapley", "loo", "share", "rounds_contributed", "rounds_valued", "evaluated"])
    for p in report.plants:
        writer.writerow([p.plant, *("" if v is None else f"{v:.6g}" for v in (p.shapley, p.loo, p.share)), p.rounds_contributed,
                         p.rounds_valued, p.evaluated])
    return buf.getvalue()


def bar_plot(report: ContributionReport) -> Any:
    """Shapley and leave-one-out per plant, as a matplotlib Figure (no pyplot, no display: the Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plants = [p.plant for p in report.plants]
    fig = Figure(figsize=(max(4.0, 0.9 * len(plants) + 2), 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = np.arange(len(plants))
    series = [(k, [getattr(p, k) for p in report.plants]) for k in ("shapley", "loo") if any(getattr(p, k) is not None for p in report.plants)]
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, [v or 0.0 for v in values], width, label={"shapley": "Shapley", "loo": "leave-one-out"}[name])
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, plants, rotation=30 if len(plants) > 6 else 0, ha="right" if len(plants) > 6 else "center")
    ax.set_ylabel(f"contribution to {report.metric}")
    ax.set_title(report.method)
    if series:
        ax.legend()
    fig.tight_layout()
    return fig


def log_contributions(tracker: RunTracker, report: ContributionReport) -> None:
    """Metrics, per-round utilities (step = round), the report as JSON, CSV and markdown, and the bar plot."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracker.tracking_uri)
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in metrics_of(report).items()]
    for r in report.rounds:
        metrics += [Metric(f"contribution/{k}", v, now, r.round) for k, v in (("v_all", r.v_all), ("v_empty", r.v_empty)) if v is not None]
    for start in range(0, len(metrics), 1000):
        client.log_batch(tracker.run_id, metrics=metrics[start:start + 1000], synchronous=True)
    client.log_dict(tracker.run_id, report.model_dump(mode="json"), CONTRIBUTION_JSON)
    client.log_text(tracker.run_id, table_csv(report), "contribution/contributions.csv")
    client.log_text(tracker.run_id, report.markdown(), "contribution/report.md")
    client.log_figure(tracker.run_id, bar_plot(report), "contribution/contributions.png")
    client.set_tag(tracker.run_id, CONTRIBUTION_TAG, summary(report)[:5000])
