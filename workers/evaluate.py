"""How well a model predicts a text: mean cross-entropy per character, in nats and bits.

Two ways to read the text, both predicting every character after the first exactly once, with
the hidden state carried from window to window:

* **one stream** (`streams=1`, what `charforge jobs eval` uses through `evaluate_text` and
  `evaluate_file`): the text is read once, in order, from a zero state at its first character,
  with the state carried through all of it. Every character is predicted from everything
  before it. It runs one character at a time through the network (batch 1): ~85k chars/s for
  the default 2x128 LSTM on a 2-core CPU (~12 s per MB), 6.7k for 2x512 (docs/training.md).
* **side by side** (`streams` > 1, training's validation with `MAX_STREAMS`): the text is cut
  into up to that many contiguous streams of at least `MIN_STREAM` characters that run as one
  batch; each starts from a zero state (a few dozen characters of warm-up out of thousands),
  and the leftover characters continue the last stream. 3-4x faster; the figure is a little
  higher (by 0.0015 nats/char in bench/train.py (c)) than one stream's.

Memory stays bounded: text is encoded chunk by chunk to a temporary integer file that is
memory-mapped, and windows are read from it one at a time.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from schemas.base import Frozen
from schemas.errors import InvalidSpec, NotFound
from workers.checkpoint import load_checkpoint
from workers.data import read_text_chunks
from workers.model import (
    CharRNN,
    autocast,
    resolve_device,
    resolve_precision,
    select_state,
)
from workers.storage import CHUNK, Storage

MIN_STREAM = 4096
MAX_STREAMS = 64  # training's validation: fast, each stream from a zero state
EVAL_STREAMS = 1  # evaluate_text / evaluate_file (`charforge jobs eval`): read once, state carried
WINDOW = 256


class EvalResult(Frozen):
    chars: int  # characters predicted (all but the first)
    nats_per_char: float
    bits_per_char: float


@torch.no_grad()
def evaluate_ids(
    model: CharRNN,
    ids: np.ndarray,
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    max_streams: int = MAX_STREAMS,
) -> EvalResult:
    """Cross-entropy of `model` on the index sequence `ids` (e.g. a memory map), read as up to
    `max_streams` streams side by side (1: once, in order, state carried throughout)."""
    pairs = len(ids) - 1
    if pairs < 1:
        raise InvalidSpec("nothing to evaluate: the text has fewer than 2 characters")
    was_training = model.training
    model.eval()
    streams = max(1, min(max_streams, pairs // MIN_STREAM))
    length = pairs // streams
    starts = np.arange(streams) * length
    total = torch.zeros((), dtype=torch.float64, device=device)
    state = None
    for t0 in range(0, length, WINDOW):
        t1 = min(t0 + WINDOW, length)
        nats, state = _window(model, ids, starts + t0, t1 - t0, state, device, dtype)
        total += nats
    if pairs > streams * length:  # the leftover continues the last stream
        last = None if state is None else select_state(state, slice(streams - 1, streams))
        rest = pairs - streams * length
        for t0 in range(0, rest, WINDOW):
            n = min(WINDOW, rest - t0)
            nats, last = _window(model, ids, np.array([streams * length + t0]), n, last, device, dtype)
            total += nats
    model.train(was_training)
    nats_per_char = float(total) / pairs
    return EvalResult(chars=pairs, nats_per_char=nats_per_char,
                      bits_per_char=nats_per_char / math.log(2))


def _window(model, ids, starts, n, state, device, dtype):  # type: ignore[no-untyped-def]
    idx = starts[:, None] + np.arange(n + 1)[None, :]
    window = torch.from_numpy(np.asarray(ids[idx], dtype=np.int64)).to(device)
    with autocast(device, dtype):
        logits, state = model(window[:, :-1], state)
    nats = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1), reduction="sum"
    )
    return nats.double(), state


def evaluate_text(
    storage: Storage,
    checkpoint_key: str,
    chunks: Iterable[str],
    *,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    streams: int = EVAL_STREAMS,
) -> EvalResult:
    """Evaluate a checkpoint on text given as chunks (of any size); unknown characters count as
    the unknown symbol, as they would in training. `streams=1` reads the text once with the
    state carried through all of it; more trades that for speed (see the module's doc)."""
    dev = resolve_device(device)
    ckpt = load_checkpoint(storage, checkpoint_key, map_location=dev)
    model = ckpt.build_model(dev)
    with tempfile.NamedTemporaryFile(prefix="charforge-eval-") as spool:
        for chunk in chunks:
            spool.write(ckpt.vocab.encode(chunk).tobytes())
        spool.flush()
        size = Path(spool.name).stat().st_size
        if size == 0:
            raise InvalidSpec("nothing to evaluate: the text is empty")
        ids = np.memmap(spool.name, dtype=ckpt.vocab.dtype, mode="r")
        return evaluate_ids(model, ids, device=dev, dtype=resolve_precision(precision, dev, ckpt.model_config.model),
                            max_streams=streams)


def evaluate_file(
    storage: Storage,
    checkpoint_key: str,
    path: Path,
    *,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    streams: int = EVAL_STREAMS,
) -> EvalResult:
    """`evaluate_text` on a local UTF-8 file (bad bytes read as U+FFFD, i.e. unknown)."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below; only opening errors are the user's
    except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
        raise NotFound(f"cannot read {path}: {err.strerror}") from None
    with fh:
        chunks = read_text_chunks(iter(lambda: fh.read(4 * CHUNK), b""))
        return evaluate_text(storage, checkpoint_key, chunks, device=device, precision=precision,
                             streams=streams)
