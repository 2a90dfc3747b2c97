"""Reading a plant's table and checking it against its manifest, before any statistic is taken.

Every problem is one DataError line that names the file and the data row (for CSV also the line, assuming
one line per row) or the column, so the plant operator can fix the data without reading a traceback.
"""

from __future__ import annotations

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


def where(path: Path, index: int) -> str:
    """Name a data row the way the operator sees it: 1-based, and the CSV line below the header."""
    row = index + 1
    return f"{path} row {row} (line {row + 1})" if path.suffix.lower() == ".csv" else f"{path} row {row}"


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


def read_frame(path: Path) -> pd.DataFrame:
    """CSV (all cells as text, so that we, not pandas, decide what a value is) or Parquet, by suffix."""
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
                frame = pd.read_csv(path, dtype=str, index_col=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty: export the plant's table with a header row and data rows") from None
    except Exception as exc:  # pandas, pyarrow and codecs raise many types for one cause: an unreadable file
        kind = "Parquet" if parquet else "CSV"
        raise DataError(f"{path} is not a readable {kind} file ({_one_line(exc)}); re-export it") from None
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


def as_number(values: pd.Series, path: Path, column: str, role: str) -> np.ndarray:
    """Finite floats, NaN where missing; the first text or infinite value is a DataError naming its row."""
    if pd.api.types.is_bool_dtype(values.dtype) or pd.api.types.is_numeric_dtype(values.dtype):
        numbers = values.astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
        given = ~np.isnan(numbers)
    else:
        text = values.astype("string").str.strip()
        given = (text.notna() & (text != "")).to_numpy(dtype=bool, na_value=False)
        numbers = pd.to_numeric(text, errors="coerce").astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.flatnonzero(given & ~np.isfinite(numbers))
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"{where(path, i)}: {role} '{column}' is numeric but holds {values.iloc[i]!r}; "
            f"fix the value, leave the cell empty for missing, or declare the column categorical in manifest.toml"
        )
    return numbers


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
    frame = read_frame(path)
    listed = ", ".join(frame.columns)
    target_name = manifest.target or ""
    if target_name not in frame.columns:
        raise DataError(f"{path} has no target column '{target_name}' (columns: {listed}): set target in manifest.toml to one of them")
    absent = [c for c in [*manifest.columns, manifest.split_column] if c is not None and c not in frame.columns]
    if absent:
        names = ", ".join(f"'{c}'" for c in absent)
        raise DataError(f"{path} lacks column(s) {names} named in manifest.toml (columns: {listed}); rename them or fix the manifest")
    if manifest.problem == "regression":
        target = as_number(frame[target_name], path, target_name, "target")
        empty = np.isnan(target)
    else:
        target = as_text(frame[target_name])
        empty = np.array([t is None for t in target], dtype=bool)
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise DataError(f"{where(path, i)}: target '{target_name}' is empty; label the row or remove it")
    kinds = manifest.columns
    return RawTable(
        source=path,
        numeric={c: as_number(frame[c], path, c, "column") for c in sorted(kinds) if kinds[c] == "numeric"},
        categorical={c: as_text(frame[c]) for c in sorted(kinds) if kinds[c] == "categorical"},
        target=target,
        train=_split(frame, manifest, path, target, seed),
    )
