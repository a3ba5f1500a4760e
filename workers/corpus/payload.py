"""A batch's kept text on its way to the corpus: in memory (in-process: the pieces of each file,
never joined), or in a pool worker's part file (so the text never travels back through a pipe;
the builder's writer copies it in: `streams.Parts` is that side).
"""

from __future__ import annotations

import os
from typing import NamedTuple

from workers.corpus.textscan import ASCII_BYTES

FLUSH_BYTES = 1 << 20  # a pool worker writes a batch's text out this much at a time
PART_BYTES = 64 << 20  # ... to a part file that is replaced by a new one past this size


class PartRef(NamedTuple):
    """Where a pool worker wrote a batch's text: `length` bytes of file `path` from `offset`."""

    path: str
    offset: int
    length: int


class PartFile:
    """A pool worker's part file: the text of its batches, appended, for the builder to copy
    into the corpus (so the text never travels back through a pipe). A new one is started past
    PART_BYTES; the builder deletes those it has copied."""

    current: PartFile | None = None  # this process's, for the build writing to `directory`

    def __init__(self, directory: str) -> None:
        self.directory, self.seq, self.fd, self.size = directory, 0, -1, PART_BYTES

    @classmethod
    def of(cls, directory: str) -> PartFile:
        if cls.current is None or cls.current.directory != directory:
            if cls.current is not None and cls.current.fd >= 0:
                os.close(cls.current.fd)
            cls.current = cls(directory)
        return cls.current

    def start(self) -> tuple[str, int]:
        """(path, offset) where the next batch begins; a batch never spans two files."""
        if self.size >= PART_BYTES:
            if self.fd >= 0:
                os.close(self.fd)
                self.seq += 1
            self.path = os.path.join(self.directory, f"part-{os.getpid()}-{self.seq}")
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            self.size = 0
        return self.path, self.size

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.size += len(data)


class Payload:
    """A batch's kept text (and each file's bytes past 0x7F): held in memory
    (in-process), or appended to the worker's part file FLUSH_BYTES at a time (in a pool), so
    a batch never holds more."""

    def __init__(self, parts: str | None) -> None:
        self.pieces: list[bytes] = []
        self.length = self._pending = 0
        self.beyond_ascii: dict[int, bytes] = {}
        self._file = PartFile.of(parts) if parts else None
        self._start = self._file.start() if self._file else ("", 0)

    def add(self, index: int, head: bytes, text: bytes, beyond: bytes | None) -> None:
        """Kept file `index`: its header and text (a newline is added if it lacks one), and the
        text's bytes past 0x7F (`text_flags`; None: it has none)."""
        pieces = self.pieces
        end = text.endswith(b"\n")
        pieces += (head, text) if end else (head, text, b"\n")
        if not head.isascii():  # no ASCII byte is part of a longer UTF-8 sequence: deleting them
            # leaves the UTF-8 of exactly the characters past U+007F
            self.beyond_ascii[index] = head.translate(None, ASCII_BYTES) + (beyond or b"")
        elif beyond is not None:
            self.beyond_ascii[index] = beyond
        self._pending += len(head) + len(text) + (not end)
        if self._file is not None and self._pending >= FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        data = b"".join(self.pieces)
        self.pieces, self.length, self._pending = [], self.length + len(data), 0
        self._file.write(data)  # type: ignore[union-attr]

    def finish(self) -> tuple[list[bytes], int, PartRef | None]:
        """The text's pieces in memory (the writer takes them as they are: no join), or none
        and where it was written; its length."""
        if self._file is None:
            return self.pieces, self._pending, None
        self._flush()
        return [], self.length, PartRef(*self._start, self.length)
