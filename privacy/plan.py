"""The anchor's privacy request, part of the run config and of every round's instructions.

It asks; the plant decides. A plant derives its own noise from it under its own delta, and refuses any round
that would take it past its own ceiling (`privacy.budget`), whatever the request says.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from maxfl.settings import FlowerSettings


class PrivacyPlan(FlowerSettings):
    # dp-sgd: every plant trains with DP-SGD. none: only plants whose ceiling is max-epsilon="inf" take part.
    privacy: Literal["dp-sgd", "none"] = "dp-sgd"
    # Epsilon each plant may spend in this run; the plant derives its noise multiplier from it (its own delta,
    # sample rate, the run's rounds and local epochs). 0: use noise-multiplier as given.
    target_epsilon: float = Field(3.0, ge=0.0)
    noise_multiplier: float = Field(0.0, ge=0.0)
    # Per-example gradient clipping bound (L2).
    max_grad_norm: float = Field(1.0, gt=0.0)
    # auto: under DP-SGD each plant derives its batch size from its own record count (privacy.recipe: large batches,
    # at least 4 a epoch); fixed: every plant uses batch-size as given.
    dp_recipe: Literal["auto", "fixed"] = "auto"

    @model_validator(mode="after")
    def _noise_is_defined(self) -> Self:
        if self.privacy == "dp-sgd" and self.target_epsilon == 0.0 and self.noise_multiplier == 0.0:
            raise ValueError("dp-sgd needs 'target-epsilon' (> 0) or 'noise-multiplier' (> 0)")
        return self

    def privacy_fields(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in PrivacyPlan.model_fields}
