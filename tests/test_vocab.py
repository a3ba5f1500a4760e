"""The character vocabulary: Unicode-safe, unknown symbol at 0, compact index types."""

from __future__ import annotations

import numpy as np
import pytest

from workers.vocab import UNK, Vocab

UNICODE = "def naïve(ß): return '日本語 ✓ 🎉 e\u0301'  # Ωμέγα\n\t\r\x00"


def test_encode_decode_round_trip_with_unicode() -> None:
    vocab = Vocab.from_text(UNICODE)
    ids = vocab.encode(UNICODE)
    assert len(ids) == len(UNICODE)  # one index per code point, astral ones included
    assert vocab.decode(ids) == UNICODE
    assert 0 not in ids  # every character is known


def test_unknown_characters_map_to_index_zero() -> None:
    vocab = Vocab.from_text("abc")
    assert vocab.chars[0] == UNK
    assert vocab.encode("aξc🎉").tolist() == [vocab.index["a"], 0, vocab.index["c"], 0]
    assert vocab.decode(vocab.encode("aξ")) == "a" + UNK
    assert vocab.missing("abξcξ🎉") == ["ξ", "🎉"]


def test_lone_surrogates_encode_as_unknown() -> None:
    vocab = Vocab.from_text("ab")
    assert vocab.encode("a\ud800b").tolist() == [vocab.index["a"], 0, vocab.index["b"]]


def test_rare_characters_fold_into_unknown() -> None:
    counts = {"a": 10, "b": 5, "c": 1, "Ж": 1}
    vocab = Vocab.from_counts(counts, min_count=2)
    assert vocab.to_list() == [UNK, "a", "b"]
    capped = Vocab.from_counts({"a": 10, "b": 5, "c": 3}, max_size=2)
    assert capped.to_list() == [UNK, "a", "b"]


def test_index_type_fits_vocabulary_size() -> None:
    assert Vocab([chr(i) for i in range(32, 32 + 200)]).dtype == np.uint8
    big = Vocab([chr(i) for i in range(0x4E00, 0x4E00 + 1000)])
    assert big.dtype == np.uint16
    assert big.encode("\u4e00\u4e01").dtype == np.uint16


def test_list_round_trip_and_equality() -> None:
    vocab = Vocab.from_text(UNICODE)
    again = Vocab.from_list(vocab.to_list())
    assert again == vocab and hash(again) == hash(vocab)
    assert again.encode(UNICODE).tolist() == vocab.encode(UNICODE).tolist()


def test_refuses_multi_character_or_repeated_entries() -> None:
    with pytest.raises(ValueError, match="single characters"):
        Vocab([UNK, "ab"])
    with pytest.raises(ValueError, match="once"):
        Vocab([UNK, "a", "a"])
