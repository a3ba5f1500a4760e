"""Judging file contents: the part of the build that runs on every core. (Reading the files
safely is `reading`'s; how a kept file is laid out in the text, its header, is `layout`'s.)

A batch goes `plan` (the path rules: what needs no reading) -> `FileReader.read` (a MiB of
files at a time) -> `Judged.take` (each file's verdict, its header and text, its manifest
record). `examine_batch` does all three, as a top-level function over picklable arguments so a
process pool can run it; the builder also runs the reading on a thread of its own while it
judges (`streams.ReadAhead`).

Everything here runs once per file, tens of thousands of times a build: the walk does not stat
files (the `fstat` of the open file gives their size), a file whose name says text is read with
one `read`, and identify is asked once per extension (docs/corpus.md, "Benchmark").
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

from workers.corpus import paths as P
from workers.corpus.layout import header_line
from workers.corpus.manifest import kept_line, skipped_line
from workers.corpus.payload import PartRef, Payload
from workers.corpus.reading import (
    NOT_REGULAR,
    OPEN_FAILED,
    READ_FAILED,
    FileReader,
    Read,
)
from workers.corpus.textscan import BOM, CR, LONG, NUL, SPACE, UTF8, text_flags

if TYPE_CHECKING:
    from schemas.corpus import CorpusConfig

READ_BYTES = 1 << 20  # files are read until their data reach this, then judged

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
    parts: str | None = None  # a pool worker writes the batch's text to a part file in this directory


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
    payload: list[bytes]  # the pieces of the kept files' payloads, in order ([] when `part` holds them)
    length: int  # bytes of the batch's text (of `payload`, or of `part`)
    part: PartRef | None  # a pool worker's batch: its payload, in a part file
    kept_lines: list[str]  # their manifest records, in order
    skipped_lines: list[str]  # the manifest records of the rest, in order
    beyond_ascii: dict[int, bytes]  # the bytes past 0x7F (header and text) of the kept files that
    # have any, by index in `outcomes`: UTF-8 of their characters past U+007F, which the builder
    # counts (but not those of duplicates)
    by_reason: Counter[str]
    skipped_dirs: int  # skipped entries that are whole directories
    files_by_language: Counter[str]
    bytes_by_language: Counter[str]  # of the kept files' own bytes
    source_bytes: int
    deduped: bool = False  # its duplicates are skipped already (Judged.first_of)


_new = tuple.__new__  # a named tuple with all fields given, without its Python-level __new__ call


class Planned(NamedTuple):
    """An item of a batch before reading: decided already, or a file to read."""

    item: Item
    outcome: Outcome | None  # decided by the walk or by the path rules: nothing to read
    name: P.NameInfo | None  # a file to read: what its name says


def plan(task: Task, items: Sequence[Item], reader: FileReader) -> tuple[list[Planned], list[str], bytes]:
    """The path rules applied to `items`: each item planned, and the paths to read in order
    with their probe flags (`FileReader.read`)."""
    path_rules = _path_rules(task.rules)
    planned: list[Planned] = []
    paths: list[str] = []
    probe = bytearray()
    for item in items:
        rel = item.rel
        if item.skip:
            planned.append(Planned(item, Outcome(rel, item.size or 0, item.skip, item.detail), None))
            continue
        reason, detail = path_rules.classify(rel, item.size, item.attrs, item.ignored, item.vendored_dir)
        if reason:
            size = reader.size(rel) if item.size is None else item.size
            planned.append(Planned(item, Outcome(rel, size or 0, reason, detail), None))
            continue
        name = P.name_info(rel[rel.rfind("/") + 1:])
        planned.append(_new(Planned, (item, None, name)))  # see _new
        paths.append(rel)
        probe.append(not name.text)
    return planned, paths, bytes(probe)


def _verdict(entry: Planned, read: Read, task: Task, reader: FileReader) -> Verdict:
    """A file read, judged: the header, text and non-ASCII bytes are empty unless it is kept."""
    rules, rel = task.rules, entry.item.rel
    err, kind, size, data, digest, flags, beyond = read
    if kind == OPEN_FAILED:
        return _unopened(reader, entry.item, rules, err), b"", b"", None
    if kind == NOT_REGULAR:
        return Outcome(rel, 0, P.SPECIAL), b"", b"", None
    if kind == READ_FAILED:
        return Outcome(rel, 0, P.UNREADABLE, os.strerror(err)), b"", b"", None
    # The size rules, in PathRules.classify's order, for a file the walk did not stat.
    if size > rules.max_file_bytes:
        return Outcome(rel, size, P.TOO_LARGE), b"", b"", None
    if size == 0:
        return Outcome(rel, 0, P.EMPTY), b"", b"", None
    display = f"{task.label}/{rel}" if task.label else rel
    scan = None if flags is None else (flags, beyond)
    return judge(rel, display, data, rules, size, entry.name.language, digest, scan)  # type: ignore[arg-type,union-attr]


def _unopened(reader: FileReader, item: Item, rules: Rules, err: int) -> Outcome:
    """A file that cannot be opened. The size rules come first, as when the walk stat-ed it."""
    size = reader.size(item.rel) if item.size is None else item.size
    if size is not None and size > rules.max_file_bytes:
        return Outcome(item.rel, size, P.TOO_LARGE)
    if size == 0:
        return Outcome(item.rel, 0, P.EMPTY)
    # ELOOP: the path became a link since the walk saw it.
    return Outcome(item.rel, 0, P.SYMLINK if err == errno.ELOOP else P.UNREADABLE, os.strerror(err))


Verdict = tuple[Outcome, bytes, bytes, "bytes | None"]  # verdict, header, text, its bytes past 0x7F
_SKIP = b"", b"", None


def judge(
    rel: str, display: str, data: bytes, rules: Rules, size: int, language: str | None,
    sha256: bytes | None = None, scan: tuple[int, bytes | None] | None = None,
) -> Verdict:
    """Decide on one file's bytes (`size` as stat saw it; `language` from its name, if any;
    `sha256` of `data` and `scan`, its `text_flags`, if known already): skip, or its header,
    text and text's bytes past 0x7F (None: there are none)."""
    if len(data) > rules.max_file_bytes:
        return Outcome(rel, len(data), P.TOO_LARGE, "grew while being read"), *_SKIP
    if not data:
        return Outcome(rel, size, P.EMPTY), *_SKIP
    if language is None:  # no language from the name: a `#!` line may tell
        tags = P.interpreter_tags(data[:256].split(b"\n", 1)[0])
        language = P.language_of(tags)
        if rules.langs and not tags & rules.langs:
            return Outcome(rel, size, P.LANGUAGE), *_SKIP
    limit = rules.max_line_length
    flags, beyond = scan or text_flags(data, limit)
    if flags & NUL:
        return Outcome(rel, size, P.BINARY), *_SKIP
    text = data
    # The encoding policy of docs/corpus.md. Each change of the text is scanned again (rare).
    if not flags & UTF8:
        if rules.invalid_utf8 == "skip":
            return Outcome(rel, size, P.INVALID_UTF8), *_SKIP
        text = text.decode("utf-8", "replace").encode("utf-8")
        flags, beyond = text_flags(text, limit)
    if flags & BOM:  # a byte-order mark is noise in the middle of a corpus
        text = text[3:]
        flags, beyond = text_flags(text, limit)
    if rules.normalize_newlines and flags & CR:
        text = text.replace(b"\r\n", b"\n")
        flags, beyond = text_flags(text, limit)
    if flags & LONG:
        return Outcome(rel, size, P.MINIFIED, f"a line longer than {limit} bytes"), *_SKIP
    if flags & SPACE:
        return Outcome(rel, size, P.EMPTY, "whitespace only"), *_SKIP
    head = header_line(display, language) if rules.file_header else b""
    length = len(head) + len(text) + (not text.endswith(b"\n"))
    digest = sha256 or hashlib.sha256(data).digest()
    return _new(Outcome, (rel, len(data), None, None, digest, language, length)), head, text, beyond


class Judged:
    """The verdicts of a batch, in order, collected into its BatchResult.

    `first_of` (in-process, where the builder's duplicate index is at hand): asked of each file
    kept, it gives None for the first file with its bytes, or what to say of a duplicate ("same as
    ..."), which is then skipped here rather than cut out of the batch's text later.
    """

    def __init__(self, task: Task, first_of: Callable[[int, Outcome], str | None] | None = None) -> None:
        self.task = task
        self.first_of = first_of
        self.payload = Payload(task.parts)
        self.outcomes: list[Outcome] = []
        self.kept: list[str] = []
        self.skipped: list[str] = []
        self.by_reason: Counter[str] = Counter()
        self.skipped_dirs = self.length = 0
        self.files_by_language: Counter[str] = Counter()
        self.bytes_by_language: Counter[str] = Counter()

    def add(self, outcome: Outcome, head: bytes, text: bytes, beyond: bytes | None) -> None:
        if outcome.reason is None and self.first_of is not None:
            same = self.first_of(self.task.repo, outcome)
            if same is not None:
                outcome = outcome._replace(reason=P.DUPLICATE, detail=same)
        self.outcomes.append(outcome)
        if outcome.reason is not None:
            self.by_reason[outcome.reason] += 1
            self.skipped_dirs += outcome.rel.endswith("/")
            self.skipped.append(skipped_line(self.task.repo, outcome))
            return
        self.payload.add(len(self.outcomes) - 1, head, text, beyond)
        self.kept.append(kept_line(self.task.repo, outcome))
        language = outcome.language or "other"
        self.files_by_language[language] += 1
        self.bytes_by_language[language] += outcome.size
        self.length += outcome.length

    def take(self, planned: Sequence[Planned], start: int, reads: Sequence[Read], reader: FileReader,
             *, last: bool = False) -> int:
        """Judge `planned` from `start` on, with `reads` for its files to read in order, up to
        the first file with no read left (all of them when `last`); the index reached."""
        task, i = self.task, 0
        for at in range(start, len(planned)):
            entry = planned[at]
            if entry.outcome is not None:
                self.add(entry.outcome, *_SKIP)
            elif i < len(reads):
                self.add(*_verdict(entry, reads[i], task, reader))
                i += 1
            else:
                assert not last, "a file to read has no reading"
                return at
        return len(planned)

    def result(self) -> BatchResult:
        pieces, length, part = self.payload.finish()
        return BatchResult(
            self.outcomes, pieces, length, part, self.kept, self.skipped, self.payload.beyond_ascii, self.by_reason,
            self.skipped_dirs, self.files_by_language, self.bytes_by_language,
            sum(self.bytes_by_language.values()), self.first_of is not None,
        )


def read_slices(
    reader: FileReader, paths: list[str], probe: bytes, max_file_bytes: int, line_limit: int,
) -> Iterator[list[Read]]:
    """All of `paths` read (and scanned, `text_flags`), READ_BYTES of data (or one file) at a time."""
    done = 0
    while done < len(paths):
        reads = reader.read(paths[done:], probe[done:], max_file_bytes, READ_BYTES, line_limit)
        done += len(reads)
        yield reads


def examine_batch(task: Task, items: Sequence[Item]) -> BatchResult:
    """Judge `items` (entries under `task.root`) in order: what a pool worker runs. With
    `task.parts`, the text goes to this process's part file there, a MiB at a time (`payload`),
    instead of into the result."""
    reader = FileReader(task.root)
    try:
        planned, paths, probe = plan(task, items, reader)
        judged, at = Judged(task), 0
        for reads in read_slices(reader, paths, probe, task.rules.max_file_bytes, task.rules.max_line_length):
            at = judged.take(planned, at, reads, reader)
        judged.take(planned, at, [], reader, last=True)
        return judged.result()
    finally:
        reader.close()
