"""What travels in a round's messages besides the weights; validated on both ends."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from maxfl.settings import FlowerSettings
from privacy.plan import PrivacyPlan

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
PLANT = "plant"  # ConfigRecord in every reply: which plant answered (node ids are opaque)
FINGERPRINT_KEY = "data-fingerprint"  # in a train reply's PLANT record: the data set its ledger charged (fl_server.run.privacy_watch)
PROFILE = "profile"  # ConfigRecord key in a query reply: the plant's DataProfile as JSON
WEIGHT_KEY = "num-examples"
ONNX = "onnx"  # ConfigRecord {"model": bytes}: a model's ONNX file (gate evaluation, deploy)
RELEASE = "release"  # ConfigRecord in a deploy message: the ReleaseManifest JSON and the plants it targets
ACK = "ack"  # ConfigRecord in a deploy reply: what the plant's edge store did (DeployAck)
DEPLOY = "deploy"  # the ClientApp's query action that installs a released model ("query.deploy")
PRIVACY_PREFIX = "dp_"  # a train reply's privacy figures (privacy.budget): dp_epsilon, dp_noise_multiplier, ...


class DataQuery(FlowerSettings, extra="ignore"):
    """Sent once before training: describe your data for this task."""

    source: ClassVar[str] = "data query"

    task: str
    seed: int = 0


class TrainingPlan(DataQuery, PrivacyPlan):
    """What the anchor sends with every round's weights; the strategy adds the round number."""

    source: ClassVar[str] = "training plan"

    task_spec: str  # the TaskSpec JSON the anchor merged from all plants' profiles
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(0.05, gt=0.0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    update_encoding: Literal["fp32", "fp16"] = "fp32"  # how the plant sends its update back (maxfl.encoding)
    num_server_rounds: int = Field(1, ge=1)
    # The first Flower run of a training run resumed after a crash (0: this one): a plant's ledger counts the
    # resumed run as one run, so its per-run spend and noise plan carry over.
    run_series: int = Field(0, ge=0)


class RoundInstructions(TrainingPlan):
    """A round's message as the plant receives it: the plan plus the round Flower's strategy injected."""

    source: ClassVar[str] = "round instructions"

    server_round: int = Field(ge=1)


class DeployAck(FlowerSettings, extra="forbid"):
    """A plant's answer to a deploy message; `refused` keeps its previous model serving."""

    source: ClassVar[str] = "deploy acknowledgement"

    status: Literal["installed", "activated", "already-current", "refused", "not-targeted"]
    version: int = Field(ge=0)  # the version the message carried
    serving: int = Field(0, ge=0)  # the version the plant's store has current afterwards (0: none)
    detail: str = ""
    variant: Literal["global", "personalised", "local"] = "global"  # what the plant serves of it (fl_client.personalise)
