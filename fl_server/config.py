"""The anchor's run config: `[tool.flwr.app.config]` in pyproject, overridable with `flwr run --run-config`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from maxfl.release import MODEL_NAME_PATTERN
from privacy.plan import PrivacyPlan
from tasks import task_names


class RunConfig(PrivacyPlan, extra="forbid"):
    """One federated training run; the privacy request (`PrivacyPlan`) is part of it."""

    source: ClassVar[str] = "run config"

    task: str = "defect"
    # The task's model; empty picks the task's default. Checked against the task before training.
    model: str = ""
    # Model input size for image tasks that resize (bring-your-own image folders).
    image_size: int = Field(64, ge=8, le=512)
    num_server_rounds: int = Field(3, ge=1, le=10_000)
    strategy: Literal["fedavg"] = "fedavg"
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    fraction_evaluate: float = Field(1.0, ge=0.0, le=1.0)
    min_plants: int = Field(2, ge=1)
    # Federated evaluation of the global model every k rounds (and always after the last round).
    evaluate_every: int = Field(1, ge=1)
    local_epochs: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=65_536)
    learning_rate: float = Field(0.05, gt=0.0, le=10.0)
    # cosine: decays the plants' learning rate over the rounds (see tasks.base.scheduled_learning_rate)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    seed: int = 42
    round_timeout_s: float = Field(900.0, gt=0.0)
    # How often the ServerApp asks the SuperLink for replies (Flower's own grid waits 3 s).
    poll_interval_s: float = Field(0.1, gt=0.0, le=10.0)
    tracking_uri: str = ""
    experiment_name: str = Field("maxfl", min_length=1)
    # Optional central DP at the plant level (fl_server.central_dp): each plant's round update is clipped to
    # central-dp-clipping-norm (by the anchor, or by the plant before sending) and noise is added to the average.
    central_dp: Literal["off", "server-clipping", "plant-clipping"] = "off"
    central_dp_noise_multiplier: float = Field(1.0, gt=0.0)
    central_dp_clipping_norm: float = Field(1.0, gt=0.0)
    central_dp_delta: float = Field(1e-5, gt=0.0, lt=1.0)
    # What the ServerApp does: train (then gate, register and push when release is on), or push a registered
    # version to the plants' edge stores (`maxfl model push` submits such runs).
    action: Literal["train", "push"] = "train"
    # After training: evaluate against the champion at every plant, register, and push if the gate passes.
    release: bool = True
    registered_model: str = Field("", pattern=rf"^$|{MODEL_NAME_PATTERN}")  # empty: maxfl-<task>
    # The gate (fl_server.gate): metric (empty: the task's), aggregate margin over the champion, per-plant
    # tolerance, the floor a first model must clear, and how far the ONNX export may drift from torch.
    gate_metric: str = ""
    gate_margin: float = Field(0.005, ge=0.0)
    gate_tolerance: float = Field(0.02, ge=0.0)
    # Default 0: no minimum for a first model (for R^2: better than predicting the mean). Set one per task.
    gate_floor: float = 0.0
    gate_onnx_tolerance: float = Field(1e-4, gt=0.0)
    # Push runs: which version (0: the champion), which plants (comma-separated ids; empty: all), and how long
    # to wait for plants that are offline before leaving them pending.
    push_version: int = Field(0, ge=0)
    push_plants: str = ""
    push_wait_s: float = Field(0.0, ge=0.0, le=86_400.0)
    # Simulation only: virtual plant k reads its data from <sim-data-root>/plant-<k+1>.
    sim_data_root: str = ""
    # Simulation only: the virtual plants' node configs (each plant's ceiling and delta; see PlantConfig).
    sim_max_epsilon: float = Field(10.0, gt=0.0)
    sim_delta: float = Field(1e-5, gt=0.0, lt=1.0)

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in task_names():
            raise ValueError(f"unknown task; allowed values: {', '.join(task_names())}")
        return value

    def model_name(self) -> str:
        return self.registered_model or f"maxfl-{self.task}"

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        return cls.parse(run_config)
