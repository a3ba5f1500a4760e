"""The threads and files that move the builder's bytes, so that its own thread only judges.

- `Writer`: the corpus file, written (and hashed, and its bytes counted) on a thread of its own;
  it also copies the text of pool batches from the workers' part files.
- `Parts`: the builder's side of those part files (`payload.PartFile` is the workers' side).
- `ReadAhead`: the next files read on a thread of its own while the builder judges the last
  (`ReadInline`: the same, read in the builder's thread, without the C reader).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol

from schemas.errors import CorpusError
from workers.corpus.content import read_slices
from workers.corpus.reading import FileReader, Read
from workers.corpus.textscan import count_bytes, native_module, new_counts

READ_AHEAD = 4  # slices of files read (about content.READ_BYTES each) waiting to be judged
COPY_BYTES = 1024 * 1024  # read from a part file at a time (into one buffer, reused)
QUEUED_WRITES = 4  # texts (a batch's, about a MiB in-process) or copies waiting for the writer

Piece = bytes | memoryview | tuple[int, int, int]  # text, or (fd, offset, length) of a part file


class Writer:
    """Writes the corpus on a thread of its own, hashing it and counting its bytes on the way.

    It writes text handed to it (in-process batches: the pieces of each file, never joined)
    and copies ranges of the workers' part files (read into one buffer it reuses). The C sink
    (`_native.Sink`) hashes, counts and writes a batch in one call that holds no GIL (so on a
    second core it overlaps the walk and the judging, and takes the GIL back once per batch,
    not once per step). At most
    QUEUED_WRITES items wait. An error stops the writing and is raised in the builder's thread,
    by the next call or by `close`. (Measured: moving the duplicate check and the files' own
    sha256 here too was slower; their Python work then competes for the GIL.)
    """

    def __init__(self, out: IO[bytes] | None) -> None:
        self._out = _sink(out)
        self.counts = new_counts()  # of each byte value written
        self._queue: queue.Queue[list[Piece] | Callable[[], None] | None] = queue.Queue(QUEUED_WRITES)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="corpus-writer", daemon=True)
        self._thread.start()

    def _put(self, item: list[Piece] | Callable[[], None]) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(item)

    def write_all(self, pieces: list[Piece]) -> None:
        """Texts, and copies of part files (`(fd, offset, length)`: `length` bytes of the open
        file `fd` from `offset` on), in order, queued as one item: a batch with duplicates in it
        is many runs of text, and a queue item each would make the builder's thread wait for the
        writer's, run after run."""
        if pieces:
            self._put(pieces)

    def then(self, action: Callable[[], None]) -> None:
        """Run `action` on the writer's thread once everything queued before it is written."""
        self._put(action)

    def _run(self) -> None:
        buffer = memoryview(bytearray(COPY_BYTES))
        while (item := self._queue.get()) is not None:
            if self._error is None:  # after an error, only drain: a waiting `write_all` never blocks
                try:
                    if callable(item):
                        item()
                    else:
                        self._pieces(buffer, item)
                except BaseException as exc:  # noqa: BLE001 - raised again in the builder's thread
                    self._error = exc

    def _pieces(self, buffer: memoryview, pieces: list[Piece]) -> None:
        """Texts in one call to the sink (one GIL release, in C), copies one buffer at a time."""
        texts: list[bytes | memoryview] = []
        for piece in pieces:
            if type(piece) is tuple:
                if texts:
                    self._out.write(texts, self.counts)
                    texts = []
                self._copy(buffer, *piece)
            else:
                texts.append(piece)  # type: ignore[arg-type]
        if texts:
            self._out.write(texts, self.counts)

    def _copy(self, buffer: memoryview, fd: int, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            got = os.preadv(fd, [buffer[:min(COPY_BYTES, end - offset)]], offset)
            if got == 0:
                raise CorpusError(f"a part file ended {end - offset} bytes early")
            self._out.write([buffer[:got]], self.counts)
            offset += got

    def close(self, *, check: bool = True) -> str:
        """Wait until everything queued is written; the sha256 of all of it. `check=False`: the
        build failed already, and its error is the one to raise."""
        self._queue.put(None)
        self._thread.join()
        if check and self._error is not None:
            raise self._error
        return self._out.hexdigest()


class _Sink(Protocol):
    """What the writer writes through: `_native.Sink` or `_PySink`."""

    def write(self, pieces: list[bytes | memoryview], counts: array[int]) -> None: ...

    def hexdigest(self) -> str: ...


class _PySink:
    """`_native.Sink` in Python (without the C extension, or for a file object with no
    descriptor): a batch's pieces joined, then hashed, counted and written (`out` None: not
    written)."""

    def __init__(self, out: IO[bytes] | None) -> None:
        self._out, self._hash = out, hashlib.sha256()

    def write(self, pieces: list[bytes | memoryview], counts: array[int]) -> None:
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)  # a batch's pieces are small
        self._hash.update(data)
        count_bytes(data, counts)
        if self._out is not None:
            self._out.write(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _sink(out: IO[bytes] | None) -> _Sink:
    """Where the writer's bytes go: the C sink (hashing, counting and writing each batch in one
    call that holds no GIL) for a file with a descriptor, or for none (`out` None: hash and
    count only, as `inspect` does); `_PySink` otherwise."""
    native = native_module()
    if native is None:
        return _PySink(out)
    fd = -1
    if out is not None:
        try:
            fd = out.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
            return _PySink(out)
    try:
        sink = native.Sink(fd)
    except RuntimeError:  # no libcrypto loaded (OpenSSL linked into Python statically): hashlib
        return _PySink(out)
    if out is not None:
        out.flush()  # the sink writes to the descriptor, past the file object's buffer
    return sink


class Parts:
    """The builder's side of the workers' part files: open ones, and which each worker is on.

    A worker appends to one part file at a time and starts a new one past PART_BYTES; batches
    are consumed in the order they were submitted, so once a worker's batch names its next file,
    every batch in its previous one has been handed to the writer, which deletes that file once
    it has copied them.
    """

    def __init__(self, directory: Path, writer: Writer) -> None:
        self.directory = directory
        self._writer = writer
        self._fds: dict[str, int] = {}
        self._current: dict[str, str] = {}  # worker ("part-<pid>") -> its part file

    def fd(self, path: str) -> int:
        if path not in self._fds:
            if not Path(path).parent.samefile(self.directory):
                raise CorpusError(f"a part file outside the build's directory: {path}")
            worker = os.path.basename(path).rpartition("-")[0]
            previous = self._current.get(worker)
            if previous is not None:
                fd = self._fds.pop(previous)
                self._writer.then(lambda: _drop(fd, previous))
            self._current[worker] = path
            self._fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return self._fds[path]

    def close(self) -> None:
        """Once the writer is done: close and delete the part files still open."""
        while self._fds:
            path, fd = self._fds.popitem()
            _drop(fd, path)


def _drop(fd: int, path: str) -> None:
    os.close(fd)
    os.unlink(path)


class ReadAhead:
    """Reads the files of planned chunks on a thread of its own, in order, a slice of about
    READ_BYTES at a time, while the builder's thread judges the slices before.

    Only with the C reader (`FileReader.native`): it holds no GIL while it reads, so the two
    threads really run at once (Python's `os.read` calls would take turns with the judging for
    the GIL). At most READ_AHEAD slices wait. An error is raised where the slices are taken.
    """

    _END = object()  # a chunk's slices end
    _CLOSED = object()  # the thread's last word

    def __init__(self, reader: FileReader, max_file_bytes: int, line_limit: int) -> None:
        self._reader, self._limits = reader, (max_file_bytes, line_limit)
        self._jobs: queue.Queue[tuple[list[str], bytes] | None] = queue.Queue()
        self._out: queue.Queue[Any] = queue.Queue(READ_AHEAD)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="corpus-reader", daemon=True)
        self._thread.start()

    def submit(self, paths: list[str], probe: bytes) -> None:
        self._jobs.put((paths, probe))

    def slices(self) -> Iterator[list[Read]]:
        """The readings of the oldest chunk submitted and not taken yet (or its error)."""
        while (item := self._out.get()) is not self._END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def _run(self) -> None:
        try:
            while (job := self._jobs.get()) is not None:
                try:
                    for reads in read_slices(self._reader, *job, *self._limits):
                        if self._stop:
                            break
                        self._out.put(reads)
                except BaseException as exc:  # noqa: BLE001 - raised again in the builder's thread
                    self._out.put(exc)  # ends this chunk's slices
                    continue
                self._out.put(self._END)
        finally:
            self._out.put(self._CLOSED)

    def close(self) -> None:
        """Stop reading and wait for the thread (also when the build stopped half-way); again: nothing."""
        if self._stop:
            return
        self._stop = True
        self._jobs.put(None)
        while self._out.get() is not self._CLOSED:  # a reading waiting for room goes on, and ends
            pass
        self._thread.join()


class ReadInline:
    """`ReadAhead` without a thread, for the pure-Python reader (its `os.read` calls would take
    turns with the judging for the GIL): a chunk's files are read as its slices are taken."""

    def __init__(self, reader: FileReader, max_file_bytes: int, line_limit: int) -> None:
        self._reader, self._limits = reader, (max_file_bytes, line_limit)
        self._jobs: deque[tuple[list[str], bytes]] = deque()

    def submit(self, paths: list[str], probe: bytes) -> None:
        self._jobs.append((paths, probe))

    def slices(self) -> Iterator[list[Read]]:
        return read_slices(self._reader, *self._jobs.popleft(), *self._limits)

    def close(self) -> None:
        self._jobs.clear()
