"""Reading files beneath a tree's root: links refused anywhere on the path, nothing but regular
files read, never more than `max_file_bytes + 1` bytes of one.

`FileReader.read` reads a list of paths in one call. With the C extension (`_native.read_files`,
see setup.py and textscan.py) that call holds no GIL and hashes each file (sha256, from the
libcrypto that hashlib loaded): each file is opened with openat2(RESOLVE_NO_SYMLINKS |
RESOLVE_BENEATH) (or, on a kernel without it, one directory at a time with O_NOFOLLOW), so a
thread of the builder reads the next files while Python judges the last ones. Without it,
`_Opener` does the same in Python. Either way a link anywhere on the path is refused by the
kernel, not by a check that could race; files are opened with O_NONBLOCK and `fstat` must say
regular file (a FIFO or device swapped in cannot block or feed forever).
"""

from __future__ import annotations

import errno
import hashlib  # noqa: F401 - loads the libcrypto whose sha256 the C reader borrows (RTLD_NOLOAD)
import os
import stat
from typing import NamedTuple

from workers.corpus.textscan import native_module

_native = native_module()

HELD_DIRS = 32  # directory descriptors an _Opener keeps open down the current path
PROBE_BYTES = 8192  # the first read; git also looks for NUL in the first 8000 bytes
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

# Read.kind
OPEN_FAILED, NOT_REGULAR, REGULAR, READ_FAILED = range(4)


class Read(NamedTuple):
    """One path's reading, as `_native.read_files` returns it (as a plain tuple)."""

    errno: int  # of a failed open or read, else 0
    kind: int  # OPEN_FAILED, NOT_REGULAR, REGULAR or READ_FAILED
    size: int  # fstat's, for a regular file
    data: bytes | None  # a regular file's bytes: b"" when empty or over max_file_bytes (not read)
    sha256: bytes | None = None  # of `data`, when the C reader could hash it (else hashlib does)
    flags: int | None = None  # textscan.text_flags of `data`, from the C reader (else judge scans)
    beyond: bytes | None = None  # ... and the bytes past 0x7F it gives


def _open_dir(name: str, parent: int) -> int:
    """A directory beneath `parent`, never through a link: a link there fails with ELOOP, as
    openat2 says it (O_DIRECTORY | O_NOFOLLOW on a link gives ENOTDIR)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except NotADirectoryError:
        try:
            link = stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
        except OSError:
            link = False
        if link:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name) from None
        raise


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
                nxt = _open_dir(part, fd)
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


def read_limited(fd: int, size: int, limit: int, *, probe: bool) -> bytes:
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


class FileReader:
    """Reads files beneath `root` (see the module docstring); `native=False` forces the
    pure-Python reading (the tests compare the two)."""

    def __init__(self, root: str, *, native: bool = True, walk: bool = False) -> None:
        self._opener = _Opener(root)
        self.native = native and _native is not None
        self._walk = walk  # C reader: one directory at a time even where openat2 works (tests)

    def read(
        self, paths: list[str], probe: bytes, max_file_bytes: int, budget: int, line_limit: int = -1,
    ) -> list[Read]:
        """The first of `paths` (at least one) whose data add up to `budget` bytes. `probe`
        holds a byte per path: 1 for a name that does not say text (read PROBE_BYTES first).
        The C reader also scans each file's data (`text_flags`, lines longer than `line_limit`)."""
        if self.native:
            return _native.read_files(  # type: ignore[union-attr,no-any-return]
                self._opener.root_fd, paths, probe, max_file_bytes, budget, line_limit, self._walk)
        reads: list[Read] = []
        total = 0
        for path, flag in zip(paths, probe, strict=True):
            if reads and total >= budget:
                break
            reads.append(self._read_one(path, flag, max_file_bytes))
            total += len(reads[-1].data or b"")
        return reads

    def _read_one(self, path: str, probe: int, max_file_bytes: int) -> Read:
        try:
            fd = self._opener.open(path)
        except OSError as exc:
            return Read(exc.errno or 0, OPEN_FAILED, 0, None)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return Read(0, NOT_REGULAR, 0, None)
            if st.st_size == 0 or st.st_size > max_file_bytes:
                return Read(0, REGULAR, st.st_size, b"")
            return Read(0, REGULAR, st.st_size, read_limited(fd, st.st_size, max_file_bytes + 1, probe=bool(probe)))
        except OSError as exc:
            return Read(exc.errno or 0, READ_FAILED, 0, None)
        finally:
            os.close(fd)

    def size(self, path: str) -> int | None:
        """lstat's size of `path` (None if it is gone): for files the walk did not stat."""
        return self._opener.size(path)

    def close(self) -> None:
        self._opener.close()
