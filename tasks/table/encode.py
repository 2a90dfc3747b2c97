"""Turning a validated table into the model's tensors, identically at every plant (the spec decides)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from maxfl.errors import DataError
from tasks.manifest import MANIFEST_FILE, Manifest
from tasks.table.read import RawTable, where
from tasks.table.spec import MISSING, UNKNOWN, TableSpec, table_schema


def check_manifest_fits(manifest: Manifest, spec: TableSpec, data_dir: str) -> None:
    """The plant's manifest may have changed since it profiled; encoding by a stale spec would be silently wrong."""
    have = table_schema(manifest)
    want = {f"column:{c}": "numeric" for c in spec.numeric} | {f"column:{c}": "categorical" for c in spec.categorical}
    want["target"] = f"{spec.target} ({spec.problem})"
    diffs = [
        f"{k} is {have.get(k, 'missing')!r}, the spec has {want.get(k, 'missing')!r}"
        for k in sorted(have.keys() | want.keys())
        if have.get(k) != want.get(k)
    ]
    if diffs:
        raise DataError(
            f"{data_dir}/{MANIFEST_FILE} no longer matches the federation's spec ({'; '.join(diffs)}); "
            "restore it or profile the plants again"
        )


def encode_features(table: RawTable, spec: TableSpec) -> np.ndarray:
    """Standardised numerics (missing -> the federated mean, i.e. 0) with a missing indicator each, then one-hot categories."""
    blocks: list[np.ndarray] = []
    for column, scaling in spec.numeric.items():
        values = table.numeric[column]
        missing = np.isnan(values)
        blocks.append(np.where(missing, 0.0, (values - scaling.mean) / scaling.std)[:, None])
        blocks.append(missing.astype(np.float64)[:, None])
    for column, vocab in spec.categorical.items():
        values = np.where(pd.isna(table.categorical[column]), MISSING, table.categorical[column])
        codes = pd.Index(vocab).get_indexer(values).astype(np.int64)
        codes[codes < 0] = vocab.index(UNKNOWN)
        blocks.append(np.eye(len(vocab))[codes])
    x = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(table), 0))
    assert x.shape[1] == len(spec.features), "encoding and spec.features disagree"
    return x.astype(np.float32)


def encode_target(table: RawTable, spec: TableSpec) -> np.ndarray:
    """Class ids by the spec's classes, or the target standardised by the federated scaling."""
    if spec.problem == "regression":
        scaling = spec.target_scaling
        assert scaling is not None, "a regression spec carries its target scaling"
        return ((table.target - scaling.mean) / scaling.std).astype(np.float32)
    index = {label: i for i, label in enumerate(spec.classes)}
    ids = np.array([index.get(label, -1) for label in table.target], dtype=np.int64)
    unknown = np.flatnonzero(ids < 0)
    if len(unknown):
        i = int(unknown[0])
        raise DataError(
            f"{where(table.source, i)}: label {table.target[i]!r} is not one of the federation's classes "
            f"({', '.join(spec.classes)}); fix the label or profile the plants again so that the spec includes it"
        )
    return ids
