"""The char-level network: embedding -> LSTM | GRU | RNN x num_layers -> linear head.

The recurrent core is PyTorch's fused `nn.LSTM`/`nn.GRU`/`nn.RNN` (cuDNN on GPU, oneDNN on CPU);
dropout sits between layers as char-rnn has it. `forward` takes and returns the hidden state so
training can carry it across windows (truncated BPTT) and sampling can advance one step at a time.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from schemas.errors import TrainingError
from schemas.training import ModelConfig

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

_CORES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class CharRNN(nn.Module):
    def __init__(self, vocab_size: int, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        emb = config.embedding_size or config.rnn_size
        self.embed = nn.Embedding(vocab_size, emb)
        self.core = _CORES[config.model](
            emb,
            config.rnn_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.rnn_size, vocab_size)

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        shape = (self.config.num_layers, batch_size, self.config.rnn_size)
        h = torch.zeros(shape, device=device)
        if self.config.model == "lstm":
            return (h, torch.zeros(shape, device=device))
        return h

    def forward(self, idx: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """idx: (batch, time) int64 -> logits (batch, time, vocab), new state."""
        out, state = self.core(self.embed(idx), state)
        return self.head(self.drop(out)), state


def detach_state(state: State) -> State:
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)  # type: ignore[return-value]
    return state.detach()


def select_state(state: State, rows: slice) -> State:
    """The hidden state of some batch rows (streams) only."""
    if isinstance(state, tuple):
        return tuple(s[:, rows] for s in state)  # type: ignore[return-value]
    return state[:, rows]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: where oneDNN runs bf16 RNNs at native speed (emulated elsewhere)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and torch.backends.mkldnn.is_available()


@functools.cache
def cpu_autocast_runs(cell: str, dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN runs `cell` under autocast to `dtype` at all: on a CPU without
    AVX-512 it has no bf16 or fp16 LSTM ("could not create a primitive descriptor")."""
    rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell](4, 4, batch_first=True)
    try:
        with torch.autocast(device_type="cpu", dtype=dtype):
            rnn(torch.zeros(1, 1, 4))
    except RuntimeError:
        return False
    return True


def resolve_precision(precision: str, device: torch.device, cell: str = "lstm") -> torch.dtype | None:
    """The autocast dtype for a `precision` option, or None for plain fp32.

    "auto": bf16 on CPUs with native bf16 (measured ~1.5-2x faster for the LSTM step, see
    docs/training.md), bf16 on GPUs that have it, fp16 AMP on older GPUs, fp32 otherwise.
    An explicit bf16 or fp16 that this CPU cannot run for `cell` is refused with a reason.
    """
    if precision == "fp32":
        return None
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        if device.type == "cpu" and not cpu_autocast_runs(cell, dtype):
            raise TrainingError(
                f"precision={precision} cannot run a {cell.upper()} on this CPU (its oneDNN has no "
                f"{precision} {cell.upper()} without AVX-512); use precision=auto (fp32 here) or fp32"
            )
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Mixed precision for the forward pass; weights and optimizer state stay fp32."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def state_tensors(state: State | None) -> list[torch.Tensor]:
    """A hidden state as a plain list of tensors (for a checkpoint)."""
    if state is None:
        return []
    return [s.detach() for s in state] if isinstance(state, tuple) else [state.detach()]


def state_from_tensors(tensors: list[torch.Tensor], device: torch.device) -> State | None:
    """`state_tensors` undone, on `device`: (h, c) for an LSTM, h otherwise, None for none."""
    if not tensors:
        return None
    moved = [t.to(device) for t in tensors]
    return tuple(moved) if len(moved) == 2 else moved[0]  # type: ignore[return-value]
