"""The gate's decision on crafted per-plant tables."""

from __future__ import annotations

import pytest

from fl_server.gate import GateRule, decide, higher_is_better

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
    assert "| plant-3 | 100 | 0.6700 | 0.7000 | -0.0300 |" in text
    assert "## Why it failed" in text and "plant-3 regresses" in text
