"""The process task's edge adapter: a window of raw measurements in, a fault diagnosis and alarm out.

A request window is made into a one-run `ProcessSplit` and goes through `windows()` with the plant's own
fault-free statistics, exactly the path of the training windows (float32 recording, normalisation, the
(variables, time) layout), so serving cannot drift from training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tasks.base import BadInput
from tasks.process.simulate import ProcessSplit
from tasks.process.windows import windows
from tasks.serving import check_instances, class_answers


def fault_label(idv: int) -> str:
    return "normal" if idv == 0 else f"IDV{idv:02d}"


class ProcessServing:
    """Instances are [time step][variable] lists: `window` rows, one per sample, in the recording's column order."""

    kind = "window"

    def __init__(
        self, classes: tuple[int, ...], window: int, variables: int, alarm_below: float, mean: np.ndarray, std: np.ndarray
    ) -> None:
        if classes[0] != 0:
            raise ValueError(f"the spec's first class must be 0 (normal operation), got {classes[0]}")
        if mean.shape != (variables,) or std.shape != (variables,):
            raise ValueError(f"the plant's statistics cover {mean.shape} variables, the spec has {variables}")
        self.classes, self.window, self.variables, self.alarm_below = classes, window, variables, alarm_below
        self.mean, self.std = mean, std
        self.labels = tuple(fault_label(c) for c in classes)

    def _samples(self, instance: Any, index: int) -> np.ndarray:
        """One instance as float32 (window, variables), the recording's dtype; BadInput naming what is wrong."""
        expected = f"{self.window} time steps x {self.variables} variables ([time step][variable])"
        try:
            values = np.asarray(instance)
        except ValueError:  # ragged nested lists
            raise BadInput(f"instance {index} is not a rectangular window; expected {expected}") from None
        if values.dtype.kind not in "iuf":
            if values.dtype.kind == "O" and values.ndim != 2:
                raise BadInput(f"instance {index} is not a rectangular window; expected {expected}")
            raise BadInput(f"instance {index} holds non-numeric values (numpy reads them as {values.dtype}); send numbers only")
        if values.shape != (self.window, self.variables):
            raise BadInput(f"instance {index} has shape {'x'.join(map(str, values.shape)) or 'scalar'}; expected {expected}")
        with np.errstate(over="ignore"):
            samples = values.astype(np.float32)
        if not np.isfinite(samples).all():
            raise BadInput(f"instance {index} holds non-finite values (NaN, infinity or beyond float32); send measured values only")
        return samples

    def batch(self, instances: Sequence[Any]) -> np.ndarray:
        check_instances(instances)
        x = np.concatenate([self._samples(inst, i) for i, inst in enumerate(instances)])
        n = len(instances)
        # each instance its own run: windows() then yields exactly one window per instance, in order
        split = ProcessSplit(x=x, label=np.zeros(len(x), dtype=np.int64), run=np.repeat(np.arange(n, dtype=np.int32), self.window))
        inputs, _, _ = windows(split, self.mean, self.std, self.window)
        assert len(inputs) == n
        return inputs.numpy().astype(np.float32, copy=False)

    def answers(self, outputs: np.ndarray) -> list[dict[str, Any]]:
        answers = class_answers(outputs, self.labels)
        for answer in answers:
            answer["fault"] = self.classes[self.labels.index(answer["label"])]
            # the alarm rule of detection_metrics: normal operation is less likely than the spec's alarm limit
            answer["alarm"] = answer["probabilities"][self.labels[0]] < self.alarm_below
        return answers

