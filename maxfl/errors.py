"""User-facing errors: one line that says what is wrong and how to fix it."""

from __future__ import annotations

from pydantic import ValidationError


class UserError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits non-zero."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration value is missing or not allowed."""


class DataError(UserError):
    """A plant's data is missing, empty or malformed."""


class ProcessError(UserError):
    """A process of the federation could not start or stopped unexpectedly."""

    exit_code = 3


def describe_validation_error(exc: ValidationError, source: str) -> str:
    """Turn pydantic's multi-line report into one line naming each bad field."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(root)"
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        parts.append(f"'{field}'{shown}: {err['msg'].removeprefix('Value error, ')}")
    return f"invalid {source}: " + "; ".join(parts)


class GateFailed(UserError):
    """The run trained, but its model did not pass the federated evaluation gate: nothing new was released."""

    exit_code = 5
