"""The anchor's run config: `[tool.flwr.app.config]` in pyproject, overridable with `flwr run --run-config`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

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

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        return cls.parse(run_config)
