"""Sampling options, as char-rnn and nanoGPT users expect them. See docs/sampling.md."""

from __future__ import annotations

from pydantic import Field

from schemas.base import Frozen


class SampleConfig(Frozen):
    num_samples: int = Field(default=16, gt=0)
    length: int = Field(default=500, gt=0)
    temperature: float = Field(default=0.8, ge=0.0)
    top_k: int | None = Field(default=None, gt=0)
    prime: str = ""
    seed: int | None = None
    argmax: bool = False
    # "latest", "best" or a step number (as text).
    checkpoint: str = "best"
