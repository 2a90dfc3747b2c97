"""Strategies from the run config, and the wrapper that tracks every round of any of them."""

from __future__ import annotations

import copy
import logging
import re
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian, FedTrimmedAvg, FedYogi, Krum, MultiKrum, Strategy,
)

from fl_server.run.checkpoint import Checkpoint, CheckpointStore, restore_strategy_state, strategy_state
from fl_server.run.config import RunConfig
from fl_server.run.identity import identify, refusal, split_declined
from fl_server.run.tracking import RunTracker
from maxfl.encoding import update_bytes
from maxfl.messages import ARRAYS, EVALUATE_FIRST, EVALUATION, METRICS, PRIVACY_PREFIX, WEIGHT_KEY

log = logging.getLogger("maxfl")


class RunAborted(RuntimeError):
    """Too few plants answered for the run to go on."""


STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad,
    "fedtrimmedavg": FedTrimmedAvg, "fedmedian": FedMedian, "krum": Krum, "multikrum": MultiKrum, "bulyan": Bulyan,
}


def build_strategy(cfg: RunConfig) -> Strategy:
    """Flower's strategy named in the run config, with maxfl's sampling (at least min-plants) and example weights."""
    eta = cfg.server_learning_rate  # 0: keep the class's own default, which differs per optimiser
    f = cfg.num_malicious
    options: dict[str, dict[str, Any]] = {
        "fedavgm": {"server_momentum": cfg.server_momentum} | ({"server_learning_rate": eta} if eta else {}),
        "fedadam": {"beta_1": cfg.server_momentum} | ({"eta": eta} if eta else {}),
        "fedyogi": {"beta_1": cfg.server_momentum} | ({"eta": eta} if eta else {}),
        "fedadagrad": {"eta": eta} if eta else {},
        "fedtrimmedavg": {"beta": cfg.trim_fraction},
        "krum": {"num_malicious_nodes": f},
        "multikrum": {"num_malicious_nodes": f, "num_nodes_to_select": cfg.min_plants - f},
        "bulyan": {"num_malicious_nodes": f},
    }
    return STRATEGIES[cfg.strategy](
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_plants,
        min_evaluate_nodes=cfg.min_plants if cfg.fraction_evaluate > 0 else 0,
        min_available_nodes=cfg.min_plants,
        weighted_by_key=WEIGHT_KEY,
        **options.get(cfg.strategy, {}),
    )


def plant_of(msg: Message) -> str:
    """The plant that sent a reply: its node's plant (fl_server.run.identity), never the id the reply claims."""
    return identify(msg).plant


_FLOWER_EXCEPTION = re.compile(r"^<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>$", re.DOTALL)


_HEAP_ADDRESS = re.compile(r" (?:object )?at 0x[0-9a-fA-F]+>")


def without_addresses(text: str) -> str:
    """`<Foo object at 0x7f..>` -> `<Foo>`: a reason names what failed, never where it lived in some process's heap."""
    return _HEAP_ADDRESS.sub(">", text)


def _unwrapped_reason(msg: Message) -> str:
    reason = msg.error.reason
    if m := _FLOWER_EXCEPTION.match(reason):
        reason = f"{m.group(1)}: {m.group(2)}"
    return without_addresses(reason)


def failure_reason(msg: Message) -> str:
    """A failed reply's reason, named by its node's plant, without Flower's `<class '...'>:<'...'>` wrapping."""
    claimed, why = split_declined(_unwrapped_reason(msg))
    plant = plant_of(msg)
    return f"{plant} declined: {why}" if claimed is not None else f"{plant}: {why}"


def failed_plant(msg: Message) -> tuple[str, str]:
    """(who, why) of a failed reply: the plant that declined (or the node), and its reason."""
    return plant_of(msg), split_declined(_unwrapped_reason(msg))[1]


def evaluation_of(reply: Message) -> Message | None:
    """A train reply's evaluation of the weights it was sent (EVALUATION), taken out of the reply and given as a reply
    of its own (same node and metadata) for the strategy's evaluation aggregation; None if it has none."""
    if reply.has_error() or EVALUATION not in reply.content.metric_records:
        return None
    record = reply.content.metric_records[EVALUATION]
    del reply.content[EVALUATION]  # the strategy's train aggregation takes exactly one MetricRecord per reply
    twin = copy.copy(reply)
    twin.content = RecordDict({METRICS: record})
    return twin


def heard(replies: Iterable[Message]) -> list[Message]:
    """The replies taken from their nodes: not from a node that speaks for no plant (fl_server.run.identity)."""
    return [m for m in replies if refusal(m) is None]


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
    """Wraps a strategy: per-round and per-plant metrics to MLflow (step = round), a progress line, and a
    checkpoint after every completed round (fl_server.run.checkpoint) from which a restarted ServerApp resumes.

    A round's metrics are logged together once the round is complete and checkpointed, so a round cut short by
    a crash is neither half-logged nor logged twice when it is run again. Flower's `Strategy.start` counts
    rounds from 1; after a resume from round k, this wrapper adds k, so every strategy, plant and log sees the
    run's real round. It also stops the run, with the plants' reasons, when fewer than `min_plants` return an
    update.
    """

    def __init__(self, inner: Strategy, tracker: RunTracker, min_plants: int, num_rounds: int, evaluate_every: int = 1,
                 checkpoints: CheckpointStore | None = None, fold_evaluation: bool = False) -> None:
        self.inner = inner
        self.evaluate_every = evaluate_every
        self.fold_evaluation = fold_evaluation
        self.tracker = tracker
        self.min_plants = min_plants
        self.num_rounds = num_rounds
        self.checkpoints = checkpoints
        self.offset = 0  # rounds completed before this ServerApp started (resume)
        self._arrays = ArrayRecord()
        self._pending: dict[str, float] = {}
        self._rejected: set[str] = set()
        self._round_started = 0.0
        self._phase_started = 0.0
        self._slowest_train_s = 0.0
        self._first_started: float | None = None  # this ServerApp's first round: the ETA's clock
        self._eta = ""
        self._folded = False  # this round's train message asks the plants to evaluate the previous round's model first
        self._earlier: dict[str, float] = {}  # that evaluation's metrics: logged at step = this round - 1

    def resume(self, checkpoint: Checkpoint) -> ArrayRecord:
        """Continue after `checkpoint`: restore the strategy's state, make sure its round is logged, and return
        the arrays to start from. `Strategy.start` then runs the remaining `num_rounds - offset` rounds."""
        restore_strategy_state(self.inner, checkpoint.state)
        self.offset = checkpoint.server_round
        self.tracker.ensure_logged(checkpoint.earlier, step=checkpoint.server_round - 1)
        self.tracker.ensure_logged(checkpoint.metrics, step=checkpoint.server_round)
        return checkpoint.arrays

    def summary(self) -> None:
        self.inner.summary()

    def note(self, metrics: dict[str, float]) -> None:
        """Metrics of the current round, logged with the rest of it once it completes (e.g. rejected updates)."""
        self._pending |= metrics

    def reject(self, plant: str) -> None:
        """This round's update of `plant` was not used (update validation): it does not count as a contributor."""
        self._rejected.add(plant)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._round_started = self._phase_started = time.perf_counter()
        if self._first_started is None:
            self._first_started = self._round_started
        elif server_round > 1:  # the rounds this ServerApp completed set the pace of the rest
            per_round = (self._round_started - self._first_started) / (server_round - 1)
            self._eta = f"; about {per_round * (self.num_rounds - self.offset - server_round + 1):.0f} s left"
        self._arrays = arrays
        self._pending = {"model_bytes": float(update_bytes(arrays))}  # what a plant's fp32 update would take
        self._rejected: set[str] = set()
        real = server_round + self.offset
        self._folded, self._earlier = real > 1 and self.folds(real - 1), {}
        if self._folded:
            config = ConfigRecord({**config, EVALUATE_FIRST: True})
        return self.inner.configure_train(real, arrays, config, grid)

    def evaluates(self, server_round: int) -> bool:
        """Federated evaluation every `evaluate_every` rounds, and always of the final model (real rounds)."""
        return server_round % self.evaluate_every == 0 or server_round == self.num_rounds

    def folds(self, server_round: int) -> bool:
        """Round `server_round`'s model is evaluated by the plants when the next train message brings it, before they train
        on it: the exchange of its own is saved. The final model has no next message: it is evaluated on its own."""
        return self.fold_evaluation and server_round < self.num_rounds and self.evaluates(server_round)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._phase_started = time.perf_counter()
        real = server_round + self.offset
        if not self.evaluates(real) or self.folds(real):
            return []
        return self.inner.configure_evaluate(real, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        real = server_round + self.offset
        replies = list(replies)
        evaluations = [evaluation_of(m) for m in replies] if self._folded else []
        self._slowest_train_s = self._record("train", real, replies)
        if self._folded:  # the previous round's evaluation came with these replies
            self._record("eval", real - 1, [m for m in evaluations if m is not None], into=self._earlier, timed=False)
            ok = [m for m in heard([m for m in evaluations if m is not None]) if not m.has_error()]
            self._log_aggregate(self.inner.aggregate_evaluate(real - 1, keep_common_metrics(ok)), into=self._earlier)
        refused = [f"{plant_of(m)}: {refusal(m)}" for m in replies if refusal(m) is not None]
        replies = heard(replies)
        ok = [m for m in replies if not m.has_error()]
        if len(ok) < self.min_plants:
            reasons = "; ".join([failure_reason(m) for m in replies if m.has_error()] + refused) or "no replies"
            raise RunAborted(f"round {real}: {len(ok)} plant(s) returned an update, {self.min_plants} needed ({reasons})")
        arrays, metrics = self.inner.aggregate_train(real, keep_common_metrics(ok))
        self.tracker.note_plants([p for p in map(plant_of, ok) if p not in self._rejected])  # the model's contributors
        if arrays is not None:
            self._arrays = arrays
        self._log_aggregate(metrics)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        real = server_round + self.offset
        replies = list(replies)
        metrics = None
        if self.evaluates(real) and not self.folds(real):
            self._record("eval", real, replies)
            metrics = self.inner.aggregate_evaluate(real, keep_common_metrics([m for m in heard(replies) if not m.has_error()]))
            self._log_aggregate(metrics)
        self._finish_round(real)
        return metrics

    def _finish_round(self, real: int) -> None:
        """The round is complete: checkpoint it (the commit point), then log its metrics in one batch."""
        # The round's overhead: all of its wall time that the slowest plant did not spend training.
        wall = time.perf_counter() - self._round_started
        self._pending |= {"round_wall_s": wall, "round_overhead_s": wall - self._slowest_train_s}
        metrics = {k: float(v) for k, v in self._pending.items()}
        earlier = {k: float(v) for k, v in self._earlier.items()}
        if self.checkpoints is not None:
            self.checkpoints.save(Checkpoint(real, self._arrays, metrics, strategy_state(self.inner), earlier))
        if earlier:
            self.tracker.log_metrics(earlier, step=real - 1)
        self.tracker.log_metrics(metrics, step=real)

    def _log_aggregate(self, metrics: MetricRecord | None, into: dict[str, float] | None = None) -> None:
        # An average epsilon describes no plant: privacy metrics are logged per plant, and their maximum.
        if metrics is not None:
            target = self._pending if into is None else into
            target |= {k: float(v) for k, v in metrics.items() if k != WEIGHT_KEY and not k.startswith(PRIVACY_PREFIX)}

    def _record(self, phase: str, server_round: int, replies: list[Message], into: dict[str, float] | None = None,
                timed: bool = True) -> float:
        """Notes per-plant metrics (in this round's, or `into`) and, if `timed`, the phase's wall time and overhead (a folded
        evaluation has no phase of its own); returns the slowest plant's work time."""
        wall = time.perf_counter() - self._phase_started
        per_plant: dict[str, float] = {}
        status = []
        slowest = 0.0
        for msg in replies:
            plant = plant_of(msg)
            if (why_not := refusal(msg)) is not None:
                status.append(f"REFUSED {plant}: {why_not}")
                self.tracker.audit_event("reply.refused", round=server_round, phase=phase, plant=plant,
                                         node_id=msg.metadata.src_node_id, reason=why_not)
                continue
            if msg.has_error():
                status.append(f"FAILED {failure_reason(msg)}")
                who, why = failed_plant(msg)
                self.tracker.audit_event("plant.failed", round=server_round, phase=phase, plant=who, reason=why)
                continue
            metrics = msg.content[METRICS]
            slowest = max(slowest, float(metrics.get(f"{phase}_time_s", 0.0)))
            per_plant.update({f"{plant}/{k}": float(v) for k, v in metrics.items()})
            if ARRAYS in msg.content.array_records:  # as it came, before decoding (maxfl.encoding)
                per_plant[f"{plant}/update_bytes"] = float(update_bytes(msg.content[ARRAYS]))
            shown = " ".join(f"{k}={float(v):.3f}" for k, v in metrics.items() if k.endswith(("loss", "accuracy", "macro_f1")) or k == f"{PRIVACY_PREFIX}epsilon")
            status.append(f"{plant} ok {shown}")
        epsilons = [v for k, v in per_plant.items() if k.endswith(f"/{PRIVACY_PREFIX}epsilon")]
        if epsilons:
            per_plant[f"{PRIVACY_PREFIX}epsilon_max"] = max(epsilons)
        if timed:
            per_plant[f"round_{phase}_wall_s"] = wall
            per_plant[f"round_{phase}_overhead_s"] = wall - slowest
        (self._pending if into is None else into).update(per_plant)
        when = f"{wall:.1f}s{self._eta if phase == 'train' else ''}" if timed else f"with round {server_round + 1}'s train message"
        log.info("round %d/%d %s (%s): %s", server_round, self.num_rounds, phase, when, " | ".join(status) or "no replies")
        return slowest
