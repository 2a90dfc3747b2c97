"""What travels in a round's messages besides the weights; validated on both ends."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from maxfl.errors import ConfigError, describe_validation_error

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
PLANT = "plant"  # ConfigRecord in every reply: which plant answered (node ids are opaque)
WEIGHT_KEY = "num-examples"


class RoundInstructions(BaseModel):
    """Sent by the anchor with the global weights; the plant trains or evaluates accordingly."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True, alias_generator=lambda s: s.replace("_", "-"))

    task: str
    server_round: int = Field(ge=1)
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(0.05, gt=0.0)
    seed: int = 0

    @classmethod
    def from_record(cls, record: Any) -> RoundInstructions:
        try:
            return cls.model_validate(dict(record))
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, "round instructions")) from None

    def to_record_values(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)
