"""The char-level network: embedding -> LSTM | GRU | RNN x num_layers -> linear head.

The recurrent core is PyTorch's fused `nn.LSTM`/`nn.GRU`/`nn.RNN` (cuDNN on GPU, oneDNN on CPU);
dropout sits between layers as char-rnn has it. `forward` takes and returns the hidden state so
training can carry it across windows (truncated BPTT) and sampling can advance one step at a time.
"""

from __future__ import annotations

import torch
from torch import nn

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
