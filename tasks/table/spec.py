"""Table profiles (per-plant sufficient statistics) and the spec merged from them (federated scaling).

Plants share counts, sums and sums of squares, never rows; the anchor pools them into exactly the means and
standard deviations that pandas would compute on the concatenated training rows.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from maxfl.errors import DataError
from tasks.base import DataProfile, TaskSpec
from tasks.manifest import Manifest
from tasks.table.read import RawTable

MISSING = "<missing>"  # a categorical cell left empty: its own category, since missingness can carry signal
UNKNOWN = "<unknown>"  # a category no plant reported at spec time, e.g. a machine installed later

Problem = Literal["classification", "regression"]


class Moments(BaseModel):
    """Count, sum and sum of squares of the present values, and how many were missing: enough to pool."""

    model_config = ConfigDict(frozen=True)

    count: int = Field(0, ge=0)
    sum: float = 0.0
    sum_sq: float = Field(0.0, ge=0.0)
    missing: int = Field(0, ge=0)

    @classmethod
    def of(cls, values: np.ndarray) -> Moments:
        present = values[~np.isnan(values)]
        return cls(
            count=len(present), sum=float(present.sum()), sum_sq=float(np.square(present).sum()), missing=len(values) - len(present)
        )

    @classmethod
    def pooled(cls, parts: Iterable[Moments]) -> Moments:
        parts = list(parts)
        return cls(
            count=sum(p.count for p in parts),
            sum=math.fsum(p.sum for p in parts),
            sum_sq=math.fsum(p.sum_sq for p in parts),
            missing=sum(p.missing for p in parts),
        )


class Scaling(BaseModel):
    model_config = ConfigDict(frozen=True)

    mean: float
    std: float = Field(gt=0.0)

    @classmethod
    def of(cls, m: Moments) -> Scaling:
        """Sample mean and std (ddof=1, as pandas); a constant or empty column scales by 1 so values stay finite."""
        if m.count == 0:
            return cls(mean=0.0, std=1.0)
        mean = m.sum / m.count
        var = max(m.sum_sq - m.count * mean * mean, 0.0) / (m.count - 1) if m.count > 1 else 0.0
        std = math.sqrt(var)
        return cls(mean=mean, std=std if std > 1e-9 * max(1.0, abs(mean)) else 1.0)


class TableProfile(DataProfile):
    """Statistics of the plant's TRAINING rows only: the test split must not leak into the shared scaling."""

    target: str
    problem: Problem
    numeric: dict[str, Moments]
    categorical: dict[str, dict[str, int]]  # column -> value -> count (missing cells not counted)
    label_counts: dict[str, int]  # classification only
    target_moments: Moments | None = None  # regression only

    def label_counts_or_none(self) -> dict[str, int] | None:
        return dict(self.label_counts) if self.problem == "classification" else None


class TableSpec(TaskSpec):
    problem: Problem
    target: str
    numeric: dict[str, Scaling]  # in feature order
    categorical: dict[str, tuple[str, ...]]  # vocabulary, in feature order; ends with MISSING, UNKNOWN
    classes: tuple[str, ...] = ()  # classification: label text, sorted; index = class id
    target_scaling: Scaling | None = None  # regression: the model predicts the standardised target
    features: tuple[str, ...]  # names of the encoded columns, e.g. "temperature", "temperature:missing", "shift=night"


def table_schema(manifest: Manifest) -> dict[str, str]:
    """What plants must agree on: every feature column's type, and the target with its problem."""
    schema = {f"column:{c}": kind for c, kind in sorted(manifest.columns.items())}
    schema["target"] = f"{manifest.target} ({manifest.problem})"
    return schema


def table_profile(task: str, table: RawTable, manifest: Manifest, fingerprint: str) -> TableProfile:
    train = table.train
    labels: dict[str, int] = {}
    target_moments = None
    if manifest.problem == "classification":
        labels = dict(sorted(Counter(table.target[train].tolist()).items()))
    else:
        target_moments = Moments.of(table.target[train].astype(np.float64))
    return TableProfile(
        task=task,
        fingerprint=fingerprint,
        examples=int(train.sum()),
        schema=table_schema(manifest),
        target=manifest.target or "",
        problem=manifest.problem,
        numeric={c: Moments.of(v[train]) for c, v in table.numeric.items()},
        categorical={c: dict(sorted(Counter(v for v in col[train] if v is not None).items())) for c, col in table.categorical.items()},
        label_counts=labels,
        target_moments=target_moments,
    )


def feature_names(numeric: Iterable[str], categorical: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    names = [n for c in numeric for n in (c, f"{c}:missing")]
    names += [f"{c}={v}" for c, vocab in categorical.items() for v in vocab]
    return tuple(names)


def merge_profiles(task: str, model: str, profiles: list[TableProfile]) -> TableSpec:
    """Pool the plants' statistics; the profiles' schemas have already been checked to agree."""
    target, problem = profiles[0].target, profiles[0].problem
    numeric = {c: Scaling.of(Moments.pooled(p.numeric[c] for p in profiles)) for c in sorted(profiles[0].numeric)}
    categorical = {
        c: (*sorted({v for p in profiles for v in p.categorical[c]}), MISSING, UNKNOWN) for c in sorted(profiles[0].categorical)
    }
    classes: tuple[str, ...] = ()
    target_scaling = None
    if problem == "classification":
        classes = tuple(sorted({label for p in profiles for label in p.label_counts}))
        if len(classes) < 2:
            raise DataError(
                f"the plants' target '{target}' holds {len(classes)} class(es) ({', '.join(classes)}); a classifier needs at least two"
            )
    else:
        moments = Moments.pooled(p.target_moments or Moments() for p in profiles)
        if moments.count == 0:
            raise DataError(f"no plant has a training row with target '{target}'")
        target_scaling = Scaling.of(moments)
    return TableSpec(
        task=task,
        model=model,
        num_classes=len(classes) or 1,
        problem=problem,
        target=target,
        numeric=numeric,
        categorical=categorical,
        classes=classes,
        target_scaling=target_scaling,
        features=feature_names(numeric, categorical),
    )
