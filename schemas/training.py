"""Model shape and training options, char-rnn's names where they exist. See docs/training.md."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.base import Frozen


class ModelConfig(Frozen):
    model: Literal["lstm", "gru", "rnn"] = "lstm"
    rnn_size: int = Field(default=128, gt=0)
    num_layers: int = Field(default=2, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # 0 means "same as rnn_size".
    embedding_size: int = Field(default=0, ge=0)


class TrainConfig(Frozen):
    seq_length: int = Field(default=50, gt=1)
    batch_size: int = Field(default=50, gt=0)
    learning_rate: float = Field(default=2e-3, gt=0)
    grad_clip: float = Field(default=5.0, gt=0)
    val_frac: float = Field(default=0.05, gt=0, lt=0.5)
    eval_val_every: int = Field(default=200, gt=0)
    checkpoint_every: int = Field(default=500, gt=0)
    seed: int = 123
    max_iters: int = Field(default=2000, gt=0)
    optimizer: Literal["adam", "rmsprop"] = "adam"


PRESETS: dict[str, tuple[ModelConfig, TrainConfig]] = {
    "tiny": (
        ModelConfig(rnn_size=32, num_layers=1),
        TrainConfig(seq_length=32, batch_size=16, max_iters=60, eval_val_every=20, checkpoint_every=30),
    ),
    "small": (ModelConfig(rnn_size=128, num_layers=2), TrainConfig()),
    "medium": (ModelConfig(rnn_size=512, num_layers=2), TrainConfig(max_iters=20000)),
    "large": (ModelConfig(rnn_size=512, num_layers=3), TrainConfig(max_iters=50000)),
}
DEFAULT_PRESET = "small"
