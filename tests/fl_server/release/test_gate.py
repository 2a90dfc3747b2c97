"""The gate's decision on crafted per-plant tables."""

from __future__ import annotations

import pytest

from fl_server.release.gate import GateRule, decide, higher_is_better

RULE = GateRule(metric="eval_macro_f1", margin=0.01, tolerance=0.02, floor=0.6)
PLANTS = ["plant-1", "plant-2", "plant-3"]


def table(*scores: float, examples: tuple[int, ...] = (100, 100, 100), diff: float | None = 1e-6) -> dict[str, dict[str, float]]:
    rows = {}
    for plant, score, n in zip(PLANTS, scores, examples, strict=True):
        rows[plant] = {"eval_macro_f1": score, "num-examples": n} | ({} if diff is None else {"onnx_max_abs_diff": diff})
    return rows


def test_better_everywhere_passes():
    report = decide(RULE, PLANTS, table(0.80, 0.75, 0.70), table(0.70, 0.70, 0.70, diff=None), champion_version=3)
    assert report.passed and report.reasons == []
    assert report.candidate_aggregate == pytest.approx(0.75) and report.champion_aggregate == pytest.approx(0.70)
    assert report.aggregate_gain == pytest.approx(0.05)
    assert "passed" in report.summary and "champion v3" in report.summary


def test_one_plant_regressing_beyond_tolerance_fails_even_if_the_aggregate_improves():
    report = decide(RULE, PLANTS, table(0.95, 0.90, 0.67), table(0.70, 0.70, 0.70), champion_version=1)
    assert report.aggregate_gain > 0.1
    assert not report.passed
    assert report.reasons == ["plant-3 regresses: eval_macro_f1 0.7000 -> 0.6700 (tolerance 0.02)"]
    assert [r.gain for r in report.plants][2] == pytest.approx(-0.03)


def test_a_regression_within_tolerance_is_allowed():
    assert decide(RULE, PLANTS, table(0.80, 0.80, 0.685), table(0.70, 0.70, 0.70), 1).passed


def test_aggregate_gain_below_the_margin_fails():
    report = decide(RULE, PLANTS, table(0.705, 0.705, 0.705), table(0.70, 0.70, 0.70), 1)
    assert not report.passed and "below the margin 0.01" in report.reasons[0]


def test_aggregate_is_weighted_by_each_plants_held_out_examples():
    # the big plant improves a little, the small one a lot: weighted gain 0.009 < margin; unweighted would pass
    cand = table(0.709, 0.709, 0.72, examples=(1000, 1000, 10))
    champ = table(0.70, 0.70, 0.70, examples=(1000, 1000, 10))
    report = decide(RULE, PLANTS, cand, champ, 1)
    assert report.aggregate_gain == pytest.approx((0.009 * 2000 + 0.02 * 10) / 2010)
    assert not report.passed


def test_without_a_champion_the_floor_decides():
    assert decide(RULE, PLANTS, table(0.61, 0.61, 0.61), None).passed
    failed = decide(RULE, PLANTS, table(0.59, 0.59, 0.59), None)
    assert not failed.passed and "does not clear the floor 0.6" in failed.reasons[0]


def test_a_plant_that_did_not_evaluate_the_candidate_fails_the_gate():
    cand = table(0.9, 0.9, 0.9)
    del cand["plant-2"]
    report = decide(RULE, PLANTS, cand, None, problems={"plant-2": "offline"})
    assert not report.passed and report.reasons == ["plant-2 did not evaluate the candidate (offline)"]


def test_a_plant_that_cannot_evaluate_the_champion_is_compared_on_the_others():
    champ = table(0.70, 0.70, 0.70)
    del champ["plant-3"]
    report = decide(RULE, PLANTS, table(0.80, 0.80, 0.10), champ, 1)
    # plant-3 has no champion figure: no regression can be measured there; the gain is on plant-1 and plant-2
    assert report.passed and report.aggregate_gain == pytest.approx(0.10)
    assert report.plants[2].problem == "the champion could not be evaluated here"


def test_an_onnx_export_that_drifts_from_torch_fails():
    report = decide(RULE, PLANTS, table(0.9, 0.9, 0.9, diff=0.5), None)
    assert not report.passed and len(report.reasons) == 3 and "ONNX export differs" in report.reasons[0]


def test_a_non_finite_metric_fails():
    report = decide(RULE, PLANTS, table(0.9, float("nan"), 0.9), None)
    assert not report.passed and report.reasons == ["plant-2 reported no finite eval_macro_f1 for the candidate"]


def test_lower_is_better_metrics_flip_the_comparison():
    rule = GateRule(metric="eval_rmse", margin=0.0, tolerance=0.1, floor=1.0)
    assert not higher_is_better("eval_rmse") and higher_is_better("eval_r2")
    cand = {p: {"eval_rmse": 0.5, "num-examples": 10} for p in PLANTS}
    worse = {p: {"eval_rmse": 0.7, "num-examples": 10} for p in PLANTS}
    assert decide(rule, PLANTS, cand, worse, 1).passed
    assert not decide(rule, PLANTS, worse, cand, 1).passed
    assert decide(rule, PLANTS, cand, None).passed  # 0.5 <= floor 1.0


def test_markdown_report_holds_the_per_plant_table():
    report = decide(RULE, PLANTS, table(0.95, 0.90, 0.67), table(0.70, 0.70, 0.70), 1)
    text = report.markdown()
    assert text.startswith("# Release gate: FAILED")
    assert "| plant-3 | 100 | 0.6700 | - | 0.7000 | -0.0300 |" in text
    assert "## Why it failed" in text and "plant-3 regresses" in text


def with_baselines(rows: dict[str, dict[str, float]], trivial: float = 0.37, test_classes: tuple[float, ...] = (2, 2, 2),
                   predicted: tuple[float, ...] = (2, 2, 2)) -> dict[str, dict[str, float]]:
    """What a classifier's evaluation reports besides its score (tasks.classification.trivial_baselines)."""
    for (plant, row), n_test, n_pred in zip(rows.items(), test_classes, predicted, strict=True):
        row |= {"eval_trivial_macro_f1": trivial, "eval_test_classes": n_test, "eval_predicted_classes": n_pred}
    return rows


def test_a_model_that_never_flags_a_defect_fails_at_every_plant():
    # always "good": macro-F1 equals the constant answer's score, and one class is predicted
    never_alarms = with_baselines(table(0.37, 0.37, 0.37), trivial=0.37, predicted=(1, 1, 1))
    report = decide(RULE.model_copy(update={"floor": 0.0}), PLANTS, never_alarms, None)
    assert not report.passed
    assert sum("same answer" in r for r in report.reasons) == 3
    assert sum("does not beat the best constant answer's 0.3700" in r for r in report.reasons) == 3
    assert [p.trivial for p in report.plants] == [0.37, 0.37, 0.37]


def test_a_plant_scoring_below_its_trivial_baseline_fails_even_when_the_aggregate_is_good():
    rows = with_baselines(table(0.90, 0.90, 0.40), trivial=0.45)
    report = decide(RULE.model_copy(update={"floor": 0.0}), PLANTS, rows, None)
    assert not report.passed
    assert report.reasons == ["plant-3: eval_macro_f1 0.4000 does not beat the best constant answer's 0.4500 by 0.02"]


def test_a_plant_with_one_class_in_its_test_split_is_shown_but_not_counted():
    # plant-3's perfect score on a test split of one class would inflate the aggregate
    rows = with_baselines(table(0.70, 0.70, 1.00), test_classes=(2, 2, 1), predicted=(2, 2, 1))
    report = decide(RULE, PLANTS, rows, None)
    assert report.passed, report.reasons
    assert report.candidate_aggregate == pytest.approx(0.70)
    single = report.plants[2]
    assert not single.counted and "one class in its test split" in single.problem
    assert "| plant-3 | 100 | 1.0000 |" in report.markdown()


def test_only_single_class_plants_leave_nothing_to_release():
    rows = with_baselines(table(1.0, 1.0, 1.0), test_classes=(1, 1, 1), predicted=(1, 1, 1))
    report = decide(RULE, PLANTS, rows, None)
    assert not report.passed
    assert report.reasons == ["no plant with two or more classes in its test split evaluated the candidate"]


def test_regression_is_compared_with_predicting_the_mean():
    rule = GateRule(metric="eval_r2", trivial_margin=0.02)
    rows = {p: {"eval_r2": r2, "eval_trivial_r2": 0.0, "num-examples": 50} for p, r2 in zip(PLANTS, (0.5, 0.4, 0.01), strict=True)}
    report = decide(rule, PLANTS, rows, None)
    assert not report.passed and report.reasons == ["plant-3: eval_r2 0.0100 does not beat the best constant answer's 0.0000 by 0.02"]


def test_a_claimed_held_out_count_weighs_at_most_what_the_plant_declared():
    cand = table(0.90, 0.60, 0.60, examples=(10**308, 100, 100))  # plant-1 claims a huge test set to drag the aggregate
    report = decide(RULE, PLANTS, cand, None, caps={"plant-1": 100, "plant-2": 400, "plant-3": 400})
    assert report.candidate_aggregate == pytest.approx(0.70)
    assert [p.examples for p in report.plants] == [100, 100, 100]


def test_a_negative_trivial_margin_turns_the_rule_off():
    never_alarms = with_baselines(table(0.37, 0.37, 0.37), trivial=0.37, predicted=(1, 1, 1))
    assert decide(RULE.model_copy(update={"floor": 0.0, "trivial_margin": -1.0}), PLANTS, never_alarms, None).passed
