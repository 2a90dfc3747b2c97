"""The table task's edge adapter: a row as a JSON object in, a class or a value out.

Rows become a `RawTable` through the reader's own converters (`as_number`, `as_text`) and are encoded by
`encode_features` under the release's spec, so a request row is read and encoded as its CSV or Parquet row
was in training. A missing value (null, or an empty cell) takes the training path for missing values:
the federated mean with the missing indicator set, or the '<missing>' category.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from maxfl.errors import DataError
from tasks.base import BadInput
from tasks.serving import check_instances, check_outputs, class_answers
from tasks.table.encode import encode_features
from tasks.table.read import RawTable, as_number, as_text
from tasks.table.spec import TableSpec

REQUEST = Path("request")  # stands in for the table file in the reader's messages; never opened
_SCALARS = (str, int, float, np.generic)


def csv_missing_marks() -> frozenset[str]:
    """The texts pandas' CSV reader turns into missing cells ("", "NA", "null", ...): a plant whose table is a CSV
    trained on them as missing, so its requests must read them as missing too."""
    from pandas._libs.parsers import STR_NA_VALUES  # the reader's own list; not re-typed here

    return frozenset(STR_NA_VALUES)


class TableServing:
    """Instances are {column: value} objects holding every feature column of the spec; other keys are ignored."""

    kind = "row"

    def __init__(self, spec: TableSpec, missing_marks: frozenset[str] = frozenset()) -> None:
        self.spec = spec
        self.columns = (*spec.numeric, *spec.categorical)
        self.missing_marks = missing_marks  # texts that count as a missing cell, as in the plant's own table

    def _values(self, rows: Sequence[Mapping[str, Any]], column: str) -> list[Any]:
        values = [row[column] for row in rows]
        for i, value in enumerate(values):
            if value is not None and not isinstance(value, _SCALARS):
                raise BadInput(f"instance {i}: column '{column}' holds a {type(value).__name__}; send a number, a text or null")
        if self.missing_marks:
            values = [None if isinstance(v, str) and v in self.missing_marks else v for v in values]
        return values

    def _numeric(self, column: str, values: list[Any]) -> np.ndarray:
        try:
            return as_number(pd.Series(values, dtype=object), REQUEST, column, "column")
        except DataError:
            for i, value in enumerate(values):  # name the instance, not the reader's row
                try:
                    as_number(pd.Series([value], dtype=object), REQUEST, column, "column")
                except DataError:
                    raise BadInput(
                        f"instance {i}: column '{column}' is numeric but holds {value!r}; send a number, or null if missing"
                    ) from None
            raise

    @staticmethod
    def _text(values: list[Any]) -> np.ndarray:
        text = as_text(pd.Series(values, dtype=object))
        for i, value in enumerate(values):
            if isinstance(value, (float, np.floating)):
                # typed numbers are read like a Parquet float column, where 3.0 is the category "3"
                text[i] = as_text(pd.Series([value], dtype=np.float64))[0]
        return text

    def raw_table(self, instances: Sequence[Any]) -> RawTable:
        """The request as the reader would have returned it (no target, nothing in the training split)."""
        check_instances(instances)
        for i, row in enumerate(instances):
            if not isinstance(row, Mapping):
                raise BadInput(f"instance {i} is not an object of column values (got {type(row).__name__})")
            absent = [c for c in self.columns if c not in row]
            if absent:
                names = ", ".join(repr(c) for c in absent)
                raise BadInput(f"instance {i} lacks column(s) {names}; send every feature column, null where a value is missing")
        n = len(instances)
        target = np.full(n, np.nan) if self.spec.problem == "regression" else np.full(n, None, dtype=object)
        return RawTable(
            source=REQUEST,
            numeric={c: self._numeric(c, self._values(instances, c)) for c in self.spec.numeric},
            categorical={c: self._text(self._values(instances, c)) for c in self.spec.categorical},
            target=target,
            train=np.zeros(n, dtype=bool),
        )

    def batch(self, instances: Sequence[Any]) -> np.ndarray:
        return encode_features(self.raw_table(instances), self.spec)

    def answers(self, outputs: np.ndarray) -> list[dict[str, Any]]:
        if self.spec.problem == "classification":
            return class_answers(outputs, self.spec.classes)
        scaling = self.spec.target_scaling
        assert scaling is not None, "a regression spec carries its target scaling"
        pred = check_outputs(outputs, 1)[:, 0].astype(np.float64)
        # the model predicts the standardised target; undo it as regression_metrics does (y * std + mean)
        return [{"value": float(v)} for v in pred * scaling.std + scaling.mean]
