"""The base of every configuration model: frozen, typed, strict about unknown keys."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


def error_message(error: Any) -> str:
    """One of `ValidationError.errors()`'s messages, without pydantic's "Value error, " before a
    validator's own words."""
    return str(error["msg"]).removeprefix("Value error, ")


def describe_errors(err: ValidationError, prefix: str = "") -> str:
    """A pydantic validation error as one line a user can act on: `field: reason (got value)`."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        parts.append(f"{loc}: {error_message(e)} (got {e.get('input')!r})")
    return "; ".join(parts)


class Frozen(BaseModel):
    """A frozen pydantic model: resolved once at submission, stored on the run, passed down whole."""

    # No inf or nan in any setting (a temperature of inf sampled junk; nan passes every bound).
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
