"""Evaluation: every character after the first predicted once, state carried, bounded memory."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from schemas.errors import InvalidSpec, NotFound
from schemas.training import PRESETS, ModelConfig
from workers import evaluate, keys
from workers.checkpoint import Checkpoint, save_checkpoint
from workers.data import read_text_chunks
from workers.evaluate import evaluate_file, evaluate_ids, evaluate_text
from workers.model import CharRNN
from workers.storage import LocalStorage
from workers.vocab import Vocab

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + 'ü'\n" for i in range(60))


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[LocalStorage, str, CharRNN, Vocab]:
    storage = LocalStorage(tmp_path)
    vocab = Vocab.from_text(TEXT)
    torch.manual_seed(1)
    config = ModelConfig(rnn_size=16, num_layers=2)
    model = CharRNN(len(vocab), config).eval()
    key = keys.checkpoint("feed01", 1)
    save_checkpoint(storage, key, Checkpoint(config, PRESETS["tiny"][1], vocab, model.state_dict()))
    return storage, key, model, vocab


def _nats(model: CharRNN, ids: torch.Tensor) -> float:
    """Plain reference: the whole sequence in one forward pass."""
    with torch.no_grad():
        logits, _ = model(ids[None, :-1])
        return F.cross_entropy(logits[0], ids[1:], reduction="sum").item()


def test_matches_one_pass_over_the_whole_text(setup) -> None:  # type: ignore[no-untyped-def]
    storage, key, model, vocab = setup
    assert len(TEXT) > evaluate.WINDOW * 4  # several windows, state carried between them
    result = evaluate_text(storage, key, [TEXT])
    ids = torch.from_numpy(vocab.encode(TEXT).astype("int64"))
    assert result.chars == len(TEXT) - 1
    assert result.nats_per_char == pytest.approx(_nats(model, ids) / (len(TEXT) - 1), rel=1e-5)
    assert result.bits_per_char == pytest.approx(result.nats_per_char / math.log(2))


def test_eval_reads_a_long_text_as_one_stream_with_the_state_carried(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`jobs eval`'s reading: one pass in order, even where side-by-side streams would be cut."""
    storage, key, model, vocab = setup
    calls: list[tuple[int, bool]] = []  # (streams in the window, started from a zero state)
    window = evaluate._window

    def recorded(model, ids, starts, n, state, device, dtype):  # type: ignore[no-untyped-def]
        calls.append((len(starts), state is None))
        return window(model, ids, starts, n, state, device, dtype)

    monkeypatch.setattr(evaluate, "_window", recorded)
    text = TEXT * 5
    assert len(text) > 2 * evaluate.MIN_STREAM  # long enough for two streams side by side
    ids = torch.from_numpy(vocab.encode(text).astype("int64"))
    result = evaluate_text(storage, key, [text])
    assert result.nats_per_char == pytest.approx(_nats(model, ids) / (len(text) - 1), rel=1e-5)
    windows = -(-(len(text) - 1) // evaluate.WINDOW)
    assert calls == [(1, True)] + [(1, False)] * (windows - 1)  # zero state once, then carried
    calls.clear()
    # Training's validation reading: two streams side by side, each from a zero state.
    side_by_side = evaluate_ids(model, vocab.encode(text), device=torch.device("cpu"))
    assert side_by_side.chars == len(text) - 1 and calls[0] == (2, True)
    assert evaluate_text(storage, key, [text], streams=evaluate.MAX_STREAMS) == side_by_side


def test_streams_cover_every_character_once(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _storage, _key, model, vocab = setup
    monkeypatch.setattr(evaluate, "MIN_STREAM", 50)
    ids = vocab.encode(TEXT[:200])
    result = evaluate_ids(model, ids, device=torch.device("cpu"), max_streams=3)
    t = torch.from_numpy(ids.astype("int64"))
    # 199 predictions: streams of 66 from 0, 66 and 132; the last one continues to the end.
    expected = _nats(model, t[0:67]) + _nats(model, t[66:133]) + _nats(model, t[132:200])
    assert result.chars == 199
    assert result.nats_per_char == pytest.approx(expected / 199, rel=1e-5)


def test_chunking_does_not_change_the_result(setup) -> None:  # type: ignore[no-untyped-def]
    storage, key, _model, _vocab = setup
    whole = evaluate_text(storage, key, [TEXT])
    pieces = evaluate_text(storage, key, [TEXT[:7], TEXT[7:500], "", TEXT[500:]])
    assert pieces == whole


def test_unknown_characters_count_as_the_unknown_symbol(setup) -> None:  # type: ignore[no-untyped-def]
    storage, key, model, vocab = setup
    text = "return Ω ∑ 🎉 x"
    result = evaluate_text(storage, key, [text])
    ids = torch.from_numpy(vocab.encode(text).astype("int64"))
    assert result.chars == len(text) - 1
    assert result.nats_per_char == pytest.approx(_nats(model, ids) / (len(text) - 1), rel=1e-5)


def test_evaluate_file_reads_utf8_in_chunks(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    storage, key, _model, _vocab = setup
    path = tmp_path / "code.py"
    path.write_text(TEXT, encoding="utf-8")
    assert evaluate_file(storage, key, path) == evaluate_text(storage, key, [TEXT])
    with pytest.raises(NotFound, match="cannot read"):
        evaluate_file(storage, key, tmp_path / "missing.py")


def test_multibyte_characters_split_across_reads() -> None:
    data = "aü🎉b".encode()
    parts = [data[i:i + 1] for i in range(len(data))]  # every byte alone
    assert "".join(read_text_chunks(parts)) == "aü🎉b"


def test_too_little_text_is_refused(setup) -> None:  # type: ignore[no-untyped-def]
    storage, key, _model, _vocab = setup
    with pytest.raises(InvalidSpec, match="nothing to evaluate"):
        evaluate_text(storage, key, [""])
    with pytest.raises(InvalidSpec, match="nothing to evaluate"):
        evaluate_text(storage, key, ["x"])
