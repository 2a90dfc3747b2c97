"""What each plant's data bought in a run: leave-one-out and Shapley values per round, summed over the rounds.

A round is a game between the plants whose updates the strategy aggregated in it. The utility v(S) of a subset S is
the score of the model FedAvg would have built from S's updates alone: the example-weighted mean of their trained
weights (the round's global model plus the weighted mean of their updates; the global model itself for the empty
set). No plant retrains: every sub-federation model is rebuilt from updates the anchor already received
(GTG-Shapley, Liu et al. 2022, "GTG-Shapley: Efficient and Accurate Participant Contribution Evaluation in
Federated Learning"). The score is the plants' federated evaluation of the rebuilt models (fl_server.run.contribution_round).

- leave-one-out: v(N) - v(N without i), per round;
- Shapley: i's marginal gain v(S + i) - v(S), averaged over every order in which the round's plants could join.
  Exact over all 2^n subsets when a round has few plants; otherwise sampled over permutations, guided (each plant
  leads equally many) and truncated within the round: once a prefix scores within `truncation` of v(N), the plants
  after it share the small rest equally instead of being evaluated;
- between rounds: a round whose whole improvement |v(N) - v(empty)| is below `truncation` is worth 0 to everyone.

Efficiency holds in every valued round, exact or sampled: the plants' values sum to v(N) - v(empty). This module is
pure (arrays, weights and a `Utility`); tests give it crafted utilities with known answers.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

CONTRIBUTION_JSON = "contribution/contributions.json"  # the report in the run's MLflow artifacts (the federation page reads it)
CONTRIBUTION_TAG = "maxfl.contribution"  # the run's one-line summary, or why contributions were not computed

Coalition = tuple[int, frozenset[str]]  # (round, the plants whose updates make the model)
RoundStatus = Literal["exact", "sampled", "loo", "single", "truncated", "over-budget"]


class ContributionError(RuntimeError):
    """Contributions cannot be computed (no plant scored the models); the run goes on without them."""


@dataclass(frozen=True)
class RoundUpdates:
    """One round as the strategy aggregated it: the global model sent, and each contributor's trained weights."""

    round: int
    global_model: np.ndarray  # (d,) float32: v(empty)
    plants: tuple[str, ...]  # in the order the strategy aggregated them (FedAvg's sum is order-sensitive in float32)
    models: np.ndarray  # (len(plants), d) float32, row k = plants[k]'s returned weights (possibly memory-mapped)
    weights: tuple[float, ...]  # each plant's example weight, as aggregated (capped by the data agreement)


def reconstruct(updates: RoundUpdates, members: Iterable[str]) -> np.ndarray:
    """The model FedAvg builds from `members`' updates alone: sum of w_k x n_k / sum(n), in float32, in aggregation order.

    Computed exactly as Flower's `aggregate_arrayrecords` does, so the full set's model is bit-identical to the next
    round's global model under FedAvg, and the two are evaluated once.
    """
    chosen = set(members)
    if unknown := chosen - set(updates.plants):
        raise ValueError(f"round {updates.round}: {sorted(unknown)} sent no update in it")
    rows = [k for k, plant in enumerate(updates.plants) if plant in chosen]
    if not rows:
        return np.array(updates.global_model, dtype=np.float32, copy=True)
    total = sum(updates.weights[k] for k in rows)
    out: np.ndarray | None = None
    for k in rows:
        term = np.asarray(updates.models[k]) * (updates.weights[k] / total)  # float32 x Python float stays float32
        out = term if out is None else np.add(out, term, out=out)
    assert out is not None
    return out


class Utility(Protocol):
    """Scores coalitions' models; identical models share a key and are scored once."""

    def model_key(self, coalition: Coalition) -> Hashable: ...

    def is_evaluated(self, key: Hashable) -> bool: ...

    def evaluate(self, coalitions: Sequence[Coalition]) -> None:
        """Score every coalition not scored yet, in one exchange."""
        ...

    def value(self, coalition: Coalition) -> float: ...


@dataclass(frozen=True)
class PlantScores:
    """One evaluator's scores of a batch of models (higher is better), and its weight in the utility."""

    scores: Sequence[float]
    examples: float


class ReconstructedUtility:
    """v(S) of the models rebuilt from each round's updates, scored by `score` (stacked models -> scores per evaluator).

    The utility is the example-weighted mean over the evaluators that scored every batch with finite values; one that
    misses a batch or returns a non-finite score drops out of every value (named in `dropped`), so all values stay
    comparable. Identical models (FedAvg's full set of round t is round t+1's global model) are scored once.
    """

    def __init__(self, rounds: Mapping[int, RoundUpdates], score: ScoreBatch) -> None:
        self.rounds = rounds
        self.score = score
        self.exchanges = 0
        self.dropped: dict[str, str] = {}  # evaluator -> why its scores are not used
        self._keys: dict[Coalition, str] = {}
        self._scores: dict[str, dict[str, float]] = {}  # model key -> evaluator -> score
        self._weights: dict[str, float] = {}
        self._evaluators: list[str] | None = None

    @property
    def models_evaluated(self) -> int:
        return len(self._scores)

    def model_key(self, coalition: Coalition) -> str:
        if (key := self._keys.get(coalition)) is None:
            model = reconstruct(self.rounds[coalition[0]], coalition[1])
            key = self._keys[coalition] = hashlib.sha256(model.tobytes()).hexdigest()
        return key

    def is_evaluated(self, key: Hashable) -> bool:
        return key in self._scores

    def evaluate(self, coalitions: Sequence[Coalition]) -> None:
        models: dict[str, Coalition] = {}  # key -> one coalition that builds it (rebuilt here, not kept since keying)
        for coalition in coalitions:
            if (key := self.model_key(coalition)) not in self._scores:
                models.setdefault(key, coalition)
        if not models:
            return
        keys = list(models)
        stack = np.stack([reconstruct(self.rounds[c[0]], c[1]) for c in models.values()])
        self.exchanges += 1
        answers = dict(self.score(stack))
        for key in keys:
            self._scores[key] = {}
        for plant, got in answers.items():
            if len(got.scores) != len(keys):
                self.dropped.setdefault(plant, f"returned {len(got.scores)} scores for {len(keys)} models")
                continue
            if not all(math.isfinite(s) for s in got.scores):
                self.dropped.setdefault(plant, "returned non-finite scores")
            if not (math.isfinite(got.examples) and got.examples > 0):
                self.dropped.setdefault(plant, f"reported {got.examples} held-out examples")
            self._weights[plant] = got.examples
            for key, s in zip(keys, got.scores, strict=True):
                self._scores[key][plant] = float(s)
        first = self._evaluators is None
        answered = set(answers) - set(self.dropped)
        if first:
            self._evaluators = sorted(answered)
        for plant in set(self._evaluators or []) - answered:
            self.dropped.setdefault(plant, f"did not answer exchange {self.exchanges}")
        for plant in answered - set(self._evaluators or []):
            self.dropped.setdefault(plant, f"missed an earlier exchange (first answered exchange {self.exchanges})")
        self._evaluators = [p for p in (self._evaluators or []) if p not in self.dropped]

    @property
    def evaluators(self) -> list[str]:
        return list(self._evaluators or [])

    def value(self, coalition: Coalition) -> float:
        scores = self._scores[self.model_key(coalition)]
        plants = self.evaluators
        total = sum(self._weights[p] for p in plants)
        if not plants or total <= 0:
            raise ContributionError("no plant scored every model: " + ("; ".join(f"{p} {why}" for p, why in sorted(self.dropped.items())) or "no answers"))
        return sum(scores[p] * self._weights[p] for p in plants) / total


class ScoreBatch(Protocol):
    def __call__(self, models: np.ndarray) -> Mapping[str, PlantScores]: ...


class ContributionSettings(BaseModel):
    """How contributions are computed (the run config's contribution-* keys)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["auto", "shapley", "loo"] = "auto"  # auto: Shapley and leave-one-out
    exact_max_plants: int = Field(6, ge=1, le=12)  # rounds with at most this many plants: exact over all 2^n subsets
    max_models: int = Field(2000, ge=1)  # distinct rebuilt models evaluated, at most
    truncation: float = Field(1e-3, ge=0.0)  # in utility units: between- and within-round truncation
    tolerance: float = Field(0.05, gt=0.0)  # sampling stops once a batch moves a round's values by less than this, relatively
    max_batches: int = Field(10, ge=1)  # batches of guided permutations per round (each: one permutation per plant)
    waves: int = Field(4, ge=1)  # exchanges per batch: the granularity of the within-round truncation
    seed: int = 0

    @property
    def shapley(self) -> bool:
        return self.method in ("auto", "shapley")

    @property
    def loo(self) -> bool:
        return self.method in ("auto", "loo")


class RoundValues(BaseModel):
    """One round's values: per contributing plant, summing (Shapley) to v_all - v_empty when the round is valued."""

    round: int
    plants: list[str]
    status: RoundStatus
    v_empty: float | None = None
    v_all: float | None = None
    shapley: dict[str, float] = Field(default_factory=dict)  # empty: not computed (over budget, or method loo)
    loo: dict[str, float] = Field(default_factory=dict)
    permutations: int = 0  # sampled rounds: permutations walked

    @property
    def gain(self) -> float | None:
        return None if self.v_all is None or self.v_empty is None else self.v_all - self.v_empty


@dataclass
class _Walk:
    """One permutation of one round, evaluated prefix by prefix until it comes within the truncation of v(N)."""

    round: int
    order: tuple[str, ...]
    reached: int = 0  # the longest prefix evaluated
    stop: int | None = None  # the truncation point: prefixes after it are not evaluated (len(order): none truncated)

    def prefix(self, k: int) -> Coalition:
        return (self.round, frozenset(self.order[:k]))


@dataclass
class _Budget:
    utility: Utility
    left: int
    planned: set[Hashable] = field(default_factory=set)

    def fits(self, coalitions: Iterable[Coalition]) -> bool:
        """Reserve the new models of `coalitions` if they fit what is left; all or nothing."""
        new = {k for k in map(self.utility.model_key, coalitions) if not self.utility.is_evaluated(k) and k not in self.planned}
        if len(new) > self.left:
            return False
        self.planned |= new
        self.left -= len(new)
        return True

    def settle(self) -> None:
        """Give back what was reserved but not evaluated (walks truncated before those prefixes)."""
        unused = {k for k in self.planned if not self.utility.is_evaluated(k)}
        self.planned -= unused
        self.left += len(unused)


def _subsets(game: RoundUpdates) -> list[Coalition]:
    """Every proper non-empty subset of the round's plants."""
    n = len(game.plants)
    return [(game.round, frozenset(c)) for size in range(1, n) for c in combinations(game.plants, size)]


def _ends(game: RoundUpdates) -> list[Coalition]:
    return [(game.round, frozenset()), (game.round, frozenset(game.plants))]


def _loo_sets(game: RoundUpdates) -> list[Coalition]:
    everyone = frozenset(game.plants)
    return [(game.round, everyone - {p}) for p in game.plants]


def exact_shapley(plants: Sequence[str], value: _Value) -> dict[str, float]:
    """sum over S not holding i of |S|! (n - |S| - 1)! / n! x (v(S + i) - v(S))."""
    n = len(plants)
    out = {}
    for p in plants:
        others = [q for q in plants if q != p]
        total = 0.0
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            total += weight * sum(value(frozenset(s) | {p}) - value(frozenset(s)) for s in combinations(others, size))
        out[p] = total
    return out


def leave_one_out(plants: Sequence[str], value: _Value) -> dict[str, float]:
    everyone = frozenset(plants)
    return {p: value(everyone) - value(everyone - {p}) for p in plants}


class _Value(Protocol):
    def __call__(self, members: frozenset[str]) -> float: ...


def _marginals(walk: _Walk, value: _Value) -> dict[str, float]:
    """A walk's marginal gains; after its truncation point, the plants left share v(N) - v(prefix) equally.

    So the gains of every walk sum to v(N) - v(empty) exactly, truncated or not."""
    n = len(walk.order)
    stop = walk.stop if walk.stop is not None else walk.reached
    out: dict[str, float] = {}
    previous = value(frozenset())
    for k in range(1, stop + 1):
        current = value(frozenset(walk.order[:k]))
        out[walk.order[k - 1]] = current - previous
        previous = current
    if stop < n:
        rest = (value(frozenset(walk.order)) - previous) / (n - stop)
        out |= {p: rest for p in walk.order[stop:]}
    return out


def _guided(game: RoundUpdates, batch: int, seed: int) -> list[tuple[str, ...]]:
    """One permutation per plant, that plant first, the others shuffled (GTG-Shapley's guided sampling)."""
    rng = np.random.default_rng([seed, game.round, batch])
    orders = []
    for lead in game.plants:
        others = [p for p in game.plants if p != lead]
        orders.append((lead, *(others[i] for i in rng.permutation(len(others)))))
    return orders


def _mean_marginals(walks: list[_Walk], value: _Value, plants: Sequence[str]) -> dict[str, float]:
    sums = dict.fromkeys(plants, 0.0)
    for walk in walks:
        for p, gain in _marginals(walk, value).items():
            sums[p] += gain
    return {p: s / len(walks) for p, s in sums.items()}


def _run_walks(walks: list[_Walk], utility: Utility, truncation: float, waves: int) -> None:
    """Advance the walks together, a chunk of prefix positions per exchange, until each is truncated or complete."""
    while True:
        wanted: list[Coalition] = []
        for walk in walks:
            if walk.stop is not None:
                continue
            n = len(walk.order)
            chunk = max(1, math.ceil((n - 1) / waves))
            wanted += [walk.prefix(k) for k in range(walk.reached + 1, min(walk.reached + chunk, n - 1) + 1)]
        if not wanted:
            return
        utility.evaluate(wanted)
        for walk in walks:
            if walk.stop is not None:
                continue
            n = len(walk.order)
            v_all = utility.value(walk.prefix(n))
            chunk = max(1, math.ceil((n - 1) / waves))
            for k in range(walk.reached + 1, min(walk.reached + chunk, n - 1) + 1):
                walk.reached = k
                if abs(v_all - utility.value(walk.prefix(k))) < truncation:
                    walk.stop = k
                    break
            if walk.stop is None and walk.reached >= n - 1:
                walk.stop = n


def estimate(games: Sequence[RoundUpdates], utility: Utility, settings: ContributionSettings) -> list[RoundValues]:
    """Leave-one-out and Shapley values of every round's plants, within `settings.max_models` evaluated models.

    Exchanges: one when every round is exact (or the method is leave-one-out) and all fits the cap; otherwise the
    rounds' v(N) and v(empty) first, then exact subsets and leave-one-out sets together, then permutation batches.
    """
    budget = _Budget(utility, settings.max_models)
    games = sorted(games, key=lambda g: g.round)
    exact_all = settings.shapley and all(len(g.plants) <= settings.exact_max_plants for g in games)
    one_shot: list[Coalition] = []
    for g in games:
        one_shot += _ends(g) + (_subsets(g) if exact_all else _loo_sets(g) if settings.loo else [])
    if (exact_all or not settings.shapley) and budget.fits(one_shot):
        utility.evaluate(one_shot)
        return [_valued(g, utility, settings, "exact" if settings.shapley else "loo") for g in games]

    valued = [g for g in games if budget.fits(_ends(g))]  # earliest rounds first: where most of the learning happens
    utility.evaluate([c for g in valued for c in _ends(g)])
    out = {g.round: RoundValues(round=g.round, plants=list(g.plants), status="over-budget") for g in games}
    counted: list[RoundUpdates] = []
    for g in valued:
        v_empty, v_all = utility.value(_ends(g)[0]), utility.value(_ends(g)[1])
        if len(g.plants) == 1 or abs(v_all - v_empty) < settings.truncation:
            out[g.round] = _valued(g, utility, settings, "single" if len(g.plants) == 1 else "truncated")
        else:
            counted.append(g)
            out[g.round] = RoundValues(round=g.round, plants=list(g.plants), status="over-budget", v_empty=v_empty, v_all=v_all)
    # The rounds that moved the model most get the budget first.
    counted.sort(key=lambda g: -abs(utility.value(_ends(g)[1]) - utility.value(_ends(g)[0])))
    exact = [g for g in counted if settings.shapley and len(g.plants) <= settings.exact_max_plants and budget.fits(_subsets(g))]
    with_loo = [g for g in counted if g in exact or (settings.loo and budget.fits(_loo_sets(g)))]
    utility.evaluate([c for g in exact for c in _subsets(g)] + [c for g in with_loo if g not in exact for c in _loo_sets(g)])
    for g in counted:
        values = out[g.round]
        if g in exact:
            out[g.round] = _valued(g, utility, settings, "exact")
        elif g in with_loo:
            values.loo = leave_one_out(g.plants, _of(utility, g.round))
            values.status = "loo" if not settings.shapley else values.status
    sampled = [g for g in counted if settings.shapley and g not in exact]
    for g, (walks, _) in _sample(sampled, utility, settings, budget).items():
        if walks:
            out[g].shapley = _mean_marginals(walks, _of(utility, g), out[g].plants)
            out[g].status, out[g].permutations = "sampled", len(walks)
    return [out[g.round] for g in games]


def _sample(games: list[RoundUpdates], utility: Utility, settings: ContributionSettings, budget: _Budget) -> dict[int, tuple[list[_Walk], bool]]:
    """GTG-Shapley's permutation sampling, every round's walks advanced together; a round stops once a batch moves
    its values by less than `tolerance` (relative L1), after `max_batches`, or when a batch no longer fits the cap."""
    state: dict[int, tuple[list[_Walk], bool]] = {g.round: ([], False) for g in games}
    last: dict[int, dict[str, float]] = {}
    for batch in range(settings.max_batches):
        fresh: list[_Walk] = []
        for g in games:
            walks, done = state[g.round]
            if done:
                continue
            added = 0
            for order in _guided(g, batch, settings.seed):
                walk = _Walk(g.round, order)
                if not budget.fits(walk.prefix(k) for k in range(1, len(order))):
                    break
                fresh.append(walk)
                walks.append(walk)
                added += 1
            if added < len(g.plants):  # the cap is reached: this round's batch is its last
                state[g.round] = (walks, True)
        if not fresh:
            break
        _run_walks(fresh, utility, settings.truncation, settings.waves)
        budget.settle()
        for g in games:
            walks, done = state[g.round]
            if not walks or done:
                continue
            now = _mean_marginals(walks, _of(utility, g.round), g.plants)
            if g.round in last:
                moved = sum(abs(now[p] - last[g.round][p]) for p in g.plants)
                if moved <= settings.tolerance * max(sum(abs(v) for v in now.values()), 1e-12):
                    state[g.round] = (walks, True)
            last[g.round] = now
    return state


def _of(utility: Utility, round_: int) -> _Value:
    return lambda members: utility.value((round_, members))


def _valued(g: RoundUpdates, utility: Utility, settings: ContributionSettings, status: RoundStatus) -> RoundValues:
    """A round whose every needed coalition is evaluated: exact, leave-one-out only, single plant, or truncated."""
    value = _of(utility, g.round)
    v_empty, v_all = value(frozenset()), value(frozenset(g.plants))
    if len(g.plants) == 1:
        status = "single"
    elif abs(v_all - v_empty) < settings.truncation:
        status = "truncated"
    values = RoundValues(round=g.round, plants=list(g.plants), status=status, v_empty=v_empty, v_all=v_all)
    if status == "truncated":
        zeros = dict.fromkeys(g.plants, 0.0)
        values.shapley, values.loo = (dict(zeros) if settings.shapley else {}), (dict(zeros) if settings.loo else {})
    elif status == "single":
        gain = {g.plants[0]: v_all - v_empty}
        values.shapley, values.loo = (dict(gain) if settings.shapley else {}), (dict(gain) if settings.loo else {})
    else:
        values.shapley = exact_shapley(g.plants, value) if status == "exact" else {}
        values.loo = leave_one_out(g.plants, value) if settings.loo else {}
    return values


# ---------------------------------------------------------------- the run's report


class PlantContribution(BaseModel):
    """One plant's line: its values summed over the valued rounds."""

    plant: str
    shapley: float | None  # None: not computed (method loo, or no round valued)
    loo: float | None
    share: float | None  # its part of the positive credit (Shapley, else leave-one-out): sums to 1 over the plants
    rounds_contributed: int  # rounds whose aggregate used its update (recorded by this ServerApp)
    rounds_valued: int  # of those, rounds with a value (not over the cap)
    evaluated: bool  # it scored the rebuilt models on its held-out split


class ContributionReport(BaseModel):
    """The contribution step's result: MLflow artifact contribution/contributions.json, the gate report, the CLIs."""

    model_config = ConfigDict(extra="ignore")

    method: str  # e.g. "exact Shapley + leave-one-out"
    metric: str  # the gate's metric, scored by the plants on their held-out splits
    plants: list[PlantContribution]
    rounds: list[RoundValues]
    utility_gain: float  # sum over valued rounds of v(all) - v(empty): what the Shapley values add up to
    models_evaluated: int
    exchanges: int  # batched evaluation exchanges (one message per plant each)
    cost_s: float  # the contribution step's wall time
    eval_s: float  # the run's own federated evaluation time (fl_server.run.contribution_round.run_eval_seconds)
    evaluators: list[str]  # plants whose scores make the utility
    truncation: float
    max_models: int
    notes: list[str] = Field(default_factory=list)  # what was left out, and why

    @property
    def cost_ratio(self) -> float | None:
        return self.cost_s / self.eval_s if self.eval_s > 0 else None

    def markdown(self) -> str:
        lines = [
            "## Contribution per plant",
            "",
            f"{self.method}, scored by `{self.metric}` on the plants' held-out splits; each plant's values are summed over "
            f"the rounds. Shapley values add up to {self.utility_gain:+.4f}, the improvement of the valued rounds.",
            "",
            "| plant | Shapley | leave-one-out | share | rounds contributed | scored the models |",
            "|---|---|---|---|---|---|",
        ]
        for p in self.plants:
            lines.append(f"| {p.plant} | {_fmt(p.shapley)} | {_fmt(p.loo)} | {'-' if p.share is None else f'{p.share:.1%}'} | "
                         f"{p.rounds_contributed} | {'yes' if p.evaluated else 'no'} |")
        ratio = f" ({self.cost_ratio:.2f}x the run's federated evaluation, {self.eval_s:.1f} s)" if self.cost_ratio is not None else ""
        lines += ["", f"- cost: {self.models_evaluated} rebuilt models in {self.exchanges} exchange(s), {self.cost_s:.1f} s{ratio}"]
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"


def totals(rounds: Sequence[RoundValues], plants: Iterable[str], evaluators: Iterable[str]) -> list[PlantContribution]:
    """Per plant: values summed over the rounds (0 where it did not contribute), and its share of the positive credit."""
    every = sorted(set(plants) | {p for r in rounds for p in r.plants})
    scored = set(evaluators)
    have_shapley = any(r.shapley for r in rounds)
    have_loo = any(r.loo for r in rounds)
    rows = []
    for p in every:
        rows.append(PlantContribution(
            plant=p,
            shapley=sum(r.shapley.get(p, 0.0) for r in rounds) if have_shapley else None,
            loo=sum(r.loo.get(p, 0.0) for r in rounds) if have_loo else None,
            share=None,
            rounds_contributed=sum(p in r.plants for r in rounds),
            rounds_valued=sum(p in r.shapley or p in r.loo for r in rounds),
            evaluated=p in scored,
        ))
    credit = {r.plant: max(r.shapley if r.shapley is not None else (r.loo or 0.0), 0.0) for r in rows}
    total = sum(credit.values())
    if have_shapley or have_loo:
        for r in rows:
            r.share = credit[r.plant] / total if total > 0 else 0.0
    return rows


def utility_gain(rounds: Sequence[RoundValues]) -> float:
    """What the Shapley values add up to: v(all) - v(empty) of every round valued by Shapley (truncated rounds: 0)."""
    return sum(r.gain or 0.0 for r in rounds if r.shapley and r.status != "truncated")


def method_label(rounds: Sequence[RoundValues], settings: ContributionSettings) -> str:
    kinds = {r.status for r in rounds}
    parts = []
    if settings.shapley:
        shapley = [k for k in ("exact", "sampled") if k in kinds]
        parts.append({("exact",): "exact Shapley", ("sampled",): "GTG-Shapley (sampled)", (): "Shapley"}.get(
            tuple(shapley), "Shapley (exact and sampled rounds)"))
    if settings.loo:
        parts.append("leave-one-out")
    return " + ".join(parts)
