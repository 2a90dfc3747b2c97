"""A released model as it travels from the anchor's registry to a plant's edge store."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
ONNX_FILE = "model.onnx"
MANIFEST_FILE = "release.json"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ReleaseManifest(BaseModel):
    """What a plant needs to verify, install and serve one registered model version.

    It sits beside `model.onnx` in the anchor's run artifacts, travels in the deploy message, and is stored
    next to the model in the plant's edge store.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["maxfl-release/1"] = "maxfl-release/1"
    model_name: str = Field(pattern=MODEL_NAME_PATTERN)  # the MLflow registered model, e.g. maxfl-defect
    version: int = Field(ge=1)  # its MLflow model version
    task: str
    task_spec: str  # the TaskSpec JSON the model was trained under: classes, shapes, encodings
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of the ONNX file's bytes
    size_bytes: int = Field(gt=0)
    input_name: str
    output_name: str  # logits, shape (batch, num_classes); (batch, 1) for regression
    mlflow_run_id: str
    flwr_run_id: int
    created_at: datetime
    # The training run's seed: it fixed every plant's held-out split, so a plant personalising this model carves its
    # validation records out of the same training split and never touches the test split.
    seed: int = 0

    @property
    def label(self) -> str:
        return f"{self.model_name} v{self.version}"
