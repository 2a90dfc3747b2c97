"""Contribution estimates on crafted games and crafted updates whose answers are known (fl_server.run.contribution)."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from itertools import combinations

import numpy as np
import pytest

from fl_server.run.contribution import (
    Coalition, ContributionError, ContributionSettings, PlantScores, ReconstructedUtility, RoundUpdates, estimate, exact_shapley,
    leave_one_out, reconstruct, totals, utility_gain,
)


class GameUtility:
    """A crafted utility v(round, S); every coalition is its own model. Counts what is evaluated, and in how many exchanges."""

    def __init__(self, v: Callable[[int, frozenset[str]], float]) -> None:
        self.v = v
        self.evaluated: set[Coalition] = set()
        self.exchanges = 0

    def model_key(self, coalition: Coalition) -> Hashable:
        return coalition

    def is_evaluated(self, key: Hashable) -> bool:
        return key in self.evaluated

    def evaluate(self, coalitions: Sequence[Coalition]) -> None:
        new = set(coalitions) - self.evaluated
        if new:
            self.exchanges += 1
            self.evaluated |= new

    def value(self, coalition: Coalition) -> float:
        assert coalition in self.evaluated, f"{coalition} used before it was evaluated"
        return self.v(*coalition)


def game(plants: Sequence[str], round_: int = 1) -> RoundUpdates:
    """A round of these plants (the crafted utilities here ignore the arrays)."""
    return RoundUpdates(round_, np.zeros(1, np.float32), tuple(plants), np.zeros((len(plants), 1), np.float32), (1.0,) * len(plants))


def values_of(rounds) -> dict[str, float]:
    return {row.plant: row.shapley for row in totals(rounds, [], [])}


def additive(c: dict[str, float], pair_bonus: float = 0.0, pair: tuple[str, str] = ("a", "b")) -> Callable[[int, frozenset[str]], float]:
    return lambda _r, s: sum(c[p] for p in s) + (pair_bonus if set(pair) <= s else 0.0)


EXACT = ContributionSettings(method="auto", truncation=0.0)


def test_exact_shapley_of_an_additive_game_with_one_synergy_splits_the_synergy_between_its_pair():
    c = {"a": 1.0, "b": 2.0, "c": 0.5}
    rounds = estimate([game("abc")], GameUtility(additive(c, pair_bonus=0.6)), EXACT)
    assert rounds[0].status == "exact"
    assert rounds[0].shapley == pytest.approx({"a": 1.3, "b": 2.3, "c": 0.5})
    # leave-one-out gives each of the pair the whole synergy
    assert rounds[0].loo == pytest.approx({"a": 1.6, "b": 2.6, "c": 0.5})


def test_a_null_plant_earns_exactly_zero_and_symmetric_plants_earn_the_same():
    def v(_r, s):  # z changes nothing; a and b are interchangeable; c only counts next to a or b
        core = len(s & {"a", "b"})
        return math.sqrt(core) + (0.3 if "c" in s and core else 0.0)

    rounds = estimate([game("abcz")], GameUtility(v), EXACT)
    assert rounds[0].shapley["z"] == pytest.approx(0.0, abs=1e-12)
    assert rounds[0].loo["z"] == pytest.approx(0.0, abs=1e-12)
    assert rounds[0].shapley["a"] == pytest.approx(rounds[0].shapley["b"])


def random_game(plants: str, seed: int) -> Callable[[int, frozenset[str]], float]:
    """A superadditive-ish random game with diminishing returns, different in every round."""
    rng = np.random.default_rng(seed)
    weight = {(r, p): rng.uniform(0.1, 1.0) for r in range(1, 6) for p in plants}
    return lambda r, s: math.log1p(sum(weight[r, p] for p in s)) - 0.05 * len(s) * (r == 3)


@pytest.mark.parametrize("settings", [EXACT, ContributionSettings(exact_max_plants=2, truncation=0.0),
                                      ContributionSettings(exact_max_plants=2, truncation=0.05, waves=2)])
def test_values_sum_to_every_valued_rounds_improvement_exact_or_sampled_truncated_or_not(settings):
    plants = "abcde"
    v = random_game(plants, 1)
    games = [game(plants, r) for r in (1, 2, 3)]
    rounds = estimate(games, GameUtility(v), settings)
    for r in rounds:
        assert sum(r.shapley.values()) == pytest.approx(r.v_all - r.v_empty, abs=1e-12), r.round
    assert sum(values_of(rounds).values()) == pytest.approx(utility_gain(rounds))
    assert utility_gain(rounds) == pytest.approx(sum(v(r, frozenset(plants)) - v(r, frozenset()) for r in (1, 2, 3)))


def test_sampled_gtg_shapley_with_truncation_comes_close_to_the_exact_values():
    plants = "abcdefg"  # 7 plants: above exact-max-plants, so sampled
    v = random_game(plants, 7)
    exact = exact_shapley(list(plants), lambda s: v(1, s))
    sampled = estimate([game(plants)], GameUtility(v), ContributionSettings(truncation=1e-3, tolerance=0.01, max_batches=20))[0]
    assert sampled.status == "sampled" and sampled.permutations >= 2 * len(plants)
    spread = max(exact.values()) - min(exact.values())
    assert max(abs(sampled.shapley[p] - exact[p]) for p in plants) < 0.1 * spread
    assert sampled.loo == pytest.approx(leave_one_out(list(plants), lambda s: v(1, s)))


def test_within_round_truncation_evaluates_fewer_models_and_stays_close():
    def v(_r, s):  # saturates: three plants' model scores within 0.002 of all eight's
        return 1.0 - 0.5 ** (3 * len(s))

    plants = "abcdefgh"
    plain, truncated = GameUtility(v), GameUtility(v)
    walked = estimate([game(plants)], plain, ContributionSettings(method="shapley", truncation=0.0, max_batches=2))[0]
    quick = estimate([game(plants)], truncated, ContributionSettings(method="shapley", truncation=3e-3, max_batches=2, waves=7))[0]
    assert max(len(s) for _, s in truncated.evaluated if len(s) < 8) == 3  # no walk went past its third plant
    assert len(truncated.evaluated) < 0.5 * len(plain.evaluated)
    assert all(abs(quick.shapley[p] - walked.shapley[p]) < 3e-3 for p in plants)  # the same permutations, walked to the end


def test_a_round_that_barely_moved_the_model_is_worth_zero_to_everyone():
    c = {"a": 1.0, "b": 2.0}
    v = lambda r, s: sum(c[p] for p in s) * (1e-5 if r == 2 else 1.0)  # noqa: E731
    rounds = estimate([game("ab", 1), game("ab", 2)], GameUtility(v), ContributionSettings(truncation=1e-3))
    assert [r.status for r in rounds] == ["exact", "truncated"]
    assert rounds[1].shapley == {"a": 0.0, "b": 0.0} and rounds[1].loo == {"a": 0.0, "b": 0.0}
    assert values_of(rounds) == pytest.approx(c) and utility_gain(rounds) == pytest.approx(3.0)


def test_the_cap_on_evaluated_models_holds_and_says_what_it_left_out():
    plants = "abcdefg"
    for cap in (3, 10, 40, 150):
        utility = GameUtility(random_game(plants, 3))
        rounds = estimate([game(plants, r) for r in (1, 2, 3)], utility, ContributionSettings(max_models=cap))
        assert len(utility.evaluated) <= cap, cap
        for r in rounds:
            if r.shapley:
                assert sum(r.shapley.values()) == pytest.approx(r.v_all - r.v_empty)
    assert [r.status for r in rounds].count("sampled") >= 1
    utility = GameUtility(random_game(plants, 3))
    starved = estimate([game(plants, r) for r in (1, 2, 3)], utility, ContributionSettings(max_models=3))
    assert [r.status for r in starved][1:] == ["over-budget", "over-budget"] and not starved[1].shapley


def test_small_rounds_within_the_cap_take_one_exchange():
    utility = GameUtility(random_game("abcde", 2))
    estimate([game("abcde", r) for r in (1, 2, 3)], utility, EXACT)
    assert utility.exchanges == 1 and len(utility.evaluated) == 3 * 2**5


def test_a_plant_that_missed_a_round_gets_nothing_for_it_and_its_rounds_are_counted():
    v = random_game("abc", 4)
    rounds = estimate([game("abc", 1), game("ab", 2)], GameUtility(v), EXACT)
    rows = {r.plant: r for r in totals(rounds, ["abc"[0], "evaluator-only"], ["a", "b", "c", "evaluator-only"])}
    assert "c" not in rounds[1].shapley and rows["c"].rounds_contributed == 1 and rows["a"].rounds_contributed == 2
    assert rows["c"].shapley == pytest.approx(rounds[0].shapley["c"])
    assert rows["evaluator-only"].shapley == 0.0 and rows["evaluator-only"].evaluated
    assert sum(r.share for r in rows.values()) == pytest.approx(1.0)


def test_leave_one_out_only_needs_n_plus_two_models_a_round():
    c = {"a": 1.0, "b": 2.0, "c": 0.5, "d": 0.1, "e": 0.0, "f": 3.0, "g": 1.0}
    utility = GameUtility(additive(c, pair_bonus=1.0))
    (r,) = estimate([game("abcdefg")], utility, ContributionSettings(method="loo"))
    assert r.status == "loo" and not r.shapley and len(utility.evaluated) == 7 + 2
    assert r.loo == pytest.approx(c | {"a": 2.0, "b": 3.0})
    (row,) = [x for x in totals([r], [], []) if x.plant == "f"]
    assert row.shapley is None and row.share == pytest.approx(3.0 / (sum(c.values()) + 2.0))


# ---------------------------------------------------------------- rebuilt models


def rebuilt(weights: dict[str, np.ndarray], examples: dict[str, float], global_model: np.ndarray, round_: int = 1) -> RoundUpdates:
    plants = tuple(weights)
    return RoundUpdates(round_, global_model.astype(np.float32), plants, np.stack([weights[p] for p in plants]).astype(np.float32),
                        tuple(examples[p] for p in plants))


def judge(target: np.ndarray) -> Callable[[np.ndarray], dict[str, PlantScores]]:
    """One evaluator that scores a model by how close it is to `target` (higher is better)."""
    return lambda stack: {"judge": PlantScores([-float(np.sum((m - target) ** 2)) for m in stack], 10)}


def test_the_full_set_is_flowers_fedavg_aggregate_bit_for_bit():
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    rng = np.random.default_rng(0)
    w = {p: rng.normal(size=1000).astype(np.float32) for p in "abc"}
    n = {"a": 30, "b": 7, "c": 101}
    records = [RecordDict({"arrays": ArrayRecord([w[p]]), "metrics": MetricRecord({"num-examples": n[p]})}) for p in "abc"]
    flower = aggregate_arrayrecords(records, "num-examples").to_numpy_ndarrays()[0]
    ours = reconstruct(rebuilt(w, n, np.zeros(1000)), "abc")
    assert ours.dtype == np.float32 and ours.tobytes() == flower.tobytes()
    two = reconstruct(rebuilt(w, n, np.zeros(1000)), "ca")
    assert np.allclose(two, (30 * w["a"] + 101 * w["c"]) / 131, atol=1e-6)


def test_identical_plants_share_equally_and_a_plant_that_sends_back_the_global_model_earns_nothing():
    g, target = np.zeros(4), np.ones(4)
    same = rebuilt({p: target for p in "abc"}, dict.fromkeys("abc", 20.0), g)
    rounds = estimate([same], ReconstructedUtility({1: same}, judge(target)), EXACT)
    assert rounds[0].shapley == pytest.approx(dict.fromkeys("abc", 4.0 / 3))  # v(N) - v(empty) = 0 - (-4)
    idle = rebuilt({"useful": target, "idle": g}, {"useful": 20.0, "idle": 20.0}, g)
    (r,) = estimate([idle], ReconstructedUtility({1: idle}, judge(target)), EXACT)
    assert r.shapley["idle"] <= 0.0 < r.shapley["useful"] and r.loo["idle"] < 0  # its weight only dilutes the useful update


def test_a_model_two_rounds_share_is_evaluated_once():
    g1, target = np.zeros(3, np.float32), np.ones(3, np.float32)
    w = {"a": np.full(3, 0.5, np.float32), "b": np.full(3, 1.5, np.float32)}
    r1 = rebuilt(w, {"a": 1.0, "b": 3.0}, g1, 1)
    g2 = reconstruct(r1, "ab")  # FedAvg's next global model
    r2 = rebuilt({"a": g2 + 0.1, "b": g2 - 0.2}, {"a": 1.0, "b": 3.0}, g2, 2)
    utility = ReconstructedUtility({1: r1, 2: r2}, judge(target))
    rounds = estimate([r1, r2], utility, EXACT)
    assert utility.models_evaluated == 7 and utility.exchanges == 1  # 2 x 4 subsets, round 2's empty set = round 1's full set
    assert rounds[1].v_empty == rounds[0].v_all


def test_plants_that_miss_an_exchange_or_score_nan_drop_out_of_every_value():
    g, target = np.zeros(2, np.float32), np.ones(2, np.float32)
    r = rebuilt({"a": target, "b": -target}, {"a": 1.0, "b": 1.0}, g)
    calls = []

    def score(stack):
        calls.append(len(stack))
        good = [-float(np.sum((m - target) ** 2)) for m in stack]
        out = {"p1": PlantScores(good, 5), "p2": PlantScores([2 * s for s in good], 15)}
        if len(calls) == 1:
            out["late"] = PlantScores(good, 1)
            out["nan"] = PlantScores([math.nan] * len(stack), 1)
        else:
            out["new"] = PlantScores(good, 100)
        return out

    utility = ReconstructedUtility({1: r}, score)
    utility.evaluate([(1, frozenset()), (1, frozenset("ab"))])
    assert utility.evaluators == ["late", "p1", "p2"] and set(utility.dropped) == {"nan"}
    utility.evaluate([(1, frozenset("a"))])
    assert utility.evaluators == ["p1", "p2"] and set(utility.dropped) == {"nan", "late", "new"}
    # the utility is the example-weighted mean of the plants that scored every model: (5 x s + 15 x 2s) / 20
    assert utility.value((1, frozenset())) == pytest.approx(-2 * 35 / 20)


def test_no_plant_scoring_the_models_is_an_error_not_a_zero():
    r = rebuilt({"a": np.ones(2)}, {"a": 1.0}, np.zeros(2))
    utility = ReconstructedUtility({1: r}, lambda stack: {})
    utility.evaluate([(1, frozenset())])
    with pytest.raises(ContributionError, match="no plant scored every model"):
        utility.value((1, frozenset()))


def test_a_plant_not_in_the_round_cannot_be_in_its_coalitions():
    r = rebuilt({"a": np.ones(2)}, {"a": 1.0}, np.zeros(2))
    with pytest.raises(ValueError, match="sent no update"):
        reconstruct(r, ["b"])


def test_exact_shapley_matches_the_permutation_definition():
    plants = "abcd"
    v = random_game(plants, 9)
    from itertools import permutations

    by_order = dict.fromkeys(plants, 0.0)
    orders = list(permutations(plants))
    for order in orders:
        for k, p in enumerate(order):
            by_order[p] += (v(1, frozenset(order[: k + 1])) - v(1, frozenset(order[:k]))) / len(orders)
    assert exact_shapley(list(plants), lambda s: v(1, s)) == pytest.approx(by_order)
    assert len(list(combinations(plants, 2))) == 6  # the subsets exact enumeration visits per size
