"""The release gate: a candidate model replaces the champion only if it is better overall and worse at no plant.

Both models are evaluated by the same plants on the same held-out records in the same federated evaluation;
the decision is a pure function of those two per-plant tables, so it can be checked on crafted ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from fl_server.run.contribution import ContributionReport
from maxfl.messages import WEIGHT_KEY

# Metrics where smaller is better; every other metric is taken as larger-is-better.
_LOWER_IS_BETTER = ("loss", "rmse", "mae", "false_alarm", "error")


def higher_is_better(metric: str) -> bool:
    return not any(word in metric for word in _LOWER_IS_BETTER)


class GateRule(BaseModel):
    """From the run config: which metric, by how much the aggregate must improve, how much any plant may lose."""

    model_config = ConfigDict(frozen=True)

    metric: str
    margin: float = Field(0.0, ge=0.0)  # the aggregate must improve on the champion's by at least this
    tolerance: float = Field(0.02, ge=0.0)  # no plant may get worse than the champion by more than this
    floor: float = 0.0  # with no champion yet, the aggregate must reach this (at most this if lower is better)
    # At every plant the candidate must beat the best constant answer (always "good", never alarming; R^2 0) by this.
    # Negative: the rule is off (a pipeline test on a few dozen records; a real release keeps it on).
    trivial_margin: float = Field(0.02, ge=-1.0)
    onnx_tolerance: float = Field(1e-4, gt=0.0)  # largest ONNX-vs-torch output difference a plant may measure

    @property
    def higher_is_better(self) -> bool:
        return higher_is_better(self.metric)

    @property
    def trivial_key(self) -> str:
        """Where a plant reports the metric of the best constant answer on its test split (tasks.classification)."""
        return f"eval_trivial_{self.metric.removeprefix('eval_')}"

    def gain(self, new: float, old: float) -> float:
        """How much better `new` is than `old`, positive when better, whatever the metric's direction."""
        return new - old if self.higher_is_better else old - new


class PlantRow(BaseModel):
    """One plant's line of the gate's table."""

    plant: str
    examples: int
    candidate: float | None = None  # None: the plant did not evaluate the model (the reason is in `problem`)
    champion: float | None = None
    gain: float | None = None
    trivial: float | None = None  # the best constant answer's score at this plant
    counted: bool = True  # False: one class in its test split, so its score says nothing and stays out of the aggregate
    onnx_max_abs_diff: float | None = None
    problem: str = ""


class GateReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    rule: GateRule
    passed: bool
    reasons: list[str]  # why it failed; empty when it passed
    summary: str  # one line for logs and the model version's tags
    candidate_aggregate: float | None
    champion_aggregate: float | None
    aggregate_gain: float | None  # candidate vs champion on the plants that scored both
    champion_version: int | None
    plants: list[PlantRow]
    contributions: ContributionReport | None = None  # what each plant's data bought (fl_server.run.contribution); None: not computed

    def markdown(self) -> str:
        r = self.rule
        arrow = "higher is better" if r.higher_is_better else "lower is better"
        lines = [
            f"# Release gate: {'PASSED' if self.passed else 'FAILED'}",
            "",
            self.summary,
            "",
            f"- metric: `{r.metric}` ({arrow}), aggregate weighted by each plant's held-out examples",
            f"- champion: {'none yet' if self.champion_version is None else f'version {self.champion_version}'}",
            f"- rule: aggregate gain >= {r.margin:g} over the champion, no plant worse by more than {r.tolerance:g}"
            + (f"; with no champion the aggregate must be {'>=' if r.higher_is_better else '<='} {r.floor:g}" if self.champion_version is None else ""),
            f"- ONNX export: every plant's largest output difference <= {r.onnx_tolerance:g}",
            "",
            f"- trivial baselines: at every plant the candidate beats the best constant answer by >= {r.trivial_margin:g} and "
            "answers more than one class; plants with one class in their test split are shown, not counted",
            "",
            "| plant | held-out examples | candidate | trivial | champion | gain | ONNX max diff | problem |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in self.plants:
            lines.append(f"| {p.plant} | {p.examples} | {_fmt(p.candidate)} | {_fmt(p.trivial)} | {_fmt(p.champion)} | {_fmt(p.gain, signed=True)} | "
                         f"{'-' if p.onnx_max_abs_diff is None else f'{p.onnx_max_abs_diff:.2e}'} | {p.problem} |")
        counted = sum(p.examples for p in self.plants if p.counted)
        lines.append(f"| **all** | {counted} | {_fmt(self.candidate_aggregate)} | | {_fmt(self.champion_aggregate)} | "
                     f"{_fmt(self.aggregate_gain, signed=True)} | | |")
        if self.reasons:
            lines += ["", "## Why it failed", "", *(f"- {reason}" for reason in self.reasons)]
        if self.contributions is not None:
            lines += ["", self.contributions.markdown().rstrip("\n")]
        return "\n".join(lines) + "\n"


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _examples(metrics: Mapping[str, float] | None, cap: int | None) -> int:
    """A plant's weight in the aggregate: its held-out count as claimed, never above what it declared, 0 if unreadable."""
    claimed = float((metrics or {}).get(WEIGHT_KEY, 0))
    if not math.isfinite(claimed) or claimed <= 0:
        return 0
    return int(min(claimed, cap)) if cap is not None else int(claimed)


def _weighted(values: Mapping[str, float], weights: Mapping[str, int]) -> float | None:
    total = sum(weights[p] for p in values)
    if not values or total <= 0:
        return None
    return sum(values[p] * weights[p] for p in values) / total


def decide(
    rule: GateRule,
    plants: list[str],
    candidate: Mapping[str, Mapping[str, float]],
    champion: Mapping[str, Mapping[str, float]] | None,
    champion_version: int | None = None,
    problems: Mapping[str, str] | None = None,
    caps: Mapping[str, int] | None = None,
) -> GateReport:
    """Gate one candidate. `plants` must all have evaluated it; `candidate` / `champion` map each plant that did
    to its evaluation metrics (with WEIGHT_KEY); `champion` is None when no champion exists yet. `caps`: the
    records each plant declared in the data agreement; a plant's claimed held-out count weighs at most that."""
    problems = dict(problems or {})
    reasons: list[str] = []
    rows: list[PlantRow] = []
    cand_scores: dict[str, float] = {}
    champ_scores: dict[str, float] = {}
    weights: dict[str, int] = {}
    for plant in sorted(plants):
        metrics = candidate.get(plant)
        row = PlantRow(plant=plant, examples=_examples(metrics, (caps or {}).get(plant)), problem=problems.get(plant, ""))
        if metrics is None:
            reasons.append(f"{plant} did not evaluate the candidate ({row.problem or 'no reply'})")
            rows.append(row)
            continue
        value = metrics.get(rule.metric)
        if value is None or not math.isfinite(value):
            reasons.append(f"{plant} reported no finite {rule.metric} for the candidate")
            rows.append(row)
            continue
        row.candidate = float(value)
        diff = metrics.get("onnx_max_abs_diff")
        if diff is not None:
            row.onnx_max_abs_diff = float(diff)
            if not float(diff) <= rule.onnx_tolerance:
                reasons.append(f"{plant}: the ONNX export differs from the torch model by {float(diff):.2e} (> {rule.onnx_tolerance:g})")
        if metrics.get("eval_test_classes", 2.0) < 2:
            row.counted = False
            row.problem = row.problem or "one class in its test split: shown, not counted"
            rows.append(row)
            continue
        if rule.trivial_margin < 0:
            pass  # the trivial-baseline rule is off
        elif metrics.get("eval_predicted_classes", 2.0) < 2:
            reasons.append(f"{plant}: the candidate gives every test record the same answer (it never tells the classes apart)")
        trivial = metrics.get(rule.trivial_key)
        if trivial is not None and math.isfinite(trivial):
            row.trivial = float(trivial)
            if rule.trivial_margin >= 0 and rule.gain(row.candidate, row.trivial) < rule.trivial_margin:
                reasons.append(f"{plant}: {rule.metric} {row.candidate:.4f} does not beat the best constant answer's {row.trivial:.4f} "
                               f"by {rule.trivial_margin:g}")
        cand_scores[plant] = row.candidate
        weights[plant] = max(row.examples, 0)
        old = None if champion is None else champion.get(plant, {}).get(rule.metric)
        if old is not None and math.isfinite(old):
            row.champion = champ_scores[plant] = float(old)
            row.gain = rule.gain(row.candidate, row.champion)
            if row.gain < -rule.tolerance:
                reasons.append(f"{plant} regresses: {rule.metric} {row.champion:.4f} -> {row.candidate:.4f} (tolerance {rule.tolerance:g})")
        elif champion is not None and not row.problem:
            row.problem = "the champion could not be evaluated here"
        rows.append(row)
    cand_agg = _weighted(cand_scores, weights)
    champ_agg = _weighted(champ_scores, weights)
    # The aggregates compare like with like: only plants that scored both models count for the champion's gain.
    both = {p: cand_scores[p] for p in champ_scores}
    cand_on_both = _weighted(both, weights)
    if cand_agg is None:
        reasons.append("no plant with two or more classes in its test split evaluated the candidate")
    elif champion is None:
        ok = cand_agg >= rule.floor if rule.higher_is_better else cand_agg <= rule.floor
        if not ok:
            reasons.append(f"no champion yet and {rule.metric} {cand_agg:.4f} does not clear the floor {rule.floor:g}")
    elif champ_agg is None or cand_on_both is None:
        reasons.append("no plant could evaluate the champion, so the candidate cannot be compared with it")
    elif rule.gain(cand_on_both, champ_agg) < rule.margin:
        reasons.append(f"{rule.metric} {champ_agg:.4f} -> {cand_on_both:.4f}: gain {rule.gain(cand_on_both, champ_agg):+.4f} is below the margin {rule.margin:g}")
    gain = None if champ_agg is None or cand_on_both is None else rule.gain(cand_on_both, champ_agg)
    passed = not reasons
    against = "no champion" if champion is None else f"champion v{champion_version}: {_fmt(champ_agg)}"
    summary = f"{'passed' if passed else 'failed'}: {rule.metric} {_fmt(cand_agg)} ({against}) over {len(cand_scores)}/{len(plants)} plant(s)"
    if not passed:
        summary += f"; {reasons[0]}" + (f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else "")
    return GateReport(rule=rule, passed=passed, reasons=reasons, summary=summary, candidate_aggregate=cand_agg,
                      champion_aggregate=champ_agg, aggregate_gain=gain, champion_version=champion_version, plants=rows)
