"""Reading and judging file contents: the part of the build that runs on every core.
(How a kept file is laid out in the text, its header, is `layout`'s.)

`examine_batch` is a top-level function over picklable arguments so a process pool can run it.
It opens each file beneath the tree's root one directory at a time with O_NOFOLLOW (a link
anywhere on the path is refused by the kernel, not by a check that could race), opens with
O_NONBLOCK and checks `fstat` is a regular file (a FIFO or device swapped in cannot block or
feed forever), and never reads more than `max_file_bytes + 1` bytes of anything.

Everything here runs once per file, tens of thousands of times a build: the walk does not stat
files (the `fstat` of the open file gives their size), a file whose name says text is read with
one `read`, and identify is asked once per extension (docs/corpus.md, "Benchmark").
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from workers.corpus import paths as P
from workers.corpus.layout import header_line
from workers.corpus.manifest import kept_line, skipped_line

if TYPE_CHECKING:
    from schemas.corpus import CorpusConfig

HELD_DIRS = 32  # directory descriptors an _Opener keeps open down the current path
PROBE_BYTES = 8192  # the first read; git also looks for NUL in the first 8000 bytes
SMALL_COUNT = 1 << 16
COUNT_SLICE = 1 << 20  # pairs: bincount widens its input to intp (4x), 8 MiB at a time at most
_ASCII = bytes(range(128))  # deleted from UTF-8 text, they leave its other characters whole
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
    """An entry of the walk (a regular file, or one it skipped), with what git said about its path."""

    rel: str  # path under the tree root; directories end with "/"
    size: int | None  # as lstat saw it; None: not stat-ed by the walk (fstat tells, once open)
    attrs: P.Attributes | None = None
    ignored: bool = False
    skip: str | None = None  # already decided by the walk (a link, a special file, a directory)
    detail: str | None = None
    vendored_dir: bool = False  # below vendor/, node_modules/, ... (see PathRules.classify)
    attr_scope: bool = False  # a .gitattributes at or above it may say something (ask git)
    ignore_scope: bool = False  # a .gitignore at or above it may say something (plain folders)


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
    kept_lines: list[str]  # their manifest records, in order
    skipped_lines: list[str]  # the manifest records of the rest, in order
    other_counts: dict[str, int]  # counts of the characters past U+007F in `payload`
    by_reason: Counter[str]
    skipped_dirs: int  # skipped entries that are whole directories
    files_by_language: Counter[str]
    bytes_by_language: Counter[str]  # of the kept files' own bytes
    source_bytes: int
    done: int  # items judged: all of them, or fewer when a byte budget ran out first


class _Opener:
    """Opens paths beneath one root, one directory at a time with O_NOFOLLOW.

    Files come in sorted path order, so the next file is mostly in the same directory, a
    sibling, or back up after a subdirectory: the descriptors of the current directory and its
    ancestors stay open (HELD_DIRS of them at most; deeper ones are opened again each time), and
    moving on opens only the directories that changed.
    """

    def __init__(self, root: str) -> None:
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._held: list[tuple[str, int]] = []  # (name, descriptor) of each directory down from root
        self._deep: int | None = None  # the current directory's descriptor when deeper than that
        self._dir_rel, self._dir_fd = "", self.root_fd

    def open(self, rel: str) -> int:
        parent, _, name = rel.rpartition("/")
        if parent != self._dir_rel:
            self._set_dir(parent)
        return os.open(name, _FILE_FLAGS, dir_fd=self._dir_fd)

    def size(self, rel: str) -> int | None:
        """lstat's size of `rel` (None if it is gone): for files the walk did not stat."""
        parent, _, name = rel.rpartition("/")
        try:
            if parent != self._dir_rel:
                self._set_dir(parent)
            return os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False).st_size
        except OSError:
            return None

    def _set_dir(self, parent: str) -> None:
        parts = parent.split("/") if parent else []
        held = self._held
        same = 0
        while same < min(len(held), len(parts)) and held[same][0] == parts[same]:
            same += 1
        self._release(same)
        fd, deep = self._dir_fd, None
        try:
            for part in parts[same:]:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                if deep is not None:
                    os.close(deep)
                    deep = None
                if len(held) < HELD_DIRS:
                    held.append((part, nxt))
                else:
                    deep = nxt
                fd = nxt
        except OSError:
            if deep is not None:
                os.close(deep)
            self._release(len(held))  # the current directory is what `held` reaches
            raise
        self._deep = deep
        self._dir_rel, self._dir_fd = parent, fd

    def _release(self, depth: int) -> None:
        """Close every descriptor below the first `depth` held directories; that is the current one."""
        if self._deep is not None:
            os.close(self._deep)
            self._deep = None
        while len(self._held) > depth:
            os.close(self._held.pop()[1])
        self._dir_rel = "/".join(name for name, _ in self._held)
        self._dir_fd = self._held[-1][1] if self._held else self.root_fd

    def close(self) -> None:
        self._release(0)
        os.close(self.root_fd)


def _read_limited(fd: int, size: int, limit: int, *, probe: bool) -> bytes:
    """At most `limit` bytes of a file `fstat` gave `size`: one that grows while we read (or
    never ends) stops there.

    The first read asks for the whole file plus one byte (which shows that it grew), or, with
    `probe` (a name that does not say text), for PROBE_BYTES: a NUL byte in those marks the file
    binary (as git decides), and the rest of it is never read. A read that returns less than it
    asked for is the end of the file.
    """
    ask = min(size + 1, limit, PROBE_BYTES if probe else limit)
    first = os.read(fd, ask)
    if len(first) < ask or (probe and b"\0" in first):  # all of it, or binary
        return first
    chunks, got = [first], len(first)
    while got < limit:
        ask = min(limit - got, max(size + 1 - got, 65536))
        chunk = os.read(fd, ask)
        chunks.append(chunk)
        got += len(chunk)
        if len(chunk) < ask:
            break
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
    """Counts of the characters of UTF-8 `text` past U+007F. No ASCII byte is part of a longer
    sequence, so deleting them leaves exactly those characters, still valid UTF-8."""
    return Counter(bytes(text).translate(None, _ASCII).decode("utf-8"))


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
    rules, rel = task.rules, item.rel
    reason, detail = path_rules.classify(rel, item.size, item.attrs, item.ignored, item.vendored_dir)
    if reason:
        size = opener.size(rel) if item.size is None else item.size
        return Outcome(rel, size or 0, reason, detail), b"", b""
    try:
        fd = opener.open(rel)
    except OSError as exc:
        return _unopened(opener, item, rules, exc), b"", b""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Outcome(rel, 0, P.SPECIAL), b"", b""
        # The size rules, in PathRules.classify's order, for a file the walk did not stat.
        if st.st_size > rules.max_file_bytes:
            return Outcome(rel, st.st_size, P.TOO_LARGE), b"", b""
        if st.st_size == 0:
            return Outcome(rel, 0, P.EMPTY), b"", b""
        name = P.name_info(rel[rel.rfind("/") + 1:])
        data = _read_limited(fd, st.st_size, rules.max_file_bytes + 1, probe=not name.text)
    except OSError as exc:
        return Outcome(rel, 0, P.UNREADABLE, exc.strerror), b"", b""
    finally:
        os.close(fd)
    display = f"{task.label}/{rel}" if task.label else rel
    return judge(rel, display, data, rules, st.st_size, name.language)


def _unopened(opener: _Opener, item: Item, rules: Rules, exc: OSError) -> Outcome:
    """A file that cannot be opened. The size rules come first, as when the walk stat-ed it."""
    size = opener.size(item.rel) if item.size is None else item.size
    if size is not None and size > rules.max_file_bytes:
        return Outcome(item.rel, size, P.TOO_LARGE)
    if size == 0:
        return Outcome(item.rel, 0, P.EMPTY)
    # ELOOP: the path became a link since the walk saw it.
    return Outcome(item.rel, 0, P.SYMLINK if exc.errno == errno.ELOOP else P.UNREADABLE, exc.strerror)


def judge(
    rel: str, display: str, data: bytes, rules: Rules, size: int, language: str | None
) -> tuple[Outcome, bytes, bytes]:
    """Decide on one file's bytes (`size` as stat saw it; `language` from its name, if any):
    skip, or its header and text."""
    skip = b"", b""
    if len(data) > rules.max_file_bytes:
        return Outcome(rel, len(data), P.TOO_LARGE, "grew while being read"), *skip
    if not data:
        return Outcome(rel, size, P.EMPTY), *skip
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


def examine_batch(task: Task, items: Sequence[Item], budget: int | None = None) -> BatchResult:
    """Judge `items` (entries under `task.root`) in order. Runs in a worker process, or inline.

    With a `budget`, stops after the file whose text brings the payload to `budget` bytes
    (`done` says how many items that was): memory stays bounded when the walk gave no sizes.
    """
    opener = _Opener(task.root)
    path_rules = _path_rules(task.rules)
    outcomes: list[Outcome] = []
    parts: list[bytes] = []
    kept: list[str] = []
    skipped: list[str] = []
    beyond_ascii: list[bytes] = []  # the non-ASCII bytes of kept text, counted once at the end
    by_reason: Counter[str] = Counter()
    skipped_dirs = payload = 0
    files_by_language: Counter[str] = Counter()
    bytes_by_language: Counter[str] = Counter()
    try:
        for item in items:
            if item.skip:
                outcome, head, text = Outcome(item.rel, item.size or 0, item.skip, item.detail), b"", b""
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
            language = outcome.language or "other"
            files_by_language[language] += 1
            bytes_by_language[language] += outcome.size
            for piece in (head, text):
                if not piece.isascii():
                    beyond_ascii.append(piece.translate(None, _ASCII))
            payload += outcome.length
            if budget is not None and payload >= budget:
                break
    finally:
        opener.close()
    joined = b"".join(parts)
    other = Counter(b"".join(beyond_ascii).decode("utf-8")) if beyond_ascii else {}
    return BatchResult(
        outcomes, joined, kept, skipped, dict(other), by_reason, skipped_dirs, files_by_language,
        bytes_by_language, sum(bytes_by_language.values()), len(outcomes),
    )
