"""Reading and judging file contents: the part of the build that runs on every core.
(How a kept file is laid out in the text, its header, is `layout`'s.)

`examine_batch` is a top-level function over picklable arguments so a process pool can run it.
It opens each file beneath the tree's root one directory at a time with O_NOFOLLOW (a link
anywhere on the path is refused by the kernel, not by a check that could race), opens with
O_NONBLOCK and checks `fstat` is a regular file (a FIFO or device swapped in cannot block or
feed forever), and never reads more than `max_file_bytes + 1` bytes of anything.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from workers.corpus import paths as P
from workers.corpus.layout import header_line
from workers.corpus.manifest import kept_line, skipped_line

if TYPE_CHECKING:
    from schemas.corpus import CorpusConfig

PROBE_BYTES = 8192  # the first read; git also looks for NUL in the first 8000 bytes
SMALL_COUNT = 1 << 16
COUNT_SLICE = 1 << 17  # bincount widens its input to intp (8x): 256 KiB of pairs at a time
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

@dataclass(frozen=True, slots=True)
class Rules:
    """The corpus config as workers need it: a plain dataclass, so workers never import pydantic."""

    include: tuple[str, ...]
    exclude: tuple[str, ...]
    langs: frozenset[str]  # empty: any language
    skip_vendored: bool
    max_file_bytes: int
    max_line_length: int
    invalid_utf8: str  # "skip" | "replace"
    normalize_newlines: bool
    file_header: bool

    @classmethod
    def of(cls, config: CorpusConfig) -> Rules:
        values = {f.name: getattr(config, f.name) for f in fields(cls)}
        return cls(**{**values, "langs": frozenset(config.langs)})


@lru_cache(maxsize=8)
def _path_rules(rules: Rules) -> P.PathRules:
    """Each worker compiles a config's globs once, not once per batch."""
    return P.PathRules(rules)


class Item(NamedTuple):
    """A regular file the walk found, with what git said about its path."""

    rel: str  # path under the tree root
    size: int  # as lstat saw it
    attrs: P.Attributes | None = None
    ignored: bool = False
    skip: str | None = None  # already decided by the walk (a link, a special file, a directory)
    detail: str | None = None
    vendored_dir: bool = False  # below vendor/, node_modules/, ... (see PathRules.classify)


@dataclass(frozen=True, slots=True)
class Task:
    """What a worker needs besides the files: where they are, how to label them, the rules."""

    root: str
    label: str  # prefix of header paths when several repos are combined
    repo: int  # the repo's index in the manifest
    rules: Rules


class Outcome(NamedTuple):
    """One file's verdict (a tuple: cheap to pickle back from a worker)."""

    rel: str
    size: int  # the file's size
    reason: str | None = None  # None: kept
    detail: str | None = None
    sha256: bytes | None = None  # of the file's bytes: duplicate detection and the manifest
    language: str | None = None
    length: int = 0  # bytes of its payload (header + text + final newline) in the batch's payload


@dataclass(slots=True)
class BatchResult:
    """A batch as if every file it kept were new: the builder only re-checks duplicates."""

    outcomes: list[Outcome]
    payload: bytes  # the kept files' payloads, concatenated in order
    kept_lines: str  # their manifest records
    skipped_lines: str  # the manifest records of the rest
    ascii_counts: np.ndarray  # counts of code points 0..127 over `payload`
    other_counts: dict[str, int]  # counts of the rest
    by_reason: Counter[str]
    skipped_dirs: int  # skipped entries that are whole directories
    files_by_language: Counter[str]
    bytes_by_language: Counter[str]  # of the kept files' own bytes
    source_bytes: int


class _Opener:
    """Opens paths beneath one root, keeping the last directory's descriptor for the next file."""

    def __init__(self, root: str) -> None:
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dir_rel, self._dir_fd = "", self.root_fd

    def open(self, rel: str) -> int:
        parent, _, name = rel.rpartition("/")
        if parent != self._dir_rel:
            self._set_dir(parent)
        return os.open(name, _FILE_FLAGS, dir_fd=self._dir_fd)

    def _set_dir(self, parent: str) -> None:
        self._close_dir()
        fd = self.root_fd
        try:
            for part in parent.split("/") if parent else ():
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                if fd != self.root_fd:
                    os.close(fd)
                fd = nxt
        except OSError:
            if fd != self.root_fd:
                os.close(fd)
            raise
        self._dir_rel, self._dir_fd = parent, fd

    def _close_dir(self) -> None:
        if self._dir_fd != self.root_fd:
            os.close(self._dir_fd)
        self._dir_rel, self._dir_fd = "", self.root_fd

    def close(self) -> None:
        self._close_dir()
        os.close(self.root_fd)


def _read_limited(fd: int, size_hint: int, limit: int) -> bytes:
    """At most `limit` bytes: a file that grows while we read (or never ends) stops there.

    The first read is a probe: a NUL byte in it marks the file binary (as git decides), and the
    rest of it is never read.
    """
    first = os.read(fd, min(limit, size_hint + 1, PROBE_BYTES))
    if len(first) < PROBE_BYTES or b"\0" in first:  # all of it (a short read is EOF), or binary
        return first
    chunks, got = [first], len(first)
    while got < limit:
        chunk = os.read(fd, min(limit - got, max(size_hint + 1 - got, 65536)))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def longest_line_exceeds(data: bytes, limit: int) -> bool:
    """True if some line is longer than `limit` bytes: jumps a window at a time, not a line."""
    pos, end = 0, len(data)
    while end - pos > limit:
        newline = data.rfind(b"\n", pos, pos + limit + 1)
        if newline < 0:
            return True
        pos = newline + 1
    return False


def byte_counts(data: bytes | memoryview) -> np.ndarray:
    """A histogram of byte values. Counting 16-bit pairs halves the elements numpy must widen."""
    arr = np.frombuffer(data, dtype=np.uint8)
    if len(arr) < SMALL_COUNT:  # a 64K-bin histogram costs more than it saves on little data
        return np.bincount(arr, minlength=256)
    pairs = arr[: len(arr) & ~1].view(np.uint16)
    counts = np.zeros(1 << 16, dtype=np.int64)
    for start in range(0, len(pairs), COUNT_SLICE):
        counts += np.bincount(pairs[start:start + COUNT_SLICE], minlength=1 << 16)
    square = counts.reshape(256, 256)
    result = square.sum(axis=0) + square.sum(axis=1)
    if len(arr) & 1:
        result[arr[-1]] += 1
    return result


def non_ascii_counts(text: bytes | memoryview) -> Counter[str]:
    return Counter(_NON_ASCII.findall(bytes(text).decode("utf-8")))


def count_chars(text: bytes | memoryview) -> tuple[np.ndarray, Counter[str]]:
    """Character counts of UTF-8 `text`: code points 0..127 as an array, the rest in a Counter."""
    counts = byte_counts(text)
    return counts[:128], (non_ascii_counts(text) if counts[128:].any() else Counter())


def _decode(data: bytes, rules: Rules) -> tuple[bytes | None, str | None]:
    """(UTF-8 text, None) or (None, skip reason) under the encoding policy of docs/corpus.md."""
    if b"\0" in data:
        return None, P.BINARY
    if data.isascii():
        return data, None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        if rules.invalid_utf8 == "skip":
            return None, P.INVALID_UTF8
        data = data.decode("utf-8", "replace").encode("utf-8")
    if data.startswith(b"\xef\xbb\xbf"):  # a byte-order mark is noise in the middle of a corpus
        data = data[3:]
    return data, None


def _examine(opener: _Opener, item: Item, task: Task, path_rules: P.PathRules) -> tuple[Outcome, bytes, bytes]:
    """(verdict, header, text): header and text are empty unless the file is kept."""
    rules = task.rules
    reason, detail = path_rules.classify(item.rel, item.size, item.attrs, item.ignored, item.vendored_dir)
    if reason:
        return Outcome(item.rel, item.size, reason, detail), b"", b""
    try:
        fd = opener.open(item.rel)
    except OSError as exc:
        # ELOOP: the path became a link since the walk saw it.
        reason = P.SYMLINK if exc.errno == errno.ELOOP else P.UNREADABLE
        return Outcome(item.rel, 0, reason, exc.strerror), b"", b""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Outcome(item.rel, 0, P.SPECIAL), b"", b""
        if st.st_size > rules.max_file_bytes:
            return Outcome(item.rel, st.st_size, P.TOO_LARGE), b"", b""
        data = _read_limited(fd, st.st_size, rules.max_file_bytes + 1)
    except OSError as exc:
        return Outcome(item.rel, 0, P.UNREADABLE, exc.strerror), b"", b""
    finally:
        os.close(fd)
    display = f"{task.label}/{item.rel}" if task.label else item.rel
    return judge(item.rel, display, data, rules, st.st_size)


def judge(rel: str, display: str, data: bytes, rules: Rules, size: int) -> tuple[Outcome, bytes, bytes]:
    """Decide on one file's bytes (`size` as stat saw it): skip, or its header and text."""
    skip = b"", b""
    if len(data) > rules.max_file_bytes:
        return Outcome(rel, len(data), P.TOO_LARGE, "grew while being read"), *skip
    if not data:
        return Outcome(rel, size, P.EMPTY), *skip
    language = P.language_of_name(rel.rsplit("/", 1)[-1])
    if language is None:  # no language from the name: a `#!` line may tell
        tags = P.interpreter_tags(data[:256].split(b"\n", 1)[0])
        language = P.language_of(tags)
        if rules.langs and not tags & rules.langs:
            return Outcome(rel, size, P.LANGUAGE), *skip
    text, reason = _decode(data, rules)
    if text is None:
        return Outcome(rel, size, reason), *skip
    if rules.normalize_newlines and b"\r" in text:
        text = text.replace(b"\r\n", b"\n")
    if longest_line_exceeds(text, rules.max_line_length):
        return Outcome(rel, size, P.MINIFIED, f"a line longer than {rules.max_line_length} bytes"), *skip
    if text.isspace():
        return Outcome(rel, size, P.EMPTY, "whitespace only"), *skip
    head = header_line(display, language) if rules.file_header else b""
    length = len(head) + len(text) + (0 if text.endswith(b"\n") else 1)
    outcome = Outcome(rel, len(data), None, None, hashlib.sha256(data).digest(), language, length)
    return outcome, head, text


def examine_batch(task: Task, items: list[Item]) -> BatchResult:
    """Judge `items` (files under `task.root`) in order. Runs in a worker process."""
    opener = _Opener(task.root)
    path_rules = _path_rules(task.rules)
    outcomes: list[Outcome] = []
    parts: list[bytes] = []
    kept: list[str] = []
    skipped: list[str] = []
    other: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    skipped_dirs = 0
    files_by_language: Counter[str] = Counter()
    bytes_by_language: Counter[str] = Counter()
    try:
        for item in items:
            if item.skip:
                outcome, head, text = Outcome(item.rel, item.size, item.skip, item.detail), b"", b""
            else:
                outcome, head, text = _examine(opener, item, task, path_rules)
            outcomes.append(outcome)
            if outcome.reason is not None:
                by_reason[outcome.reason] += 1
                skipped_dirs += outcome.rel.endswith("/")
                skipped.append(skipped_line(task.repo, outcome))
                continue
            parts += (head, text) if text.endswith(b"\n") else (head, text, b"\n")
            kept.append(kept_line(task.repo, outcome))
            files_by_language[outcome.language or "other"] += 1
            bytes_by_language[outcome.language or "other"] += outcome.size
            for piece in (head, text):
                if not piece.isascii():
                    other.update(non_ascii_counts(piece))
    finally:
        opener.close()
    payload = b"".join(parts)
    return BatchResult(
        outcomes, payload, "".join(kept), "".join(skipped), byte_counts(payload)[:128], dict(other),
        by_reason, skipped_dirs, files_by_language, bytes_by_language, sum(bytes_by_language.values()),
    )
