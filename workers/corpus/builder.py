"""The corpus build: walk -> path rules -> content checks (on every core) -> one ordered stream.

Memory stays flat whatever the corpus size: the walk is a generator, files travel in small
batches, at most `2 x jobs` batches are in flight, the corpus goes straight to its file (through
a writer thread that hashes and counts it on the way: `_Writer`), and the manifest's per-file
records go to disk. Order is the walk's (sorted paths), whatever order the workers finish in,
because batches are consumed in the order they were submitted.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from schemas.corpus import CorpusConfig
from schemas.errors import CorpusError
from schemas.units import human_size
from workers.corpus import paths as P
from workers.corpus.content import (
    BatchResult,
    Item,
    Outcome,
    Rules,
    Task,
    byte_counts,
    examine_batch,
    non_ascii_counts,
)
from workers.corpus.manifest import ManifestWriter, skipped_line
from workers.corpus.pool import INLINE_FILES, Runner, default_jobs
from workers.corpus.sources import GitView, walk
from workers.progress import Reporter
from workers.storage import HashingWriter

CHUNK_ENTRIES = 2048  # paths per `git check-attr` call
BATCH_FILES = 64  # files per task sent to a worker
BATCH_BYTES = 1024 * 1024  # ... or fewer, when they are big: results in flight stay small
# (In-process, a batch is cut where its text reaches BATCH_BYTES, however many files that takes.)
PROGRESS_EVERY = 0.5  # seconds between progress reports
QUEUED_WRITES = 4  # batch payloads waiting for the writer thread


@dataclass
class SourceTree:
    """One repository's files as the builder sees them."""

    root: Path
    label: str  # prefix of header paths when several repos are combined; "" otherwise
    git: GitView
    marks: dict[str, str] = field(default_factory=dict)  # git links/submodules (checkouts)
    attrs_above: bool = False  # .gitattributes may exist above root (a subdirectory spec)


@dataclass
class BuildStats:
    repos: int
    files: int = 0
    bytes: int = 0  # corpus text, headers included
    source_bytes: int = 0  # the kept files' own sizes
    skipped: int = 0
    skipped_dirs: int = 0  # of `skipped`: directories skipped whole (.git/, node_modules/)
    by_reason: Counter[str] = field(default_factory=Counter)
    files_by_language: Counter[str] = field(default_factory=Counter)
    bytes_by_language: Counter[str] = field(default_factory=Counter)
    ascii: np.ndarray = field(default_factory=lambda: np.zeros(128, dtype=np.int64))
    other: Counter[str] = field(default_factory=Counter)
    repo_files: list[int] = field(default_factory=list)
    repo_bytes: list[int] = field(default_factory=list)
    text_sha256: str = ""

    def __post_init__(self) -> None:
        self.repo_files = [0] * self.repos
        self.repo_bytes = [0] * self.repos

    def skip(self, outcome: Outcome, reason: str) -> None:
        self.skipped += 1
        self.skipped_dirs += outcome.rel.endswith("/")
        self.by_reason[reason] += 1

    def keep(self, tree: int, outcome: Outcome, length: int) -> None:
        language = outcome.language or "other"
        self.files += 1
        self.bytes += length
        self.source_bytes += outcome.size
        self.repo_files[tree] += 1
        self.repo_bytes[tree] += outcome.size
        self.files_by_language[language] += 1
        self.bytes_by_language[language] += outcome.size

    def add_batch(self, tree: int, result: BatchResult) -> None:
        kept = sum(result.files_by_language.values())
        self.files += kept
        self.bytes += len(result.payload)
        self.source_bytes += result.source_bytes
        self.repo_files[tree] += kept
        self.repo_bytes[tree] += result.source_bytes
        self.skipped += sum(result.by_reason.values())
        self.skipped_dirs += result.skipped_dirs
        self.by_reason.update(result.by_reason)
        self.files_by_language.update(result.files_by_language)
        self.bytes_by_language.update(result.bytes_by_language)
        self.other.update(result.other_counts)

    def vocab(self) -> list[tuple[str, int]]:
        pairs = [(chr(i), int(n)) for i, n in enumerate(self.ascii) if n]
        pairs += [(c, n) for c, n in self.other.items() if n > 0]
        return sorted(pairs, key=lambda p: (-p[1], p[0]))

    def main_language(self) -> str | None:
        named = [(n, lang) for lang, n in self.bytes_by_language.items() if lang != "other"]
        return max(named)[1] if named else None

    def totals(self) -> dict[str, Any]:
        vocab = self.vocab()
        return {
            "files": self.files,
            "bytes": self.bytes,
            "source_bytes": self.source_bytes,
            "chars": sum(n for _, n in vocab),
            "vocab_size": len(vocab),
            "main_language": self.main_language(),
            "skipped": self.skipped,
            "skipped_by_reason": dict(sorted(self.by_reason.items())),
            "files_by_language": dict(self.files_by_language.most_common()),
            "bytes_by_language": dict(self.bytes_by_language.most_common()),
        }


@dataclass
class _Batch:
    tree: int
    future: Future[BatchResult]


def _done(result: BatchResult) -> Future[BatchResult]:
    future: Future[BatchResult] = Future()
    future.set_result(result)
    return future


def _chunks(entries: Iterable[Item], size: int) -> Iterator[list[Item]]:
    it = iter(entries)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _annotate(git: GitView, chunk: list[Item]) -> list[Item]:
    """`chunk` with what git says of the paths a .gitattributes or .gitignore may concern."""
    attrs = git.attributes([item.rel for item in chunk if item.attr_scope])
    ignored = git.ignored([item.rel for item in chunk if item.ignore_scope])
    if not attrs and not ignored:
        return chunk
    return [item._replace(attrs=attrs.get(item.rel), ignored=item.rel in ignored)
            if item.rel in attrs or item.rel in ignored else item for item in chunk]


def _sized(chunk: list[Item], max_file_bytes: int) -> Iterator[list[Item]]:
    """Batches for a pool: BATCH_FILES files, or fewer when their sizes (lstat) add up to
    BATCH_BYTES."""
    items: list[Item] = []
    size = 0
    for item in chunk:
        items.append(item)
        if item.skip:  # travels with the batch to keep walk order
            continue
        size += min(item.size or 0, max_file_bytes)
        if len(items) >= BATCH_FILES or size >= BATCH_BYTES:
            yield items
            items, size = [], 0
    if items:
        yield items


class _Writer:
    """Writes the corpus on a thread of its own, hashing it and counting its bytes on the way.

    sha256, the byte histogram and the write itself run without the GIL, so on a second core
    they overlap the reading and judging of the next files. At most QUEUED_WRITES payloads wait
    (about 1 MiB each). An error stops the writing and is raised in the builder's thread, by the
    next `write` or by `close`. (Measured: moving the duplicate check and the files' own sha256
    here too was slower; their Python work then competes for the GIL.)
    """

    def __init__(self, out: IO[bytes]) -> None:
        self._out = HashingWriter(out)
        self.ascii = np.zeros(128, dtype=np.int64)  # counts of code points 0..127 written
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUED_WRITES)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="corpus-writer", daemon=True)
        self._thread.start()

    def write(self, text: bytes) -> None:
        if self._error is not None:
            raise self._error
        if text:
            self._queue.put(text)

    def _run(self) -> None:
        while (text := self._queue.get()) is not None:
            if self._error is None:  # after an error, only drain: a waiting `write` never blocks
                try:
                    self._out.write(text)
                    self.ascii += byte_counts(text)[:128]
                except BaseException as exc:  # noqa: BLE001 - raised again in the builder's thread
                    self._error = exc

    def close(self, *, check: bool = True) -> str:
        """Wait until everything queued is written; the sha256 of all of it. `check=False`: the
        build failed already, and its error is the one to raise."""
        self._queue.put(None)
        self._thread.join()
        if check and self._error is not None:
            raise self._error
        return self._out.sha256


class CorpusBuilder:
    """Builds one corpus from one or more trees into `out`, recording every file in `manifest`."""

    def __init__(
        self, config: CorpusConfig, out: IO[bytes], manifest: ManifestWriter, reporter: Reporter,
        *, jobs: int | None = None, inline_files: int | None = None,
    ) -> None:
        self.config = config
        self.rules = P.PathRules(config)
        self._sink = out
        self.manifest = manifest
        self.reporter = reporter
        self.runner = Runner(jobs or default_jobs(), INLINE_FILES if inline_files is None else inline_files)
        self._seen: dict[bytes, tuple[int, str]] = {}
        self._last_report = 0.0

    def build(self, trees: Sequence[SourceTree]) -> BuildStats:
        self.stats = BuildStats(repos=len(trees))
        self._labels = [tree.label for tree in trees]
        self.out = _Writer(self._sink)
        try:
            self._run(trees)
        except BaseException:
            self.out.close(check=False)
            raise
        self.stats.text_sha256 = self.out.close()
        self.stats.ascii = self.out.ascii
        self._report(force=True)
        if self.stats.files == 0:
            raise CorpusError(empty_message(self.stats))
        return self.stats

    def _run(self, trees: Sequence[SourceTree]) -> None:
        pending: deque[_Batch] = deque()
        try:
            for index, tree in enumerate(trees):
                for batch in self._batches(index, tree):
                    pending.append(batch)
                    while len(pending) > self.runner.window:
                        self._consume(pending.popleft())
            while pending:
                self._consume(pending.popleft())
        finally:
            self.runner.close()

    def _batches(self, index: int, tree: SourceTree) -> Iterator[_Batch]:
        task = Task(str(tree.root), tree.label, index, Rules.of(self.config))
        pooled = self.runner.jobs > 1  # batches sized by lstat, for workers; else cut as they are read
        entries = walk(tree.root, self.rules, marks=tree.marks, attrs_above=tree.attrs_above, sizes=pooled)
        for chunk in _chunks(entries, CHUNK_ENTRIES):
            chunk = _annotate(tree.git, chunk)
            if pooled:
                for items in _sized(chunk, self.config.max_file_bytes):
                    yield _Batch(index, self.runner.submit(task, items))
                continue
            while chunk:
                result = examine_batch(task, chunk, BATCH_BYTES)
                yield _Batch(index, _done(result))
                chunk = chunk[result.done:]

    def _consume(self, batch: _Batch) -> None:
        result = batch.future.result()
        stats = self.stats
        dups = self._duplicates(batch.tree, result) if self.config.dedupe else set()
        if not dups and stats.bytes + len(result.payload) <= self.config.max_total_bytes:
            # The common case: the whole batch goes in as the worker prepared it.
            self.out.write(result.payload)
            self.manifest.add("".join(result.kept_lines), "".join(result.skipped_lines))
            stats.add_batch(batch.tree, result)
        else:
            self._consume_each(batch.tree, result, dups)
        self._report()

    def _duplicates(self, tree: int, result: BatchResult) -> set[int]:
        """Indexes of kept outcomes whose bytes an earlier file already brought in."""
        dups = set()
        for i, o in enumerate(result.outcomes):
            if o.reason is None:
                first = (tree, o.rel)
                if self._seen.setdefault(o.sha256, first) is not first:  # type: ignore[arg-type]
                    dups.add(i)
        return dups

    def _consume_each(self, tree: int, result: BatchResult, dups: set[int]) -> None:
        """File by file: drop duplicates, stop exactly at the total cap."""
        stats, payload, offset = self.stats, memoryview(result.payload), 0
        kept_lines, skipped_lines = iter(result.kept_lines), iter(result.skipped_lines)
        pieces: list[memoryview] = []
        kept: list[str] = []
        skipped: list[str] = []
        for i, o in enumerate(result.outcomes):
            if o.reason is not None:
                stats.skip(o, o.reason)
                skipped.append(next(skipped_lines))
                continue
            piece = payload[offset:offset + o.length]
            offset += o.length
            line = next(kept_lines)
            if i in dups:
                dup = o._replace(reason=P.DUPLICATE, detail=self._same_as(self._seen[o.sha256]))  # type: ignore[index]
                stats.skip(o, P.DUPLICATE)
                skipped.append(skipped_line(tree, dup))
                stats.other.subtract(non_ascii_counts(piece))  # the batch's counts included it
                continue
            if stats.bytes + len(piece) > self.config.max_total_bytes:
                raise CorpusError(cap_message(self.config.max_total_bytes, stats))
            pieces.append(piece)
            kept.append(line)
            stats.keep(tree, o, len(piece))
        self.out.write(b"".join(pieces))
        self.manifest.add("".join(kept), "".join(skipped))
        stats.other.update(result.other_counts)

    def _same_as(self, first: tuple[int, str]) -> str:
        label = self._labels[first[0]]
        return f"same as {label}/{first[1]}" if label else f"same as {first[1]}"

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_report >= PROGRESS_EVERY:
            self._last_report = now
            s = self.stats
            self.reporter.progress(s.files + s.skipped, None, files=s.files, bytes=s.bytes, skipped=s.skipped)


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def empty_message(stats: BuildStats) -> str:
    """Files and directories counted apart: a skipped directory (.git/, a vendored tree of
    thousands of files) is one entry, not one file."""
    reasons = ", ".join(f"{r}: {n}" for r, n in sorted(stats.by_reason.items(), key=lambda kv: (-kv[1], kv[0])))
    what = _count(stats.skipped - stats.skipped_dirs, "file", "files")
    if stats.skipped_dirs:
        what += " and " + _count(stats.skipped_dirs, "directory", "directories")
    return f"corpus is empty after filters: {what} skipped ({reasons or 'no files at all'})"


def cap_message(cap: int, stats: BuildStats) -> str:
    return (
        f"corpus is larger than the total size cap of {human_size(cap)}: stopped after {stats.files} "
        f"files ({human_size(stats.bytes)}); narrow it with --include/--exclude/--lang or raise the cap "
        "(--max-total-size, corpus.max_total_bytes)"
    )
