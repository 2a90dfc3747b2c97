"""What travels in a round's messages besides the weights; validated on both ends."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from maxfl.settings import FlowerSettings

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
PLANT = "plant"  # ConfigRecord in every reply: which plant answered (node ids are opaque)
WEIGHT_KEY = "num-examples"


class RoundInstructions(FlowerSettings, extra="ignore"):
    """Sent by the anchor with the global weights; the plant trains or evaluates accordingly."""

    source: ClassVar[str] = "round instructions"

    task: str
    server_round: int = Field(ge=1)
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(0.05, gt=0.0)
    seed: int = 0
