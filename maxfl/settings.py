"""Base for settings that travel as Flower configs: kebab-case keys, one-line errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from maxfl.errors import ConfigError, describe_validation_error


class FlowerSettings(BaseModel):
    """Flower's run, node and message configs use kebab-case keys; fields stay snake_case in Python."""

    model_config = ConfigDict(populate_by_name=True, frozen=True, alias_generator=lambda s: s.replace("_", "-"))
    source: ClassVar[str] = "settings"  # names the config in error messages

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> Self:
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, cls.source)) from None

    def to_flower(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json")
