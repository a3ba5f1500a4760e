"""The network: shapes for every cell type, state carrying, precision choices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from schemas.errors import TrainingError
from schemas.training import ModelConfig
from workers.model import (
    CharRNN,
    autocast,
    count_parameters,
    cpu_autocast_runs,
    cpu_has_native_bf16,
    detach_state,
    resolve_device,
    resolve_precision,
    select_state,
)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_forward_shapes(cell: str) -> None:
    config = ModelConfig(model=cell, rnn_size=24, num_layers=3, dropout=0.1, embedding_size=8)
    model = CharRNN(11, config)
    logits, state = model(torch.randint(0, 11, (4, 7)))
    assert logits.shape == (4, 7, 11)
    parts = state if isinstance(state, tuple) else (state,)
    assert len(parts) == (2 if cell == "lstm" else 1)
    assert all(p.shape == (3, 4, 24) for p in parts)
    init = model.init_state(4)
    assert [p.shape for p in (init if isinstance(init, tuple) else (init,))] == [p.shape for p in parts]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_carried_state_continues_the_sequence(cell: str) -> None:
    """Two windows with the state carried give what one long window gives (truncated BPTT)."""
    torch.manual_seed(0)
    model = CharRNN(9, ModelConfig(model=cell, rnn_size=16, num_layers=2)).eval()
    x = torch.randint(0, 9, (3, 20))
    whole, _ = model(x)
    first, state = model(x[:, :12])
    second, _ = model(x[:, 12:], detach_state(state))
    assert torch.allclose(torch.cat([first, second], dim=1), whole, atol=1e-6)


def test_select_state_picks_rows() -> None:
    model = CharRNN(5, ModelConfig(rnn_size=8, num_layers=2))
    _, state = model(torch.randint(0, 5, (4, 3)))
    picked = select_state(state, slice(2, 3))
    assert all(p.shape == (2, 1, 8) for p in picked)
    assert torch.equal(picked[0][:, 0], state[0][:, 2])


def test_embedding_size_defaults_to_rnn_size() -> None:
    model = CharRNN(10, ModelConfig(rnn_size=12, num_layers=1))
    assert model.embed.embedding_dim == 12
    # embedding 10x12, LSTM 4*12*(12+12) + 2*4*12 biases, head 12*10 + 10
    assert count_parameters(model) == 120 + 4 * 12 * 24 + 96 + 130


def test_precision_choices() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    # auto: bf16 exactly where this CPU runs it natively (AMX or AVX512-BF16), fp32 elsewhere
    assert resolve_precision("auto", cpu) is (torch.bfloat16 if cpu_has_native_bf16() else None)
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if cpu_autocast_runs("lstm", dtype):
            assert resolve_precision(name, cpu) is dtype
        else:  # a CPU without AVX-512: a clear refusal, not oneDNN's "primitive descriptor" error
            with pytest.raises(TrainingError, match=f"precision={name} cannot run a LSTM on this CPU"):
                resolve_precision(name, cpu)
        assert resolve_precision(name, cpu, "gru") is dtype  # oneDNN's GRU runs either way
    assert resolve_device("cpu") == cpu


def test_native_bf16_is_read_from_the_cpu_flags() -> None:
    flags = Path("/proc/cpuinfo").read_text().split()
    native = "amx_bf16" in flags or "avx512_bf16" in flags
    assert cpu_has_native_bf16() is (native and torch.backends.mkldnn.is_available())


def test_bf16_autocast_runs_every_cell() -> None:
    for cell in ("lstm", "gru", "rnn"):
        if not cpu_autocast_runs(cell, torch.bfloat16):  # refused up front: test_precision_choices
            assert cell == "lstm" and not cpu_has_native_bf16()
            continue
        model = CharRNN(7, ModelConfig(model=cell, rnn_size=16, num_layers=2))
        with autocast(torch.device("cpu"), torch.bfloat16):
            logits, _ = model(torch.randint(0, 7, (2, 5)))
        logits.float().sum().backward()
        assert model.embed.weight.grad is not None and model.embed.weight.dtype == torch.float32
