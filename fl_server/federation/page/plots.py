"""Charts as inline SVG geometry, computed on the server: the page needs no plotting script and nothing from a CDN.

`line_chart` (a metric per round; each plant's epsilon with its ceiling as a dashed rule) and `bar_chart`
(contributions, which may be negative) return pixel coordinates; templates/macros.html draws them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

SERIES_CLASSES = 8  # page.css colours s0..s7


class Tick(BaseModel):
    model_config = ConfigDict(frozen=True)

    at: float  # pixels
    label: str


class Dot(BaseModel):
    model_config = ConfigDict(frozen=True)

    x: float
    y: float
    title: str  # what a person reads on hover


class Line(BaseModel):
    model_config = ConfigDict(frozen=True)

    label: str
    css: str
    path: str  # SVG path data
    dots: list[Dot]


class Rule(BaseModel):
    """A horizontal line across the plot: a plant's ceiling."""

    model_config = ConfigDict(frozen=True)

    y: float
    label: str
    css: str


class Bar(BaseModel):
    model_config = ConfigDict(frozen=True)

    label: str
    y: float
    x: float
    width: float
    height: float
    value: str
    negative: bool


class Chart(BaseModel):
    model_config = ConfigDict(frozen=True)

    width: int
    height: int
    left: float
    top: float
    right: float
    bottom: float
    x_label: str
    y_label: str
    xticks: list[Tick]
    yticks: list[Tick]
    lines: list[Line] = []
    rules: list[Rule] = []
    bars: list[Bar] = []
    zero: float | None = None  # bar charts: the x of value 0


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (1, 2, 2.5 or 5 times a power of ten apart); at most 2 x count + 2."""
    if not (math.isfinite(low) and math.isfinite(high) and math.isfinite(high - low)):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(1, count)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * power >= raw)
    start = math.floor(low / step) * step
    ticks = [round(start + i * step, 12) for i in range(2 * count + 2)]
    last = next(i for i, t in enumerate(ticks) if t >= high - step * 1e-9)
    return ticks[: last + 1] if math.isfinite(ticks[last]) else [low, high]


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.2g}"
    return f"{value:.3g}"


def line_chart(series: Sequence[tuple[str, Sequence[tuple[float, float]]]], rules: Sequence[tuple[str, float, int]] = (), *,
               x_label: str = "round", y_label: str = "", width: int = 560, height: int = 220, y_floor: float | None = None) -> Chart:
    """Lines through (x, y) points, one per series, with horizontal `rules` (label, y, series index for the colour).

    Non-finite values are left out (an infinite ceiling is no line); `y_floor` keeps 0 in view (epsilon)."""
    left, right, top, bottom = 52.0, width - 12.0, 12.0, height - 36.0
    points = [(x, y) for _, pts in series for x, y in pts if math.isfinite(x) and math.isfinite(y)]
    finite_rules = [(label, y, i) for label, y, i in rules if math.isfinite(y)]
    xs = [x for x, _ in points] or [1.0]
    ys = [y for _, y in points] + [y for _, y, _ in finite_rules]
    if y_floor is not None:
        ys.append(y_floor)
    ys = ys or [0.0, 1.0]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    yticks = nice_ticks(min(ys), max(ys))
    y_lo, y_hi = yticks[0], yticks[-1]
    if y_hi == y_lo:
        y_hi = y_lo + 1.0

    def px(x: float) -> float:
        return round(left + (x - x_lo) / (x_hi - x_lo) * (right - left), 1)

    def py(y: float) -> float:
        return round(bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top), 1)

    step = max(1, math.ceil((x_hi - x_lo) / 10))
    xticks = [Tick(at=px(x), label=str(int(x))) for x in range(math.ceil(x_lo), math.floor(x_hi) + 1, step)]
    lines = []
    for i, (label, pts) in enumerate(series):
        kept = [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
        if not kept:
            continue
        path = " ".join(f"{'M' if j == 0 else 'L'}{px(x)},{py(y)}" for j, (x, y) in enumerate(kept))
        dots = [Dot(x=px(x), y=py(y), title=f"{label}: {x_label} {int(x)}: {_fmt(y)}") for x, y in kept]
        lines.append(Line(label=label, css=f"s{i % SERIES_CLASSES}", path=path, dots=dots))
    return Chart(width=width, height=height, left=left, top=top, right=right, bottom=bottom, x_label=x_label, y_label=y_label,
                 xticks=xticks, yticks=[Tick(at=py(t), label=_fmt(t)) for t in yticks], lines=lines,
                 rules=[Rule(y=py(y), label=label, css=f"s{i % SERIES_CLASSES}") for label, y, i in finite_rules])


def bar_chart(rows: Sequence[tuple[str, float]], *, x_label: str = "", width: int = 560, row_height: int = 22) -> Chart:
    """Horizontal bars from a zero line; negative values go left of it."""
    left, right, top = 110.0, width - 56.0, 8.0
    height = int(top + row_height * max(1, len(rows)) + 30)
    bottom = height - 30.0
    values = [v for _, v in rows if math.isfinite(v)]
    lo, hi = min(values + [0.0]), max(values + [0.0])
    if hi == lo:
        hi = lo + 1.0
    ticks = nice_ticks(lo, hi, 4)
    lo, hi = ticks[0], ticks[-1]

    def px(v: float) -> float:
        return round(left + (v - lo) / (hi - lo) * (right - left), 1)

    zero = px(0.0)
    bars = []
    for i, (label, value) in enumerate(rows):
        v = value if math.isfinite(value) else 0.0
        x0, x1 = sorted((zero, px(v)))
        bars.append(Bar(label=label, y=round(top + i * row_height + 3, 1), x=x0, width=max(1.0, round(x1 - x0, 1)),
                        height=row_height - 6, value=_fmt(value), negative=v < 0))
    return Chart(width=width, height=height, left=left, top=top, right=right, bottom=bottom, x_label=x_label, y_label="",
                 xticks=[Tick(at=px(t), label=_fmt(t)) for t in ticks], yticks=[], bars=bars, zero=zero)
