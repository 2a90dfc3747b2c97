"""The anchor's run config: `[tool.flwr.app.config]` in pyproject, overridable with `flwr run --run-config`."""

from __future__ import annotations

import os

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import Field, field_validator, model_validator

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
    # Flower's aggregation strategy (fl_server.run.strategy.build_strategy). Robust against a hostile or broken plant:
    # fedtrimmedavg, fedmedian, krum, multikrum, bulyan; adaptive server optimisers: fedavgm, fedadam, fedyogi, fedadagrad.
    strategy: Literal[
        "fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedtrimmedavg", "fedmedian", "krum", "multikrum", "bulyan"
    ] = "fedavg"
    # FedAvgM's server learning rate, FedAdam/FedYogi/FedAdagrad's eta; 0: the strategy's own default (1.0 / 0.1 / 0.01 / 0.1).
    server_learning_rate: float = Field(0.0, ge=0.0, le=10.0)
    # FedAvgM's server momentum, FedAdam/FedYogi's beta_1.
    server_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    # FedTrimmedAvg: the fraction of plants cut at each end, per coordinate, before averaging.
    trim_fraction: float = Field(0.2, ge=0.0, lt=0.5)
    # Krum, MultiKrum, Bulyan: how many hostile plants to withstand (MultiKrum averages the min-plants - this most central).
    num_malicious: int = Field(1, ge=0)
    # Update validation (fl_server.run.validation): reject an update (reply - global weights) whose L2 norm exceeds this; 0: off.
    max_update_norm: float = Field(0.0, ge=0.0)
    # ... or exceeds this many times the median update norm: of this round's updates and the previous rounds'
    # medians (fl_server.run.validation); with two plants in round 1, of the smaller update. 0: off.
    update_norm_factor: float = Field(10.0, ge=0.0)
    # ... or stays above this many times that median in persistent-norm-rounds consecutive rounds; 0: off.
    persistent_norm_factor: float = Field(5.0, ge=0.0)
    persistent_norm_rounds: int = Field(3, ge=1)
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    fraction_evaluate: float = Field(1.0, ge=0.0, le=1.0)
    min_plants: int = Field(2, ge=1)
    # Federated evaluation of the global model every k rounds (and always after the last round).
    evaluate_every: int = Field(1, ge=1)
    # Every round's model but the last is evaluated by the plants when the next round's train message brings it, before
    # they train on it: one exchange per round instead of two (the last model is evaluated in its own exchange). Used
    # where every plant trains and evaluates (fraction-train = fraction-evaluate = 1); false: an exchange per evaluation.
    evaluate_with_train: bool = True
    # 0 (both): the model's own (tasks.base.TrainingDefaults: 5 epochs at 0.5 for a head on frozen features, 1 at 0.05 otherwise)
    local_epochs: int = Field(0, ge=0, le=1000)
    batch_size: int = Field(32, ge=1, le=65_536)
    learning_rate: float = Field(0.0, ge=0.0, le=10.0)
    # cosine: decays the plants' learning rate over the rounds (see tasks.base.scheduled_learning_rate)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    # How plants send their round's update (maxfl.encoding): fp32 weights, or fp16 deltas in half the bytes.
    update_encoding: Literal["fp32", "fp16"] = "fp32"
    seed: int = 42
    round_timeout_s: float = Field(900.0, gt=0.0)
    # How often the ServerApp asks the SuperLink for replies (Flower's own grid waits 3 s).
    poll_interval_s: float = Field(0.1, gt=0.0, le=10.0)
    tracking_uri: str = ""
    experiment_name: str = Field("maxfl", min_length=1)
    # Optional central DP at the plant level (fl_server.run.central_dp): each plant's round update is clipped to
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
    # The gate (fl_server.release.gate): metric (empty: the task's), aggregate margin over the champion, per-plant
    # tolerance, the floor a first model must clear, and how far the ONNX export may drift from torch.
    gate_metric: str = ""
    gate_margin: float = Field(0.005, ge=0.0)
    gate_tolerance: float = Field(0.02, ge=0.0)
    # Default 0: no minimum for a first model (for R^2: better than predicting the mean). Set one per task.
    gate_floor: float = 0.0
    # At every plant the candidate must beat the best constant answer (always "good"; a model that never alarms;
    # R^2 0) by this much in the gate metric, and answer more than one class: no release of a trivial model.
    gate_trivial_margin: float = Field(0.02, ge=-1.0)  # negative: off (pipeline tests on tiny data only)
    gate_onnx_tolerance: float = Field(1e-4, gt=0.0)
    # Contribution per plant after training (fl_server.run.contribution): Shapley values (exact for rounds of at most
    # contribution-exact-max-plants plants, else GTG-Shapley's truncated permutation sampling) and leave-one-out, of
    # sub-federation models rebuilt from the round's updates and scored by the plants on their held-out splits.
    # auto: both; shapley; loo; off.
    contribution: Literal["auto", "shapley", "loo", "off"] = "auto"
    # At most this many rebuilt models are evaluated; rounds beyond it are left unvalued (and named in the report).
    contribution_max_models: int = Field(2000, ge=1, le=1_000_000)
    contribution_exact_max_plants: int = Field(6, ge=1, le=12)  # rounds with at most this many plants: exact, all 2^n subsets
    # Truncation, in units of the gate metric: a round that moved the model less is worth 0; a permutation stops once its
    # prefix scores within this of the whole round's model.
    contribution_truncation: float = Field(0.001, ge=0.0, le=1.0)
    # Push runs: which version (0: the champion), which plants (comma-separated ids; empty: all), and how long
    # to wait for plants that are offline before leaving them pending.
    push_version: int = Field(0, ge=0)
    push_plants: str = ""
    push_wait_s: float = Field(0.0, ge=0.0, le=86_400.0)
    # Resume a training run whose ServerApp or SuperLink died: the MLflow run id it logged to. It continues
    # after the run's last checkpointed round (fl_server.run.checkpoint) with the same run config.
    resume: str = Field("", pattern=r"^$|^[0-9a-f]{32}$")
    # The anchor's append-only audit log (maxfl.audit): runs, rejected updates, gate results, deployments.
    # Empty: $MAXFL_HOME/anchor/audit.jsonl. `maxfl federation` writes joins and revocations to its own.
    audit_log: str = ""
    # The anchor's record of every plant's lifetime privacy spend per data set (fl_server.run.privacy_watch): a plant whose
    # reported spend went down (a deleted or restored ledger) is refused. Empty: $MAXFL_HOME/anchor/privacy-watch.json;
    # "off": no record (experiments that reset ledgers on purpose).
    privacy_watch: str = ""
    # The anchor's federation folder (`maxfl federation init --dir`): its plants.json maps node ids to plants
    # (fl_server.run.identity), and nodes the SuperLink has that it lacks are unregistered (fl_server.federation.reconcile).
    # Empty: the executor's (`maxfl-superexec --federation-dir`, $MAXFL_FEDERATION_DIR); neither (simulation,
    # insecure demos): a node is the plant it first claims to be, for the whole run.
    federation_dir: str = ""
    # A node registered outside maxfl (not in plants.json): "unregister" it at the start of every run, or only
    # "report" it (audit log + ServerApp log). Its replies are never heard either way.
    unknown_nodes: Literal["unregister", "report"] = "unregister"
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

    @model_validator(mode="after")
    def _strategy_fits(self) -> Self:
        """Combinations Flower would only refuse mid-run (Bulyan skips every round) or that void a guarantee."""
        f = self.num_malicious
        if self.strategy == "bulyan" and self.min_plants < 4 * f + 3:
            raise ValueError(f"bulyan needs min-plants >= 4 x num-malicious + 3 = {4 * f + 3}; raise min-plants or lower num-malicious")
        if self.strategy == "multikrum" and self.min_plants <= f:
            raise ValueError(f"multikrum averages min-plants - num-malicious updates, so min-plants must exceed num-malicious ({f})")
        if 0.0 < self.persistent_norm_factor <= 1.0:
            raise ValueError("persistent-norm-factor must be 0 (off) or above 1: at 1 or below it flags honest plants above the median")
        if 0.0 < self.update_norm_factor <= 1.0:
            raise ValueError("update-norm-factor must be 0 (off) or above 1: at 1 or below it rejects honest plants above the round's median")
        if self.central_dp != "off" and self.strategy != "fedavg":
            raise ValueError(f"central-dp calibrates its noise for a plain average; use strategy 'fedavg' with it, not '{self.strategy}'")
        return self

    def audit_log_path(self) -> Path:
        from fl_client.config import maxfl_home

        return Path(self.audit_log) if self.audit_log else maxfl_home() / "anchor" / "audit.jsonl"

    def federation_folder(self) -> Path | None:
        """The anchor's federation folder: the run config's, else the one the ServerApp executor checks apps against."""
        from fl_server.federation.serverapp_policy import FEDERATION_ENV

        folder = self.federation_dir or os.environ.get(FEDERATION_ENV, "")
        return Path(folder) if folder else None

    def privacy_watch_path(self) -> Path | None:
        from fl_client.config import maxfl_home

        if self.privacy_watch == "off":
            return None
        return Path(self.privacy_watch) if self.privacy_watch else maxfl_home() / "anchor" / "privacy-watch.json"

    def model_name(self) -> str:
        return self.registered_model or f"maxfl-{self.task}"

    def folds_evaluation(self) -> bool:
        """Rounds' evaluations ride on the next train message: only where the plants that train are the ones that evaluate."""
        return self.evaluate_with_train and self.fraction_train == 1.0 and self.fraction_evaluate == 1.0

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        return cls.parse(run_config)
