"""Sampling options, as char-rnn and nanoGPT users expect them. See docs/sampling.md."""

from __future__ import annotations

from pydantic import Field, field_validator

from schemas.base import Frozen
from schemas.training import SEED_LIMIT


class SampleConfig(Frozen):
    num_samples: int = Field(default=16, gt=0)
    # Characters generated after the prime (the prime is not counted).
    length: int = Field(default=500, gt=0)
    # 0 means argmax (greedy); 1 samples the model's own distribution.
    temperature: float = Field(default=0.8, ge=0.0)
    # Keep only the k most likely characters at each step; None keeps all.
    top_k: int | None = Field(default=None, gt=0)
    # Text every sample starts with; it is fed to the model once, as one (n, len) batch.
    prime: str = ""
    # None draws a fresh seed, which is recorded with the batch so it can be reproduced.
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    argmax: bool = False
    # "latest", "best" or a step number (as text).
    checkpoint: str = "best"

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _checkpoint_choice(cls, value: object) -> str:
        text = str(value).strip().lower()
        if text in ("latest", "best") or text.isdigit():
            return text
        raise ValueError("checkpoint must be 'latest', 'best' or a step number")

    @property
    def greedy(self) -> bool:
        """True when every step takes the most likely character (argmax or temperature 0)."""
        return self.argmax or self.temperature == 0.0


class SampleText(Frozen):
    """One generated text and what the sampler knows about it."""

    index: int  # position in its batch
    text: str  # the prime followed by the generated characters
    generated: int  # characters generated after the prime
    # The model's own average -log2 p(char) over the generated characters, at temperature 1:
    # how surprising the model finds what it wrote (compare with the corpus's bits/char).
    bits_per_char: float
