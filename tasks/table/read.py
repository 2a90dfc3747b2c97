"""Reading a plant's table and checking it against its manifest, before any statistic is taken.

Every problem is one DataError line that names the file and the data row (for CSV also the line, assuming
one line per row) or the column, so the plant operator can fix the data without reading a traceback. A CSV's
delimiter and decimal mark are the manifest's, or detected: exports from spreadsheets set to Korean or European
locales differ (`;` and decimal commas), and a wrong guess is named with the manifest key that fixes it.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from maxfl.errors import DataError
from tasks.defect.split import holdout_split
from tasks.manifest import Manifest


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


DELIMITERS = (",", ";", "\t", "|")
SHOWN = 3  # bad cells of a column named in its error; all of them are counted
_COMMA_DECIMAL = re.compile(r"^[+-]?\d*,\d+$")
_DOT_DECIMAL = re.compile(r"^[+-]?\d*\.\d+(?:[eE][+-]?\d+)?$")


def row_label(path: Path, index: int) -> str:
    """A data row the way the operator sees it: 1-based, and the CSV line below the header."""
    row = index + 1
    return f"row {row} (line {row + 1})" if path.suffix.lower() == ".csv" else f"row {row}"


def where(path: Path, index: int) -> str:
    return f"{path} {row_label(path, index)}"


def _spelled(delimiter: str) -> str:
    return "'\\t' (tab)" if delimiter == "\t" else repr(delimiter)


def header_separators(path: Path) -> dict[str, int]:
    """How often each candidate delimiter occurs in the header row (column names hold no decimal marks)."""
    with open(path, "rb") as fh:
        header = fh.readline(1 << 16).decode("utf-8-sig", errors="replace")
    return {d: header.count(d) for d in DELIMITERS}


def likeliest(separators: dict[str, int]) -> str:
    """The separator the header holds most of; ',' for a header of one column."""
    best = max(DELIMITERS, key=lambda d: separators[d])
    return best if separators[best] else ","


def detect_decimal(frame: pd.DataFrame, columns: list[str], delimiter: str) -> str:
    """',' when the numeric columns' cells hold decimal commas and no decimal points (never with ',' cells)."""
    if delimiter == ",":
        return "."
    commas = points = 0
    for column in columns:
        text = frame[column].dropna().astype(str).str.strip()
        commas += int(text.str.match(_COMMA_DECIMAL).sum())
        points += int(text.str.match(_DOT_DECIMAL).sum())
    return "," if commas and not points else "."


@dataclass(frozen=True)
class RawTable:
    """A validated table: features typed per the manifest, missing values marked, the split fixed."""

    source: Path
    numeric: dict[str, np.ndarray]  # float64, NaN where missing
    categorical: dict[str, np.ndarray]  # object: stripped text, None where missing
    target: np.ndarray  # classification: object (label text); regression: float64
    train: np.ndarray  # bool: the row is in the training split

    def __len__(self) -> int:
        return len(self.target)


def read_frame(path: Path, delimiter: str = ",", advice: str = "re-export it, or set delimiter in manifest.toml") -> pd.DataFrame:
    """CSV (all cells as text, so that we, not pandas, decide what a value is) or Parquet, by suffix. `advice`
    ends the error of a CSV that does not parse."""
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty: export the plant's table with a header row and data rows")
    parquet = path.suffix.lower() == ".parquet"
    try:
        if parquet:
            import pyarrow.parquet as pq

            frame = pq.read_table(path).to_pandas()
        else:
            with warnings.catch_warnings():
                # pandas only warns when the first data row has more fields than the header
                warnings.simplefilter("error", pd.errors.ParserWarning)
                frame = pd.read_csv(path, dtype=str, index_col=False, sep=delimiter)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty: export the plant's table with a header row and data rows") from None
    except Exception as exc:  # pandas, pyarrow and codecs raise many types for one cause: an unreadable file
        if parquet:
            raise DataError(f"{path} is not a readable Parquet file ({_one_line(exc)}); re-export it") from None
        raise DataError(f"{path} is not a readable CSV file ({_one_line(exc)}; read as {_spelled(delimiter)}-separated); {advice}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if len(frame) == 0:
        raise DataError(f"{path} has no data rows, only a header; export the plant's rows too")
    return frame


def as_text(values: pd.Series) -> np.ndarray:
    """Category or label text, spelled the same whether it came from CSV text or a typed Parquet column."""
    if pd.api.types.is_float_dtype(values.dtype):
        present = values.dropna()
        if len(present) and (present == present.round()).all():
            values = values.astype("Int64")  # 1.0 in Parquet is the label "1" in CSV
    text = values.astype("string").str.strip()
    out = text.to_numpy(dtype=object, na_value=None)
    out[(text == "").fillna(False).to_numpy(dtype=bool)] = None
    return out


def as_number(values: pd.Series, path: Path, column: str, role: str, decimal: str = ".") -> np.ndarray:
    """Finite floats, NaN where missing. Text or infinite values are one DataError that counts them all and names
    the first few rows; `decimal` ',': "1,5" is 1.5."""
    if pd.api.types.is_bool_dtype(values.dtype) or pd.api.types.is_numeric_dtype(values.dtype):
        numbers = values.astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
        given = ~np.isnan(numbers)
    else:
        text = values.astype("string").str.strip()
        given = (text.notna() & (text != "")).to_numpy(dtype=bool, na_value=False)
        if decimal == ",":  # "1.500" may be a thousand here: a decimal point is no number, not a guess
            dotted = text.str.match(_DOT_DECIMAL).fillna(False)
            text = text.str.replace(",", ".", regex=False).where(~dotted, "not a number")
        numbers = pd.to_numeric(text, errors="coerce").astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.flatnonzero(given & ~np.isfinite(numbers))
    if len(bad):
        raise DataError(_bad_numbers(values, bad, path, column, role, decimal))
    return numbers


def _bad_numbers(values: pd.Series, bad: np.ndarray, path: Path, column: str, role: str, decimal: str) -> str:
    cells = [str(values.iloc[int(i)]).strip() for i in bad]
    fix = "fix the value, leave the cell empty for missing, or declare the column categorical in manifest.toml"
    if decimal == "." and any(_COMMA_DECIMAL.match(c) for c in cells):
        fix = "they look like decimal commas: set decimal = \",\" in manifest.toml"
    elif decimal == "," and any(_DOT_DECIMAL.match(c) for c in cells):
        fix = "manifest.toml says decimal = \",\" but these use a decimal point: remove the key or fix the values"
    if len(bad) == 1:
        return f"{where(path, int(bad[0]))}: {role} '{column}' is numeric but holds {values.iloc[int(bad[0])]!r}; {fix}"
    shown = ", ".join(f"{row_label(path, int(i))} {values.iloc[int(i)]!r}" for i in bad[:SHOWN])
    more = f", and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
    return f"{path}: {role} '{column}' is numeric but {len(bad)} of its cells are not numbers: {shown}{more}; {fix}"


def _split(frame: pd.DataFrame, manifest: Manifest, path: Path, target: np.ndarray, seed: int) -> np.ndarray:
    """Train mask: from the split column when the manifest names one, else a seeded (stratified) holdout."""
    if manifest.split_column is None:
        if len(frame) < 2:
            raise DataError(f"{path} has 1 data row; a plant needs at least 2 (one to train on, one to test)")
        strata = target if manifest.problem == "classification" else np.zeros(len(target))
        train_idx, _ = holdout_split(strata.astype(str), manifest.test_fraction, seed)
        train = np.zeros(len(frame), dtype=bool)
        train[train_idx] = True
        return train
    marks = as_text(frame[manifest.split_column])
    lowered = np.array([m.lower() if m is not None else None for m in marks], dtype=object)
    bad = np.flatnonzero(~np.isin(lowered, ["train", "test"]))
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{where(path, i)}: split column '{manifest.split_column}' holds {marks[i]!r}; use 'train' or 'test'")
    train = lowered == "train"
    for name, rows in (("train", train), ("test", ~train)):
        if not rows.any():
            raise DataError(f"{path}: split column '{manifest.split_column}' marks no row '{name}'; mark at least one")
    return train


def read_table(data_dir: Path, manifest: Manifest, seed: int) -> RawTable:
    """Read the manifest's table and check it column by column and row by row."""
    path = manifest.data_path(data_dir)
    csv = path.suffix.lower() == ".csv"
    separators = header_separators(path) if csv else dict.fromkeys(DELIMITERS, 0)
    found = likeliest(separators)
    delimiter = manifest.delimiter or found
    # The manifest's delimiter is not in the header and another separator is: whatever error follows says so.
    fix = (f"the header is {_spelled(found)}-separated, not {_spelled(delimiter)}: set delimiter = {_spelled(found)} in manifest.toml"
           if separators[found] and not separators[delimiter] else "")
    frame = read_frame(path, delimiter, *([fix] if fix else []))
    hint = f"; {fix}" if fix else ""
    listed = ", ".join(frame.columns)
    target_name = manifest.target or ""
    if target_name not in frame.columns:
        raise DataError(f"{path} has no target column '{target_name}' (columns: {listed}): set target in manifest.toml to one of them{hint}")
    absent = [c for c in [*manifest.columns, manifest.split_column] if c is not None and c not in frame.columns]
    if absent:
        names = ", ".join(f"'{c}'" for c in absent)
        raise DataError(f"{path} lacks column(s) {names} named in manifest.toml (columns: {listed}); rename them or fix the manifest{hint}")
    kinds = manifest.columns
    numeric = [c for c in sorted(kinds) if kinds[c] == "numeric"] + ([target_name] if manifest.problem == "regression" else [])
    decimal = manifest.decimal or (detect_decimal(frame, numeric, delimiter) if csv else ".")
    if manifest.problem == "regression":
        target = as_number(frame[target_name], path, target_name, "target", decimal)
        empty = np.isnan(target)
    else:
        target = as_text(frame[target_name])
        empty = np.array([t is None for t in target], dtype=bool)
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise DataError(f"{where(path, i)}: target '{target_name}' is empty; label the row or remove it")
    return RawTable(
        source=path,
        numeric={c: as_number(frame[c], path, c, "column", decimal) for c in sorted(kinds) if kinds[c] == "numeric"},
        categorical={c: as_text(frame[c]) for c in sorted(kinds) if kinds[c] == "categorical"},
        target=target,
        train=_split(frame, manifest, path, target, seed),
    )
