"""Every plant's update is checked before any strategy sees it: a bad one is dropped, never aggregated.

A broken plant (a diverged optimiser, a disk error, a bad build) or a hostile one can send weights that are
the wrong shape, NaN, or scaled to drag the average wherever it likes. `ValidatedStrategy` wraps any strategy
(composition, like Flower's DP wrappers) and lets through only updates that have the global model's arrays
(same keys, shapes, dtypes), finite values, a positive example weight and an update norm within bounds:

- absolute: `max-update-norm` bounds ||reply - global|| (L2 over all arrays); 0 turns it off. Off by default:
  a sensible value depends on the model's size, the learning rate and the local steps, which the relative
  bounds follow by themselves;
- relative: `update-norm-factor` rejects an update larger than factor x the reference norm: the median of this
  round's update norms together with the previous rounds' medians (up to `NORM_HISTORY`). With two plants in
  round 1 there is no history and the median of two is their mean, which a hostile update would set itself:
  there the reference is the smaller of the two. So the bound holds with two plants from the first round on;
- persistent: a plant whose update is above `persistent-norm-factor` x the reference in `persistent-norm-rounds`
  consecutive rounds is rejected, so a plant cannot stay just under the relative bound round after round.

A plant's example weight (`num-examples`) is what FedAvg weighs it by; a plant may not claim more than the
training records it declared in the data agreement (`agreed_examples`): a larger claim is capped (and reported),
so no value near 1e308 can overflow the weighted sum or outweigh the other plants.

What validation does not catch, a robust strategy (trimmed mean, median, Krum; `strategy` in the run config)
bounds: an update of ordinary size that points the wrong way. The aggregate itself is checked again (finite,
the model's shape) before it becomes the next global model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from pydantic import BaseModel, ConfigDict, Field

from fl_server.run.config import RunConfig
from fl_server.run.identity import refusal
from fl_server.run.strategy import RunAborted, plant_of
from maxfl.messages import ARRAYS, WEIGHT_KEY

log = logging.getLogger("maxfl")

RejectHook = Callable[[int, str, str], None]  # (round, plant, one-line reason)
SpendHook = Callable[[int, str, Message], "str | None"]  # (round, plant, reply) -> why its privacy report is refused, or None
CapHook = Callable[[int, str, float, int], None]  # (round, plant, claimed num-examples, agreed training records)
MIN_REPLIES_FOR_MEDIAN = 3  # with two updates the "median" is their mean: a hostile one would set its own bar
NORM_HISTORY = 5  # previous rounds' median update norms the relative bound also counts


class UpdateRules(BaseModel):
    """The bounds an update must keep; 0 turns a bound off."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_update_norm: float = Field(0.0, ge=0.0)
    norm_factor: float = Field(10.0, ge=0.0)
    persistent_factor: float = Field(5.0, ge=0.0)
    persistent_rounds: int = Field(3, ge=1)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> UpdateRules:
        return cls(max_update_norm=cfg.max_update_norm, norm_factor=cfg.update_norm_factor,
                   persistent_factor=cfg.persistent_norm_factor, persistent_rounds=cfg.persistent_norm_rounds)


def reference_norm(norms: list[float], history: list[float]) -> tuple[float, str]:
    """The norm an update is compared with, and how it was found (for the rejection's reason).

    The median of this round's norms and the previous rounds' medians; with fewer than three values in all
    (two plants, round 1) the smallest, since the median of two is their mean and a hostile update sets it.
    """
    values = [n for n in norms + history if math.isfinite(n)]
    if not values:
        return 0.0, ""
    if len(values) < MIN_REPLIES_FOR_MEDIAN:
        return min(values), "the round's smaller update norm" if len(values) == 2 else "the round's only update norm"
    if not history:
        return float(np.median(values)), "the round's median"
    return float(np.median(values)), f"the median of this round's norms and the last {len(history)} round(s)' medians"


def log_capped(server_round: int, plant: str, claimed: float, agreed: int) -> None:
    log.warning("round %d: %s claims %s examples but declared %d training records in the data agreement; weighted by %d",
                server_round, plant, f"{claimed:.4g}", agreed, agreed)


def log_rejection(server_round: int, plant: str, reason: str) -> None:
    log.warning("round %d: %s's update rejected: %s", server_round, plant, reason)


def _array_problem(key: str, arr: np.ndarray, sent: np.ndarray, check_dtype: bool = True) -> str | None:
    if check_dtype and arr.dtype != sent.dtype:
        return f"array '{key}' has dtype {arr.dtype}, expected {sent.dtype}"
    if arr.shape != sent.shape:
        return f"array '{key}' has shape {arr.shape}, expected {sent.shape}"
    if np.issubdtype(arr.dtype, np.inexact) and (bad := arr.size - int(np.count_nonzero(np.isfinite(arr)))):
        return f"array '{key}' has {bad} non-finite value{'s' if bad != 1 else ''}"
    return None


def _record_problem(content: RecordDict, sent: dict[str, np.ndarray]) -> str | None:
    """What makes a reply's records unusable to any strategy (Flower would stop the whole round on some of them)."""
    array_records = list(content.array_records)
    if array_records != [ARRAYS]:
        return f"expected one ArrayRecord '{ARRAYS}', got {array_records or 'none'}"
    metric_records = list(content.metric_records.values())
    if len(metric_records) != 1:
        return f"expected one MetricRecord, got {len(metric_records)}"
    weight = metric_records[0].get(WEIGHT_KEY)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
        return f"metric '{WEIGHT_KEY}' is {weight!r}, not a positive number"
    keys = list(content[ARRAYS].keys())
    if missing := [k for k in sent if k not in keys]:
        return f"array '{missing[0]}' is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    if unexpected := [k for k in keys if k not in sent]:
        return f"array '{unexpected[0]}' is not in the global model"
    if keys != list(sent):
        return "arrays come in a different order than the global model's"
    return None


def check_update(content: RecordDict, sent: dict[str, np.ndarray]) -> tuple[str | None, float]:
    """(why the update is unusable, or None; its L2 norm against the global arrays `sent`)."""
    if problem := _record_problem(content, sent):
        return problem, math.nan
    squared = 0.0
    for key, array in content[ARRAYS].items():
        try:
            arr = array.numpy()
        except (ValueError, TypeError, OSError) as exc:
            return f"array '{key}' cannot be read ({exc})", math.nan
        if problem := _array_problem(key, arr, sent[key]):
            return problem, math.nan
        if np.issubdtype(arr.dtype, np.number):
            squared += float(np.sum(np.square(arr.astype(np.float64) - sent[key].astype(np.float64))))
    return None, math.sqrt(squared)


class ValidatedStrategy(Strategy):
    """Wraps a strategy: only valid updates reach it, and its aggregate must be finite and model-shaped.

    Invalid replies are dropped and reported through `on_reject(round, plant, reason)` (default: a warning in
    the ServerApp's log). Fewer than `min_plants` valid updates stop the run with every rejected plant's reason.
    """

    def __init__(self, inner: Strategy, rules: UpdateRules, min_plants: int, on_reject: RejectHook | None = None,
                 agreed_examples: Mapping[str, int] | None = None, on_cap: CapHook | None = None,
                 check_spend: SpendHook | None = None) -> None:
        self.inner = inner
        self.rules = rules
        self.min_plants = min_plants
        self.on_reject = on_reject if on_reject is not None else log_rejection
        # Training records per plant from the data agreement; None: no agreement (example weights are not capped).
        self.agreed_examples = dict(agreed_examples) if agreed_examples is not None else None
        self.on_cap = on_cap if on_cap is not None else log_capped
        # Whether the plant's reported lifetime privacy spend went down (fl_server.run.privacy_watch); None: not checked.
        self.check_spend = check_spend
        self._sent: dict[str, np.ndarray] | None = None
        # The last round's update norm per plant (well-formed updates only), for tracking and for choosing bounds.
        self.update_norms: dict[str, float] = {}
        self.norm_history: list[float] = []  # previous rounds' reference norms of accepted updates, oldest first
        self.norm_streaks: dict[str, int] = {}  # plant -> consecutive rounds above persistent_factor x the reference

    def summary(self) -> None:
        relative = f"{self.rules.norm_factor:g} x the median (this round and the last {NORM_HISTORY})" if self.rules.norm_factor else "off"
        log.info("update validation: keys, shapes, dtypes, finite values; update norm bound %s, relative bound %s",
                 f"{self.rules.max_update_norm:g}" if self.rules.max_update_norm else "off", relative)
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        # A copy: what the plants received is the reference, whatever the strategy later does with its record.
        self._sent = {key: np.array(array.numpy(), copy=True) for key, array in arrays.items()}
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._sent is None:
            raise RuntimeError("aggregate_train before configure_train: no global arrays to validate updates against")
        replies = list(replies)
        failed = [m for m in replies if m.has_error()]  # the inner strategy logs those as it always does
        rejected: list[tuple[str, str]] = []
        checked: list[tuple[Message, float]] = []
        for msg in (m for m in replies if not m.has_error()):
            problem, norm = refusal(msg), math.nan
            if problem is None:
                problem, norm = check_update(msg.content, self._sent)
            if problem:
                rejected.append((plant_of(msg), problem))
            else:
                checked.append((msg, norm))
        self.update_norms = {plant_of(msg): norm for msg, norm in checked}
        valid = []
        reference, basis = reference_norm([n for _, n in checked], self.norm_history[-NORM_HISTORY:])
        rules = self.rules
        for msg, norm in checked:
            plant = plant_of(msg)
            streak = self.norm_streaks.get(plant, 0) + 1 if rules.persistent_factor and reference > 0 and norm > rules.persistent_factor * reference else 0
            self.norm_streaks[plant] = streak
            if rules.max_update_norm and norm > rules.max_update_norm:
                rejected.append((plant, f"update norm {norm:.4g} exceeds max-update-norm {rules.max_update_norm:g}"))
            elif rules.norm_factor and reference > 0 and norm > rules.norm_factor * reference:
                rejected.append((plant, f"update norm {norm:.4g} exceeds {rules.norm_factor:g} x {basis} {reference:.4g}"))
            elif streak >= rules.persistent_rounds:
                rejected.append((plant, f"update norm {norm:.4g} is {norm / reference:.1f} x {basis} {reference:.4g}, above "
                                        f"{rules.persistent_factor:g} x in {streak} consecutive rounds (persistent-norm-rounds {rules.persistent_rounds})"))
            elif self.check_spend is not None and (problem := self.check_spend(server_round, plant, msg)) is not None:
                rejected.append((plant, problem))
            elif (problem := self._cap_weight(server_round, plant, msg)) is not None:
                rejected.append((plant, problem))
            else:
                valid.append(msg)
        accepted = [self.update_norms[plant_of(m)] for m in valid]
        if accepted:
            self.norm_history.append(reference_norm(accepted, [])[0])
        for plant, reason in rejected:
            self.on_reject(server_round, plant, reason)
        if len(valid) < self.min_plants:
            reasons = "; ".join(f"{plant}: {reason}" for plant, reason in rejected) or "none rejected"
            raise RunAborted(f"round {server_round}: {len(valid)} plant(s) sent a valid update, {self.min_plants} needed (rejected: {reasons})")
        arrays, metrics = self.inner.aggregate_train(server_round, valid + failed)
        if arrays is not None:
            arrays = self._settle_aggregate(server_round, arrays, len(valid))
        return arrays, metrics

    def _cap_weight(self, server_round: int, plant: str, msg: Message) -> str | None:
        """Cap the reply's example weight at the plant's agreed training records; why it cannot be used, or None."""
        if self.agreed_examples is None:
            return None
        agreed = self.agreed_examples.get(plant)
        if agreed is None:
            return "this plant took no part in the run's data agreement"
        if agreed <= 0:
            return "this plant declared no training records in the data agreement"
        metrics = next(iter(msg.content.metric_records.values()))
        claimed = float(metrics[WEIGHT_KEY])  # type: ignore[arg-type]
        if claimed > agreed:
            metrics[WEIGHT_KEY] = agreed
            self.on_cap(server_round, plant, claimed, agreed)
        return None

    def _settle_aggregate(self, server_round: int, arrays: ArrayRecord, num_valid: int) -> ArrayRecord:
        """Defence in depth: a strategy's own arithmetic (or a wrapper's noise) must not break the model.

        The aggregate goes out in the global model's dtypes: server optimisers compute in float64, and plants,
        which pack float32, would otherwise all fail the next round's dtype check.
        """
        assert self._sent is not None
        keys = list(arrays.keys())
        if keys != list(self._sent):
            problem: str | None = f"arrays {keys}, expected {list(self._sent)}"
        else:
            problem = next((p for key in keys if (p := _array_problem(key, arrays[key].numpy(), self._sent[key], check_dtype=False))), None)
        if problem:
            raise RunAborted(f"round {server_round}: the aggregate of {num_valid} valid update(s) is unusable ({problem}); "
                             f"the run stopped before it became the global model")
        if all(arrays[key].dtype == str(sent.dtype) for key, sent in self._sent.items()):
            return arrays
        return ArrayRecord({key: Array(arrays[key].numpy().astype(sent.dtype)) for key, sent in self._sent.items()})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
