"""Strategies from the run config, and the wrapper that tracks every round of any of them."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fl_server.config import RunConfig
from fl_server.tracking import RunTracker
from maxfl.messages import METRICS, PLANT, PRIVACY_PREFIX, WEIGHT_KEY

log = logging.getLogger("maxfl")


class RunAborted(RuntimeError):
    """Too few plants answered for the run to go on."""


def build_strategy(cfg: RunConfig) -> Strategy:
    strategies = {"fedavg": FedAvg}
    return strategies[cfg.strategy](
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_plants,
        min_evaluate_nodes=cfg.min_plants if cfg.fraction_evaluate > 0 else 0,
        min_available_nodes=cfg.min_plants,
        weighted_by_key=WEIGHT_KEY,
    )


def plant_of(msg: Message) -> str:
    if not msg.has_error() and PLANT in msg.content.config_records:
        return str(msg.content[PLANT]["plant-id"])
    return f"node-{msg.metadata.src_node_id}"


_FLOWER_EXCEPTION = re.compile(r"^<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>$", re.DOTALL)


def failure_reason(msg: Message) -> str:
    """A failed reply's reason, without Flower's `<class '...'>:<'...'>` wrapping of exceptions."""
    reason = msg.error.reason
    if m := _FLOWER_EXCEPTION.match(reason):
        reason = f"{m.group(1)}: {m.group(2)}"
    return reason if reason.startswith(("plant", "node-")) else f"{plant_of(msg)}: {reason}"


def failed_plant(msg: Message) -> tuple[str, str]:
    """(who, why) of a failed reply: the plant that declined (or the node), and its reason."""
    who, _, why = failure_reason(msg).partition(" ")
    return who.rstrip(":"), why.removeprefix("declined: ")


def keep_common_metrics(replies: list[Message]) -> list[Message]:
    """Reduce every reply's metrics to the keys all replies share, in place.

    Some metrics exist only where the data allows them (recall of a class, detection of a fault a plant has
    seen); they are logged per plant, and Flower's averaging, which needs identical keys, gets the rest.
    """
    if replies:
        common = set.intersection(*(set(m.content[METRICS].keys()) for m in replies))
        for msg in replies:
            msg.content[METRICS] = MetricRecord({k: v for k, v in msg.content[METRICS].items() if k in common})
    return replies


class TrackedStrategy(Strategy):
    """Wraps a strategy: per-round and per-plant metrics to MLflow (step = round) and a progress line.

    It also stops the run, with the plants' reasons, when fewer than `min_plants` return an update.
    """

    def __init__(self, inner: Strategy, tracker: RunTracker, min_plants: int, num_rounds: int, evaluate_every: int = 1) -> None:
        self.inner = inner
        self.evaluate_every = evaluate_every
        self.tracker = tracker
        self.min_plants = min_plants
        self.num_rounds = num_rounds
        self._round_started = 0.0
        self._phase_started = 0.0
        self._slowest_train_s = 0.0

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._round_started = self._phase_started = time.perf_counter()
        return self.inner.configure_train(server_round, arrays, config, grid)

    def evaluates(self, server_round: int) -> bool:
        """Federated evaluation every `evaluate_every` rounds, and always of the final model."""
        return server_round % self.evaluate_every == 0 or server_round == self.num_rounds

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._phase_started = time.perf_counter()
        if not self.evaluates(server_round):
            return []
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._slowest_train_s = self._record("train", server_round, replies)
        ok = [m for m in replies if not m.has_error()]
        if len(ok) < self.min_plants:
            reasons = "; ".join(failure_reason(m) for m in replies if m.has_error()) or "no replies"
            raise RunAborted(f"round {server_round}: {len(ok)} plant(s) returned an update, {self.min_plants} needed ({reasons})")
        arrays, metrics = self.inner.aggregate_train(server_round, keep_common_metrics(ok))
        self._log_aggregate(server_round, metrics)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        if not self.evaluates(server_round):
            return None
        self._record("eval", server_round, replies)
        metrics = self.inner.aggregate_evaluate(server_round, keep_common_metrics([m for m in replies if not m.has_error()]))
        self._log_aggregate(server_round, metrics)
        # The round's overhead: all of its wall time that the slowest plant did not spend training.
        wall = time.perf_counter() - self._round_started
        self.tracker.log_metrics({"round_wall_s": wall, "round_overhead_s": wall - self._slowest_train_s}, step=server_round)
        return metrics

    def _log_aggregate(self, server_round: int, metrics: MetricRecord | None) -> None:
        # An average epsilon describes no plant: privacy metrics are logged per plant, and their maximum.
        if metrics is not None:
            self.tracker.log_metrics({k: v for k, v in metrics.items() if k != WEIGHT_KEY and not k.startswith(PRIVACY_PREFIX)}, step=server_round)

    def _record(self, phase: str, server_round: int, replies: list[Message]) -> float:
        """Logs per-plant metrics and the phase's wall time and overhead; returns the slowest plant's work time."""
        wall = time.perf_counter() - self._phase_started
        per_plant: dict[str, float] = {}
        status = []
        slowest = 0.0
        for msg in replies:
            plant = plant_of(msg)
            if msg.has_error():
                status.append(f"FAILED {failure_reason(msg)}")
                continue
            metrics = msg.content[METRICS]
            slowest = max(slowest, float(metrics.get(f"{phase}_time_s", 0.0)))
            per_plant.update({f"{plant}/{k}": float(v) for k, v in metrics.items()})
            shown = " ".join(f"{k}={float(v):.3f}" for k, v in metrics.items() if k.endswith(("loss", "accuracy", "macro_f1")) or k == f"{PRIVACY_PREFIX}epsilon")
            status.append(f"{plant} ok {shown}")
        self.tracker.note_plants([plant_of(m) for m in replies if not m.has_error()])
        epsilons = [v for k, v in per_plant.items() if k.endswith(f"/{PRIVACY_PREFIX}epsilon")]
        if epsilons:
            per_plant[f"{PRIVACY_PREFIX}epsilon_max"] = max(epsilons)
        per_plant[f"round_{phase}_wall_s"] = wall
        per_plant[f"round_{phase}_overhead_s"] = wall - slowest
        self.tracker.log_metrics(per_plant, step=server_round)
        log.info("round %d/%d %s (%.1fs): %s", server_round, self.num_rounds, phase, wall, " | ".join(status) or "no replies")
        return slowest
