"""Reading and judging file contents: the part of the build that runs on every core.

`examine_batch` is a top-level function over picklable arguments so a process pool can run it.
It opens each file beneath the tree's root one directory at a time with O_NOFOLLOW (a link
anywhere on the path is refused by the kernel, not by a check that could race), opens with
O_NONBLOCK and checks `fstat` is a regular file (a FIFO or device swapped in cannot block or
feed forever), and never reads more than `max_file_bytes + 1` bytes of anything.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass

import numpy as np

from workers.corpus import paths as P

_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

# Line-comment markers for the per-file header, by identify tag; "#" for everything else.
_SLASHES = frozenset({
    "c", "c++", "c#", "java", "javascript", "jsx", "ts", "tsx", "go", "rust", "kotlin", "scala",
    "swift", "php", "dart", "groovy", "objective-c", "proto", "zig", "cuda", "verilog", "glsl",
    "jsonnet", "solidity", "d", "v",
})
_DASHES = frozenset({"lua", "sql", "haskell", "elm", "ada", "plpgsql", "vhdl"})
_SEMICOLON = frozenset({"asm", "lisp", "clojure", "scheme", "racket", "ini"})
_PERCENT = frozenset({"tex", "latex", "erlang", "matlab", "prolog", "bib"})
_BLOCK = {"html": ("<!--", " -->"), "xml": ("<!--", " -->"), "markdown": ("<!--", " -->"),
          "svg": ("<!--", " -->"), "css": ("/*", " */"), "scss": ("/*", " */"), "less": ("/*", " */")}


def comment_marks(language: str | None) -> tuple[str, str]:
    if language in _BLOCK:
        return _BLOCK[language]
    for marks, family in (("//", _SLASHES), ("--", _DASHES), (";", _SEMICOLON), ("%", _PERCENT)):
        if language in family:
            return marks, ""
    return "#", ""


def header_line(display: str, language: str | None) -> bytes:
    """A comment naming the file, so the model learns how files begin (docs/corpus.md)."""
    start, end = comment_marks(language)
    return f"{start} {display}{end}\n".encode("utf-8")


@dataclass(frozen=True, slots=True)
class ContentRules:
    max_file_bytes: int
    max_line_length: int
    invalid_utf8: str  # "skip" | "replace"
    normalize_newlines: bool
    file_header: bool
    langs: frozenset[str]  # empty: any language


@dataclass(slots=True)
class Item:
    rel: str  # path under the tree root
    display: str  # path shown in the header (prefixed by the repo label when combining)
    language: str | None  # from the file name; None: decided from a `#!` line, if any


@dataclass(slots=True)
class Outcome:
    rel: str
    size: int  # bytes read from the file (its size, when kept)
    reason: str | None = None  # None: kept
    detail: str | None = None
    sha256: bytes | None = None  # of the file's bytes: duplicate detection and the manifest
    language: str | None = None
    payload: bytes | None = None  # what goes into the corpus: header + text + final newline
    ascii_counts: np.ndarray | None = None  # counts of code points 0..127 in the payload
    other_counts: dict[str, int] | None = None  # counts of the rest


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
    """At most `limit` bytes: a file that grows while we read (or never ends) stops there."""
    chunks, got = [], 0
    while got < limit:
        chunk = os.read(fd, min(limit - got, max(size_hint + 1 - got, 65536)))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def longest_line_exceeds(data: bytes, limit: int) -> bool:
    """True if some line is longer than `limit` bytes: jumps a window at a time, not a line."""
    pos, end = 0, len(data)
    while end - pos > limit:
        newline = data.rfind(b"\n", pos, pos + limit + 1)
        if newline < 0:
            return True
        pos = newline + 1
    return False


def count_chars(payload: bytes) -> tuple[np.ndarray, dict[str, int] | None]:
    """Character counts: a byte histogram for ASCII, a Counter for the (rare) rest."""
    counts = np.bincount(np.frombuffer(payload, dtype=np.uint8), minlength=256)
    ascii_counts = counts[:128].copy()
    if not counts[128:].any():
        return ascii_counts, None
    return ascii_counts, dict(Counter(_NON_ASCII.findall(payload.decode("utf-8"))))


def _decode(data: bytes, rules: ContentRules) -> tuple[bytes | None, str | None]:
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


def _examine(opener: _Opener, item: Item, rules: ContentRules) -> Outcome:
    try:
        fd = opener.open(item.rel)
    except OSError as exc:
        # ELOOP: the path became a link since the walk saw it.
        reason = P.SYMLINK if exc.errno == 40 else P.UNREADABLE
        return Outcome(item.rel, 0, reason, exc.strerror)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Outcome(item.rel, 0, P.SPECIAL)
        if st.st_size > rules.max_file_bytes:
            return Outcome(item.rel, st.st_size, P.TOO_LARGE)
        data = _read_limited(fd, st.st_size, rules.max_file_bytes + 1)
    except OSError as exc:
        return Outcome(item.rel, 0, P.UNREADABLE, exc.strerror)
    finally:
        os.close(fd)
    return judge(item, data, rules)


def judge(item: Item, data: bytes, rules: ContentRules) -> Outcome:
    """Decide on one file's bytes: skip with a reason, or the payload to append."""
    size = len(data)
    if size > rules.max_file_bytes:
        return Outcome(item.rel, size, P.TOO_LARGE, "grew while being read")
    if size == 0:
        return Outcome(item.rel, 0, P.EMPTY)
    language = item.language
    if language is None:  # no language from the name: a `#!` line may tell
        tags = P.interpreter_tags(data[:256].split(b"\n", 1)[0])
        language = P.language_of(tags)
        if rules.langs and not tags & rules.langs:
            return Outcome(item.rel, size, P.LANGUAGE)
    text, reason = _decode(data, rules)
    if text is None:
        return Outcome(item.rel, size, reason)
    if rules.normalize_newlines and b"\r" in text:
        text = text.replace(b"\r\n", b"\n")
    if longest_line_exceeds(text, rules.max_line_length):
        return Outcome(item.rel, size, P.MINIFIED, f"a line longer than {rules.max_line_length} bytes")
    if text.isspace():
        return Outcome(item.rel, size, P.EMPTY, "whitespace only")
    head = header_line(item.display, language) if rules.file_header else b""
    payload = head + text + (b"" if text.endswith(b"\n") else b"\n")
    ascii_counts, other = count_chars(payload)
    return Outcome(item.rel, size, None, None, hashlib.sha256(data).digest(), language, payload,
                   ascii_counts, other)


def examine_batch(root: str, items: list[Item], rules: ContentRules) -> list[Outcome]:
    """Examine `items` (paths under `root`) in order. Runs in a worker process."""
    opener = _Opener(root)
    try:
        return [_examine(opener, item, rules) for item in items]
    finally:
        opener.close()
