"""Model shape and training options, char-rnn's names where they exist. See docs/training.md.

Every field is settable with `charforge jobs submit --set key=value`; values arrive as text and
are validated here, so a bad value is refused at submission with the reason and valid choices.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from schemas.base import Frozen

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Seeds are below 2**63: torch.Generator.manual_seed takes at most 2**64 - 1, and training seeds
# a second generator with seed + 1.
SEED_LIMIT = 2**63


def parse_duration(value: Any) -> float | None:
    """`100s`, `30m`, `2h`, `1h30m`, `90` (seconds) or a number -> seconds; `none`/"" -> None."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return None if value is None else float(value)
    text = str(value).strip().lower().replace(" ", "")
    if text in ("", "none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {value!r} (use e.g. 100s, 30m, 2h, 1h30m)")
    return float(sum(float(n) * _UNIT_SECONDS[u] for n, u in parts))


def _none_words(value: Any) -> Any:
    """Let `--set max_epochs=none` clear an optional setting."""
    if isinstance(value, str) and value.strip().lower() in ("", "none", "off"):
        return None
    return value


class ModelConfig(Frozen):
    # The recurrent cell: fused nn.LSTM, nn.GRU or nn.RNN (tanh).
    model: Literal["lstm", "gru", "rnn"] = "lstm"
    rnn_size: int = Field(default=128, gt=0, le=8192)
    num_layers: int = Field(default=2, gt=0, le=16)
    # Dropout between recurrent layers and before the head (char-rnn's placement).
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # 0 means "same as rnn_size".
    embedding_size: int = Field(default=0, ge=0, le=8192)


class TrainConfig(Frozen):
    # Window length for truncated BPTT, and windows per batch. The defaults (and those of the
    # learning rate and its schedule) are what learned best per CPU-second in bench/train.py
    # part (c); see docs/training.md.
    seq_length: int = Field(default=32, gt=1)
    batch_size: int = Field(default=128, gt=0)
    # How windows are drawn: "sequential" = each batch row reads its own contiguous stretch of the
    # corpus and the hidden state is carried from one window to the next (char-rnn/torch-rnn);
    # "random" = windows at random offsets, each starting from a zero state.
    batching: Literal["sequential", "random"] = "sequential"

    optimizer: Literal["adam", "rmsprop"] = "adam"
    learning_rate: float = Field(default=1e-2, gt=0, le=10)
    # Schedule: linear warmup over `warmup_iters`, then decay to `min_lr_frac * learning_rate`
    # by the end of training (the end of `max_iters`, or of `time_budget` if that comes first).
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_iters: int = Field(default=100, ge=0)
    min_lr_frac: float = Field(default=0.02, ge=0.0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    # Gradient clipping by global norm.
    grad_clip: float = Field(default=5.0, gt=0)

    # Numeric precision: "auto" = bf16 autocast on CPUs with native bf16 (AMX/AVX512-BF16),
    # fp16 AMP on CUDA (bf16 where the GPU has it), fp32 elsewhere.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    # The contiguous tail of the corpus held out for validation.
    val_frac: float = Field(default=0.05, gt=0, lt=0.5)
    eval_val_every: int = Field(default=1000, gt=0)
    # Validation reads at most this many characters of the held-out tail (from its start).
    eval_max_chars: int = Field(default=500_000, gt=0)
    checkpoint_every: int = Field(default=1000, gt=0)
    # Also checkpoint (at the next step boundary) once this much wall time has passed since the
    # last checkpoint: 1000 steps of a big network on a CPU take hours, and a run killed before
    # its first checkpoint restarts from step 0. Durations as for `time_budget`; 0 turns it off.
    checkpoint_every_seconds: float = Field(default=600.0, ge=0)
    # Checkpoints kept: the last `keep_last` plus the best by validation loss.
    keep_last: int = Field(default=3, ge=1)
    # Train loss, lr and chars/s are reported every `log_every` steps.
    log_every: int = Field(default=10, gt=0)
    # Model init, dropout and batch order. Below 2**63 so that every generator seeded from it
    # (the data generator takes seed + 1) accepts it; a bigger value is refused at submission.
    seed: int = Field(default=123, ge=0, lt=SEED_LIMIT)

    # Stopping: whichever of these comes first. `time_budget` takes durations ("100s", "30m").
    max_iters: int = Field(default=5000, gt=0)
    max_epochs: float | None = Field(default=None, gt=0)
    time_budget: float | None = Field(default=None, gt=0)

    # Characters seen fewer than `vocab_min_count` times, or beyond the `vocab_max_size` most
    # frequent, map to the one unknown symbol (so a huge Unicode corpus keeps a small vocabulary).
    vocab_min_count: int = Field(default=2, ge=1)
    vocab_max_size: int = Field(default=4096, ge=2, le=65536)

    @field_validator("time_budget", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float | None:
        return parse_duration(value)

    @field_validator("checkpoint_every_seconds", mode="before")
    @classmethod
    def _interval(cls, value: Any) -> float:
        return parse_duration(value) or 0.0  # "none"/"off" turn it off, as 0 does

    @field_validator("max_epochs", mode="before")
    @classmethod
    def _optional(cls, value: Any) -> Any:
        return _none_words(value)


PRESETS: dict[str, tuple[ModelConfig, TrainConfig]] = {
    # Seconds on a laptop CPU: for tests and smoke runs.
    "tiny": (
        ModelConfig(rnn_size=32, num_layers=1),
        TrainConfig(
            seq_length=32, batch_size=16, max_iters=60, eval_val_every=20, checkpoint_every=30,
            eval_max_chars=20_000, log_every=5, precision="fp32", warmup_iters=0,
        ),
    ),
    # char-rnn's default network (2x128) with the training defaults above: the default preset.
    "small": (ModelConfig(rnn_size=128, num_layers=2), TrainConfig()),
    # Bigger networks: longer windows, a gentler learning rate (meant for GPUs or long runs).
    "medium": (
        ModelConfig(rnn_size=512, num_layers=2, dropout=0.25),
        TrainConfig(seq_length=100, batch_size=64, learning_rate=2e-3, warmup_iters=200,
                    max_iters=20000),
    ),
    # The Linux-scale network.
    "large": (
        ModelConfig(rnn_size=512, num_layers=3, dropout=0.25),
        TrainConfig(seq_length=100, batch_size=64, learning_rate=2e-3, warmup_iters=500,
                    max_iters=50000),
    ),
}
DEFAULT_PRESET = "small"
