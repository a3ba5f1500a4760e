"""The character vocabulary: Unicode code points, rare ones folded into one unknown symbol.

Index 0 is always the unknown symbol, so text with characters the model never saw still encodes.
A vocabulary is a plain list of strings in a checkpoint: it needs no pickle to load.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np

UNK = "\ufffd"
MAX_CODEPOINT = 0x10FFFF


def codepoints(text: str) -> np.ndarray:
    """The code points of `text` as uint32, at C speed (lone surrogates pass through)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


class Vocab:
    def __init__(self, chars: Iterable[str]) -> None:
        chars = list(chars)
        if not chars or chars[0] != UNK:
            chars = [UNK] + [c for c in chars if c != UNK]
        if any(len(c) != 1 for c in chars):
            raise ValueError("a vocabulary holds single characters (code points)")
        if len(set(chars)) != len(chars):
            raise ValueError("a vocabulary holds each character once")
        self.chars: tuple[str, ...] = tuple(chars)
        self.index: dict[str, int] = {c: i for i, c in enumerate(self.chars)}
        self._table: np.ndarray | None = None

    @classmethod
    def from_counts(
        cls, counts: Mapping[str, int], *, min_count: int = 1, max_size: int | None = None
    ) -> Vocab:
        """Characters seen at least `min_count` times, most frequent first up to `max_size`."""
        kept = [c for c, n in Counter(counts).most_common(max_size) if n >= min_count and c != UNK]
        return cls([UNK, *sorted(kept)])

    @classmethod
    def from_text(cls, text: str, **kwargs: int | None) -> Vocab:
        return cls.from_counts(Counter(text), **kwargs)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.chars == other.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned integer type that holds every index."""
        if len(self) <= 1 << 8:
            return np.dtype(np.uint8)
        if len(self) <= 1 << 16:
            return np.dtype(np.uint16)
        return np.dtype(np.uint32)

    def encode(self, text: str) -> np.ndarray:
        """Indices of `text`'s characters; characters outside the vocabulary -> 0 (unknown)."""
        return self.encode_codepoints(codepoints(text))

    def encode_codepoints(self, cps: np.ndarray) -> np.ndarray:
        # One table lookup per character instead of a dict lookup: corpora are gigabytes.
        if self._table is None:
            table = np.zeros(MAX_CODEPOINT + 1, dtype=self.dtype)
            table[[ord(c) for c in self.chars]] = np.arange(len(self), dtype=self.dtype)
            self._table = table
        return self._table[cps]

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        return "".join(chars[int(i)] for i in ids)

    def missing(self, text: str) -> list[str]:
        """Characters of `text` the vocabulary does not hold, in order of first appearance."""
        return list(dict.fromkeys(c for c in text if c not in self.index))

    def to_list(self) -> list[str]:
        return list(self.chars)

    @classmethod
    def from_list(cls, chars: list[str]) -> Vocab:
        return cls(chars)
