"""One storage interface, two backends: a local directory (`file://`) and S3 (`s3://bucket/prefix`).

Writes are atomic (temp file + rename on disk; one PUT or a completed multipart upload on S3) and
stream: a writer hashes bytes on their way out, so every object's size and sha256 are known
without reading it twice and without holding it in memory. Keys are checked before they touch a
filesystem path or a bucket.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

from schemas.errors import ArtifactNotFound, StorageError

CHUNK = 1024 * 1024
_KEY = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
MAX_KEY_LENGTH = 1024  # S3's limit; a local filesystem accepts less per name, never more


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str


def check_key(key: str) -> str:
    """Refuse keys that could escape the storage root or be read as something else.

    Relative segments only, of letters, digits, `_`, `.` and `-`, none starting with a dot:
    that rules out `..`, `/abs`, `a//b`, and names that collide with our `.tmp-*` files.
    """
    if (
        not isinstance(key, str)
        or len(key) > MAX_KEY_LENGTH
        or not _KEY.match(key)
        or any(part.startswith(".") for part in key.split("/"))
    ):
        raise StorageError(f"invalid storage key {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a key, or a key followed by `/`."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


class HashingWriter:
    """A write-only file wrapper that counts and hashes what passes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._raw.write(data)

    def flush(self) -> None:
        self._raw.flush()

    def writable(self) -> bool:
        return True

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def unwritable_reason(path: Path, *, now: bool = False) -> str | None:
    """`cannot write PATH: it is a FIFO; ...` for a destination that exists as anything but a
    regular file (`now`: found so only after the work was done), else None.

    Outputs are written beside their destination and renamed onto it: over a device, FIFO or
    link that would replace (and then delete) the node itself, /dev/full included.
    """
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None  # missing (to be made), or unreadable here: the write itself says why
    if stat.S_ISREG(mode):
        return None
    kind = next((kind for test, kind in _KINDS if test(mode)), "not a regular file")
    if now:
        return f"cannot write {path}: it is {kind} now; nothing was written there"
    return f"cannot write {path}: it is {kind}; give a new path or a regular file to replace"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Storage(ABC):
    url: str

    @abstractmethod
    @contextmanager
    def writer(self, key: str) -> Iterator[HashingWriter]:
        """Stream an object in; it appears under `key` only if the block exits cleanly.

        After the block, `writer.size` and `writer.sha256` describe what was stored.
        """

    @abstractmethod
    def put_file(self, key: str, path: Path) -> ObjectInfo: ...

    @abstractmethod
    @contextmanager
    def open(self, key: str) -> Iterator[IO[bytes]]:
        """Stream an object out. Raises `ArtifactNotFound` if it does not exist."""

    @abstractmethod
    @contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        """A local file holding the object (for mmap): the file itself on disk, a copy for S3."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under `prefix`, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; removing a missing one is not an error."""

    @abstractmethod
    def presign(self, key: str, expires: int = 3600) -> str: ...

    def check(self) -> None:
        """Fail now, with the reason, if this storage cannot be read (credentials, bucket, endpoint).

        `charforge jobs submit` calls it before queueing anything: a wrong S3 key is the user's
        to fix at once, not a run that fails minutes later on a worker.
        """
        next(iter(self.list("runs/")), None)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        with self.writer(key) as out:
            out.write(data)
        return ObjectInfo(key, out.size, out.sha256)

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as fh:
            return fh.read()

    def download(self, key: str, dest: Path) -> Path:
        """Copy an object to `dest`; a download cut short leaves no truncated file there."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self.open(key) as src:
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return dest


class LocalStorage(Storage):
    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self.url = f"file://{self.root}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file on the way, no permission, a read-only disk
            raise StorageError(f"cannot use the storage folder {self.root}: {exc.strerror or exc}") from None

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @contextmanager
    def writer(self, key: str) -> Iterator[HashingWriter]:
        dest = self._path(key)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)
        except OSError as exc:
            reason = exc.strerror or exc
            raise StorageError(f"cannot write {key!r} in {self.url}: {reason}") from None
        try:
            with os.fdopen(fd, "wb") as raw:
                out = HashingWriter(raw)
                yield out
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        with self.writer(key) as out, open(path, "rb") as src:
            while chunk := src.read(CHUNK):
                out.write(chunk)
        return ObjectInfo(key, out.size, out.sha256)

    @contextmanager
    def open(self, key: str) -> Iterator[IO[bytes]]:
        try:
            fh = open(self._path(key), "rb")  # noqa: SIM115 - closed by the `with` below
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ArtifactNotFound(f"no object {key!r} in {self.url}") from None
        with fh:
            yield fh

    @contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        path = self._path(key)
        if not path.is_file():
            raise ArtifactNotFound(f"no object {key!r} in {self.url}")
        yield path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise ArtifactNotFound(f"no object {key!r} in {self.url}")
        return path.stat().st_size

    def list(self, prefix: str = "") -> Iterator[str]:
        # Walk only the directory the prefix lies in, not the whole store.
        check_prefix(prefix)
        top = self.root / prefix.rpartition("/")[0]
        keys = []
        for dirpath, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if name.startswith("."):  # `.tmp-*` writes in progress are not objects yet
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        yield from sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_file():
            path.unlink(missing_ok=True)

    def presign(self, key: str, expires: int = 3600) -> str:
        return self._path(key).as_uri()


def open_storage(url: str, *, endpoint_url: str | None = None) -> Storage:
    """Storage for a `file://` or `s3://bucket/prefix` URL (a bare path means `file://`)."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        if parsed.netloc not in ("", "localhost"):
            # file://data/x would silently mean /x on host "data": say what was meant instead.
            raise StorageError(f"storage URL {url!r} names a host: use file:///absolute/path")
        return LocalStorage(Path(parsed.path if parsed.scheme else url))
    if parsed.scheme == "s3":
        from workers.s3 import S3Storage  # boto3 is imported only when S3 is used

        return S3Storage(parsed.netloc, parsed.path.strip("/"), endpoint_url=endpoint_url)
    raise StorageError(f"unsupported storage URL {url!r}: use file:///path or s3://bucket/prefix")
