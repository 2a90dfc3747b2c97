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
# MetricRecord in a train reply whose message asked `evaluate-first`: the plant's evaluation, on its held-out split, of
# the weights it received (the previous round's model) before it trained on them (fl_server.run.strategy).
EVALUATION = "evaluation"
EVALUATE_FIRST = "evaluate-first"  # the config key of RoundInstructions.evaluate_first
# The ClientApp's query action that scores the anchor's rebuilt sub-federation models ("query.contribution",
# fl_server.run.contribution_round), and the ConfigRecord of its request (ContributionRequest).
CONTRIBUTION = "contribution"


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
    # Evaluate the received weights on the held-out split before training (EVALUATION in the reply): the previous
    # round's evaluation rides on this round's train message instead of an exchange of its own.
    evaluate_first: bool = False


class DeployAck(FlowerSettings, extra="forbid"):
    """A plant's answer to a deploy message; `refused` keeps its previous model serving."""

    source: ClassVar[str] = "deploy acknowledgement"

    status: Literal["installed", "activated", "already-current", "refused", "not-targeted"]
    version: int = Field(ge=0)  # the version the message carried
    serving: int = Field(0, ge=0)  # the version the plant's store has current afterwards (0: none)
    detail: str = ""
    variant: Literal["global", "personalised", "local"] = "global"  # what the plant serves of it (fl_client.personalise)


class ContributionRequest(FlowerSettings, extra="forbid"):
    """With a stack of rebuilt models (ARRAYS, one row per model): which metric to return for each, on the held-out split."""

    source: ClassVar[str] = "contribution request"

    metric: str = Field(min_length=1)  # the gate's metric (fl_server.release.chain.gate_rule)
    offset: int = Field(0, ge=0)  # the first row's index in the anchor's batch (a large batch spans several messages)
