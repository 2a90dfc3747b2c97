"""From a plant's recording to model inputs: per-plant normalisation and time windows.

Normalisation uses the plant's own fault-free training run, not federated statistics. Plants run
different operating modes, so their normal operating points differ by many standard deviations;
pooled statistics would leave each plant's normal state off-centre and the model would have to learn
every mode's normal region. Scaled by its own normal operation, every plant's normal state is ~N(0, 1)
and a fault is a deviation from it, which is what transfers between plants. It also needs no exchange.
"""

from __future__ import annotations

import numpy as np
import torch

from maxfl.errors import DataError
from tasks.process.simulate import ProcessSplit

MIN_STD = 1e-3  # a constant variable (the agitator speed) scales to zeros, not to noise


def normal_statistics(split: ProcessSplit) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of each variable over the split's fault-free samples."""
    normal = split.x[split.label == 0]
    if len(normal) < 2:
        raise DataError("the recording has no fault-free training samples to normalise against; record normal operation first")
    return normal.mean(axis=0), np.maximum(normal.std(axis=0), MIN_STD)


def windows(split: ProcessSplit, mean: np.ndarray, std: np.ndarray, length: int, stride: int = 1) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Windows (N, variables, length) that never cross two runs, labelled by their last sample, and each
    window's offset from the start of its run (windows at offsets 0, length, 2*length, ... share no sample)."""
    x = ((split.x - mean) / std).astype(np.float32)
    starts, offsets = [], []
    for run in np.unique(split.run):
        idx = np.flatnonzero(split.run == run)
        first, last = idx[0], idx[-1]
        run_starts = range(first, last - length + 2, stride)
        starts.extend(run_starts)
        offsets.extend(s - first for s in run_starts)
    if not starts:
        raise DataError(f"every run is shorter than the {length}-sample window; record longer runs")
    s = np.asarray(starts)
    view = np.lib.stride_tricks.sliding_window_view(x, length, axis=0)  # (T-length+1, variables, length)
    return torch.from_numpy(np.ascontiguousarray(view[s])), split.label[s + length - 1], np.asarray(offsets)
