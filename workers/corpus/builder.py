"""The corpus build: walk -> path rules -> reading -> judging -> one ordered stream.

On two cores (one job) the build runs in this process on three threads: this one walks and
judges, `streams.ReadAhead` reads the next files (the C reader holds no GIL), and
`streams.Writer` writes, hashes and counts the corpus. With more cores, batches after the first
INLINE_FILES files go to a process pool whose workers write their text to part files that the
writer copies in (docs/corpus.md, "Benchmark", says what each costs).

Memory stays flat whatever the corpus size: the walk is a generator, files are read a slice of
about a MiB at a time, a bounded number of slices and batches are in flight, the corpus goes
straight to its file, and the manifest's per-file records go to disk. Order is the walk's
(sorted paths), whatever order the workers finish in, because batches are consumed in the order
they were submitted.
"""

from __future__ import annotations

import gc
import itertools
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from schemas.corpus import CorpusConfig
from schemas.errors import CorpusError
from workers.corpus import paths as P
from workers.corpus.content import (
    BatchResult,
    Item,
    Judged,
    Outcome,
    Planned,
    Rules,
    Task,
    plan,
)
from workers.corpus.manifest import ManifestWriter, skipped_line
from workers.corpus.pool import INLINE_FILES, Runner, default_jobs
from workers.corpus.reading import FileReader, Read
from workers.corpus.sources import GitView, walk
from workers.corpus.stats import BuildStats, cap_message, empty_message
from workers.corpus.streams import Parts, Piece, ReadAhead, ReadInline, Writer
from workers.progress import Reporter

CHUNK_ENTRIES = 2048  # paths per `git check-attr` call
BATCH_FILES = 256  # entries per task sent to a worker (its text goes to a part file, not back)
PROGRESS_EVERY = 0.5  # seconds between progress reports
GC_THRESHOLD = 20_000  # allocations between young collections while a build runs (Python's default: 700)


@dataclass
class SourceTree:
    """One repository's files as the builder sees them."""

    root: Path
    label: str  # prefix of header paths when several repos are combined; "" otherwise
    git: GitView
    marks: dict[str, str] = field(default_factory=dict)  # git links/submodules (checkouts)
    attrs_above: bool = False  # .gitattributes may exist above root (a subdirectory spec)


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


_gc_lock = threading.Lock()
_gc_builds = 0  # builds running in this process (threads may run several)
_gc_threshold: tuple[int, int, int] = (0, 0, 0)  # the threshold before the first of them


@contextmanager
def fewer_collections() -> Iterator[None]:
    """The cyclic garbage collector runs less often while a build runs.

    A build allocates a few containers per file (tuples, lists, records), tens of thousands in
    all and none in a reference cycle. At Python's default threshold the collector ran ~270 times
    per build of the stdlib tree, twice over every object in the process: 12% of the builder's
    thread (0.045 s of 0.38 s; docs/corpus.md, "Benchmark"). It still runs, every GC_THRESHOLD
    allocations. The threshold is the process's: the first of concurrent builds raises it, the
    last puts it back, unless other code changed it meanwhile. A threshold of 0 (collection off)
    or above GC_THRESHOLD is left as it is.
    """
    global _gc_builds, _gc_threshold
    with _gc_lock:
        if _gc_builds == 0:
            _gc_threshold = gc.get_threshold()
            if 0 < _gc_threshold[0] < GC_THRESHOLD:
                gc.set_threshold(GC_THRESHOLD, *_gc_threshold[1:])
        _gc_builds += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_builds -= 1
            if _gc_builds == 0 and gc.get_threshold() == (GC_THRESHOLD, *_gc_threshold[1:]):
                gc.set_threshold(*_gc_threshold)


class CorpusBuilder:
    """Builds one corpus from one or more trees into `out` (None: hashed and counted only),
    recording every file in `manifest`.

    `parts`: a directory of its own for the workers' part files (made when a pool starts;
    a temporary directory when none is given), emptied by the end of `build`.
    """

    def __init__(
        self, config: CorpusConfig, out: IO[bytes] | None, manifest: ManifestWriter, reporter: Reporter,
        *, jobs: int | None = None, inline_files: int | None = None, parts: Path | None = None,
    ) -> None:
        self.config = config
        self.rules = P.PathRules(config)
        self._sink = out
        self.manifest = manifest
        self.reporter = reporter
        self.runner = Runner(jobs or default_jobs(), INLINE_FILES if inline_files is None else inline_files)
        self._parts_dir = parts
        self._seen: dict[bytes, tuple[int, str]] = {}
        self._last_report = 0.0

    def build(self, trees: Sequence[SourceTree]) -> BuildStats:
        self.stats = BuildStats(repos=len(trees))
        self._labels = [tree.label for tree in trees]
        self.out = Writer(self._sink)
        own_dir = self._parts_dir is None and self.runner.jobs > 1
        directory = Path(tempfile.mkdtemp(prefix="charforge-parts-")) if own_dir else self._parts_dir
        self.parts = Parts(directory, self.out) if directory else None
        try:
            try:
                if self.parts:
                    self.parts.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                with fewer_collections():
                    self._run(trees)
            except BaseException:
                self.out.close(check=False)
                raise
            self.stats.text_sha256 = self.out.close()
            self.stats.ascii = self.out.counts[:128].tolist()
        finally:
            if self.parts:
                self.parts.close()
            if own_dir:
                shutil.rmtree(directory, ignore_errors=True)  # type: ignore[arg-type]
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
        """The tree's batches in walk order: examined in-process (the first INLINE_FILES files
        of a pool build, or all with one job) or by the pool's workers."""
        task = Task(str(tree.root), tree.label, index, Rules.of(self.config))
        pooled = replace(task, parts=str(self.parts.directory)) if self.parts else task
        entries = walk(tree.root, self.rules, marks=tree.marks, attrs_above=tree.attrs_above)
        reader = FileReader(str(tree.root))
        first_of = self._first_of if self.config.dedupe else None
        ahead = (ReadAhead if reader.native else ReadInline)(
            reader, self.config.max_file_bytes, self.config.max_line_length)
        waiting: deque[list[Planned]] = deque()  # planned chunks whose files `ahead` reads, in order
        try:
            for chunk in _chunks(entries, CHUNK_ENTRIES):
                chunk = _annotate(tree.git, chunk)
                if not self.runner.inline(chunk):  # a worker's text goes to its part file: any size
                    while waiting:
                        yield from self._judge(task, waiting.popleft(), ahead.slices(), reader, first_of)
                    first_of = None  # pool batches before the next files: duplicates are found in order
                    for items in _chunks(chunk, BATCH_FILES):
                        yield _Batch(index, self.runner.submit(pooled, items))
                    continue
                planned, paths, probe = plan(task, chunk, reader)
                ahead.submit(paths, probe)  # read while the chunk before is judged
                waiting.append(planned)
                if len(waiting) > 1:
                    yield from self._judge(task, waiting.popleft(), ahead.slices(), reader, first_of)
            while waiting:
                yield from self._judge(task, waiting.popleft(), ahead.slices(), reader, first_of)
        finally:
            ahead.close()
            reader.close()

    @staticmethod
    def _judge(
        task: Task, planned: list[Planned], slices: Iterable[list[Read]], reader: FileReader,
        first_of: Callable[[int, Outcome], str | None] | None,
    ) -> Iterator[_Batch]:
        """In-process: a batch for each slice of files read (about READ_BYTES of text)."""
        at = 0
        for reads in slices:
            judged = Judged(task, first_of)
            at = judged.take(planned, at, reads, reader)
            yield _Batch(task.repo, _done(judged.result()))
        if at < len(planned):  # entries after the last file read, decided without reading
            judged = Judged(task, first_of)
            judged.take(planned, at, [], reader, last=True)
            yield _Batch(task.repo, _done(judged.result()))

    def _consume(self, batch: _Batch) -> None:
        result = batch.future.result()
        stats = self.stats
        dups = self._duplicates(batch.tree, result) if self.config.dedupe and not result.deduped else {}
        if not dups and stats.bytes + result.length <= self.config.max_total_bytes:
            # The common case: the whole batch goes in as the worker prepared it.
            if result.part is None:
                self.out.write_all(result.payload)  # type: ignore[arg-type]
            else:
                self.out.write_all([self._piece(result, 0, result.length)])
            self.manifest.add("".join(result.kept_lines), "".join(result.skipped_lines))
            stats.add_batch(batch.tree, result)
        else:
            self._consume_each(batch.tree, result, dups)
        self._report()

    def _piece(self, result: BatchResult, start: int, end: int, text: memoryview | None = None) -> Piece:
        """Bytes start..end of the batch's text (`text`: its payload joined), as the writer takes them."""
        if text is not None:
            return text[start:end]
        return self.parts.fd(result.part.path), result.part.offset + start, end - start  # type: ignore[union-attr]

    def _first_of(self, tree: int, outcome: Outcome) -> str | None:
        """None for the first file kept with these bytes; for a later one, "same as <first>"."""
        key = (tree, outcome.rel)
        first = self._seen.setdefault(outcome.sha256, key)  # type: ignore[arg-type]
        return None if first is key else self._same_as(first)

    def _duplicates(self, tree: int, result: BatchResult) -> dict[int, str]:
        """Kept outcomes whose bytes an earlier file already brought in, by index, with what to say
        of each ("same as ..."). Pool batches: in-process ones skip them as they are judged."""
        dups = {}
        for i, o in enumerate(result.outcomes):
            if o.reason is None and (same := self._first_of(tree, o)) is not None:
                dups[i] = same
        return dups

    def _consume_each(self, tree: int, result: BatchResult, dups: dict[int, str]) -> None:
        """File by file: drop duplicates, stop exactly at the total cap. Runs of kept files are
        copied whole."""
        stats = self.stats
        kept_lines, skipped_lines = iter(result.kept_lines), iter(result.skipped_lines)
        kept: list[str] = []
        skipped: list[str] = []
        runs: list[Piece] = []  # written at once: the writer's queue takes whole batches
        run_start = offset = 0  # the run of kept text not copied yet starts at run_start
        text = memoryview(b"".join(result.payload)) if result.part is None else None
        for i, o in enumerate(result.outcomes):
            if o.reason is not None:
                stats.skip(o, o.reason)
                skipped.append(next(skipped_lines))
                continue
            line = next(kept_lines)
            if i in dups:
                dup = o._replace(reason=P.DUPLICATE, detail=dups[i])
                stats.skip(o, P.DUPLICATE)
                skipped.append(skipped_line(tree, dup))
                if offset > run_start:
                    runs.append(self._piece(result, run_start, offset, text))
                offset += o.length
                run_start = offset
                continue
            if stats.bytes + o.length > self.config.max_total_bytes:
                raise CorpusError(cap_message(self.config.max_total_bytes, stats))
            offset += o.length
            kept.append(line)
            stats.keep(tree, o, o.length)
            if i in result.beyond_ascii:
                stats.other.update(result.beyond_ascii[i].decode("utf-8"))
        if offset > run_start:
            runs.append(self._piece(result, run_start, offset, text))
        self.out.write_all(runs)
        self.manifest.add("".join(kept), "".join(skipped))

    def _same_as(self, first: tuple[int, str]) -> str:
        label = self._labels[first[0]]
        return f"same as {label}/{first[1]}" if label else f"same as {first[1]}"

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_report >= PROGRESS_EVERY:
            self._last_report = now
            s = self.stats
            self.reporter.progress(s.files + s.skipped, None, files=s.files, bytes=s.bytes, skipped=s.skipped)
