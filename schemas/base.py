"""The base of every configuration model: frozen, typed, strict about unknown keys."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    """A frozen pydantic model: resolved once at submission, stored on the run, passed down whole."""

    model_config = ConfigDict(frozen=True, extra="forbid")
