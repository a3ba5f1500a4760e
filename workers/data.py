"""Training data: the corpus encoded once to a compact integer file, memory-mapped for batches.

The vocabulary keeps the characters seen at least `vocab_min_count` times, at most
`vocab_max_size` of them; the rest map to the unknown symbol. Their counts come from the corpus
manifest (the builder counted them); a corpus without one is streamed once to count them. The
text is then streamed, in chunks, never held whole, to write one uint8/uint16 index per
character. The integer file and a small JSON describing it live next to the corpus in storage,
so every later run on the same corpus with the same vocabulary reuses them. Training memory-maps the file: a
multi-GB corpus trains in bounded memory.

Batches (see docs/training.md): "sequential" gives each batch row its own contiguous stretch of
the training part and walks all rows forward one window per step, so the hidden state can be
carried from window to window (truncated BPTT); "random" draws windows at random offsets.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from schemas.errors import CorpusError, TrainingError
from schemas.results import CorpusResult
from schemas.training import TrainConfig
from workers import keys
from workers.storage import CHUNK, Storage
from workers.vocab import MAX_CODEPOINT, Vocab, codepoints

TEXT_CHUNK = 4 * CHUNK


@dataclass(frozen=True)
class EncodedCorpus:
    key: str  # the integer file: one index per character, native byte order
    vocab: Vocab
    length: int  # characters

    @property
    def dtype(self) -> np.dtype:
        return self.vocab.dtype


def read_text_chunks(stream: Iterable[bytes]) -> Iterator[str]:
    """Decode a UTF-8 byte stream chunk by chunk (a character split across chunks is kept whole)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for raw in stream:
        if text := decoder.decode(raw):
            yield text
    if tail := decoder.decode(b"", final=True):
        yield tail


def _storage_chunks(storage: Storage, key: str, digest: Any = None) -> Iterator[str]:
    """The text of `key`, decoded a chunk at a time; its bytes also go through `digest` (a hashlib
    object) when one is given."""
    with storage.open(key) as fh:
        blocks = iter(lambda: fh.read(TEXT_CHUNK), b"")
        yield from read_text_chunks(blocks if digest is None else _hashed(blocks, digest))


def count_codepoints(chunks: Iterable[str]) -> dict[str, int]:
    """Character counts of decoded text, chunk by chunk (a numpy histogram over code points).

    Only for a corpus without a usable manifest: the corpus builder counts characters as it
    reads them (`workers.corpus.textscan.count_bytes` over UTF-8 bytes, plus the characters past
    U+007F) and records them there.
    """
    counts = np.zeros(MAX_CODEPOINT + 1, dtype=np.int64)
    for chunk in chunks:
        counts += np.bincount(codepoints(chunk), minlength=MAX_CODEPOINT + 1)
    return {chr(cp): int(counts[cp]) for cp in np.flatnonzero(counts)}


def corpus_char_counts(storage: Storage, corpus: CorpusResult) -> dict[str, int]:
    """Exact character counts of the corpus text: its manifest's `vocab`, written when the
    corpus was built (docs/corpus.md), else counted from the text (a pass over all of it)."""
    counts = _manifest_counts(storage, corpus)
    if counts is None:
        counts = count_codepoints(_storage_chunks(storage, corpus.text_key))
    return counts


def _hashed(blocks: Iterable[bytes], digest: Any) -> Iterator[bytes]:
    for block in blocks:
        digest.update(block)
        yield block


def _manifest_head(storage: Storage, corpus: CorpusResult) -> dict[str, Any]:
    """The corpus manifest's head ({} when there is none, or it is not JSON)."""
    if not storage.exists(corpus.manifest_key):
        return {}
    try:
        head = read_manifest_head(storage, corpus.manifest_key)
    except ValueError:
        return {}
    return head if isinstance(head, dict) else {}


def _manifest_text(storage: Storage, corpus: CorpusResult) -> str | None:
    """The sha256 the corpus's manifest records for its text (None: no manifest, or none there)."""
    text = _manifest_head(storage, corpus).get("text")
    sha256 = text.get("sha256") if isinstance(text, dict) else None
    return sha256 if isinstance(sha256, str) else None


def _manifest_counts(storage: Storage, corpus: CorpusResult) -> dict[str, int] | None:
    """The manifest's counts, if it has them and they add up to the stored text's size in UTF-8
    (a cheap check that they describe this very text); None otherwise."""
    try:
        counts = {str(c): int(n) for c, n in _manifest_head(storage, corpus)["vocab"]}
    except (KeyError, TypeError, ValueError):
        return None
    utf8 = sum(len(c.encode("utf-8", "surrogatepass")) * n for c, n in counts.items())
    return counts if utf8 == storage.size(corpus.text_key) else None


# The manifest's per-file lists come after everything else and can be tens of MB for a big
# repository (workers/corpus/manifest.py writes the head, then "files" and "skipped"). A JSON
# string holds no raw newline, so this marker can only be the start of those lists.
_MANIFEST_LISTS = b',\n "files": ['


def read_manifest_head(storage: Storage, key: str) -> dict[str, Any]:
    """A corpus manifest without its per-file lists, read only up to them (the whole file when
    its layout is another)."""
    head = bytearray()
    with storage.open(key) as fh:
        while chunk := fh.read(CHUNK):
            start = max(0, len(head) - len(_MANIFEST_LISTS))
            head += chunk
            cut = head.find(_MANIFEST_LISTS, start)
            if cut >= 0:
                with contextlib.suppress(ValueError):
                    return json.loads(bytes(head[:cut]) + b"\n}")
                return json.loads(storage.get_bytes(key))
    return json.loads(bytes(head))


def corpus_vocab(storage: Storage, corpus: CorpusResult, train: TrainConfig) -> Vocab:
    """The corpus's own vocabulary under `train`'s thresholds, counted once and then cached."""
    key = keys.corpus_vocab(corpus.hash, train.vocab_min_count, train.vocab_max_size)
    if storage.exists(key):
        return Vocab.from_list(json.loads(storage.get_bytes(key))["chars"])
    counts = corpus_char_counts(storage, corpus)
    if not counts:
        raise CorpusError(f"corpus {corpus.hash[:12]} is empty: nothing to train on")
    vocab = Vocab.from_counts(
        counts, min_count=train.vocab_min_count, max_size=train.vocab_max_size - 1
    )
    folded = sum(n for c, n in counts.items() if c not in vocab.index)
    storage.put_bytes(key, json.dumps(
        {"chars": vocab.to_list(), "distinct": len(counts), "folded_chars": folded},
        ensure_ascii=False,
    ).encode())
    return vocab


def vocab_tag(vocab: Vocab) -> str:
    return hashlib.sha256("".join(vocab.chars).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def prepare_corpus(
    storage: Storage, corpus: CorpusResult, train: TrainConfig, vocab: Vocab | None = None
) -> EncodedCorpus:
    """Encode the corpus with `vocab` (default: its own), or reuse the file an earlier run wrote.

    With a given vocabulary (fine-tuning), every character the corpus's own vocabulary keeps must
    be in it, or the model could never learn them: that is refused with the characters named.
    """
    own = corpus_vocab(storage, corpus, train)
    if vocab is None:
        vocab = own
    else:
        missing = [c for c in own.chars if c not in vocab.index]
        if missing:
            shown = "".join(missing[:20])
            raise TrainingError(
                f"vocabularies differ: the corpus uses {len(missing)} characters the initial "
                f"checkpoint does not know ({shown!r}); fine-tune on a corpus of the same alphabet"
            )
    bin_key, meta_key = keys.corpus_encoded(corpus.hash, vocab_tag(vocab))
    if storage.exists(meta_key) and storage.exists(bin_key):
        meta = json.loads(storage.get_bytes(meta_key))
        return EncodedCorpus(bin_key, Vocab.from_list(meta["chars"]), int(meta["length"]))
    length = 0
    expected = _manifest_text(storage, corpus)
    seen = hashlib.sha256()
    with storage.writer(bin_key) as out:
        for chunk in _storage_chunks(storage, corpus.text_key, seen):
            ids = vocab.encode(chunk)
            out.write(ids.tobytes())
            length += len(ids)
        if expected is not None and expected != seen.hexdigest():  # the encoding is not kept
            raise CorpusError(
                f"corpus {corpus.hash[:12]} is damaged in storage: {corpus.text_key} has sha256 "
                f"{seen.hexdigest()[:12]}, its manifest says {expected[:12]}; delete "
                f"{keys.corpus_prefix(corpus.hash)} to have it built again"
            )
    storage.put_bytes(meta_key, json.dumps({
        "chars": vocab.to_list(), "length": length, "dtype": vocab.dtype.name,
        "sha256": out.sha256, "corpus_hash": corpus.hash,
    }, ensure_ascii=False).encode())
    return EncodedCorpus(bin_key, vocab, length)


def split(ids: np.ndarray, val_frac: float) -> tuple[np.ndarray, np.ndarray]:
    """Training part and the contiguous held-out tail (views into the memory map)."""
    n_val = max(2, int(len(ids) * val_frac))
    return ids[: len(ids) - n_val], ids[len(ids) - n_val:]


class Batches:
    """Windows of `seq_length + 1` indices (inputs and shifted targets), `batch_size` at a time.

    Its whole position is `state()` (plain numbers) plus its torch.Generator's state, so a resumed
    run draws exactly the batches the uninterrupted run would have drawn.
    """

    def __init__(self, ids: np.ndarray, train: TrainConfig, generator: torch.Generator) -> None:
        self.ids, self.mode = ids, train.batching
        self.batch, self.seq = train.batch_size, train.seq_length
        self.gen = generator
        self.row_len = (len(ids) - 1) // self.batch
        if self.row_len < self.seq + 1:
            need = self.batch * (self.seq + 1) + 1
            raise TrainingError(
                f"the training text has {len(ids)} characters, fewer than batch_size x "
                f"(seq_length + 1) = {need}: lower batch_size or seq_length, or use a bigger corpus"
            )
        self.epoch, self.index, self.offset, self.windows = 0, 0, 0, 0
        self._new_epoch()

    def _new_epoch(self) -> None:
        # A random shift per epoch moves window boundaries, so epochs do not repeat exactly.
        slack = self.row_len - self.seq
        self.offset = int(torch.randint(0, min(self.seq, slack) + 1, (1,), generator=self.gen))
        self.windows = (self.row_len - self.offset) // self.seq
        self.index = 0

    @property
    def epochs_done(self) -> float:
        """Fraction of the training text seen, in epochs."""
        if self.mode == "random":
            return self.index * self.batch * self.seq / len(self.ids)
        return self.epoch + self.index / self.windows

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(inputs, targets, fresh): `fresh` = the hidden state must start from zeros."""
        if self.mode == "random":
            picks = torch.randint(0, len(self.ids) - self.seq, (self.batch,), generator=self.gen)
            self.index += 1
            window = self._gather(picks.numpy())
            return window[:, :-1], window[:, 1:], True
        if self.index >= self.windows:
            self.epoch += 1
            self._new_epoch()
        fresh = self.index == 0
        starts = np.arange(self.batch) * self.row_len + self.offset + self.index * self.seq
        self.index += 1
        window = self._gather(starts)
        return window[:, :-1], window[:, 1:], fresh

    def _gather(self, starts: np.ndarray) -> torch.Tensor:
        idx = starts[:, None] + np.arange(self.seq + 1)[None, :]
        return torch.from_numpy(np.asarray(self.ids[idx], dtype=np.int64))

    def state(self) -> dict[str, Any]:
        return {"mode": self.mode, "epoch": self.epoch, "index": self.index,
                "offset": self.offset, "windows": self.windows}

    def restore(self, state: dict[str, Any]) -> None:
        # A resume always uses the checkpoint's own TrainConfig, so the mode is the same one.
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.offset, self.windows = int(state["offset"]), int(state["windows"])
