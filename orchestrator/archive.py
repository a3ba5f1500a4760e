"""Writing an export archive: tar.gz, zip or jsonl, streamed, verified, published atomically.

`orchestrator.export` decides what goes in (members, manifest, README); this module writes it.
Every member is copied from storage in chunks and checked against its recorded size and sha256
on the way; the archive is a temp file until it is complete, then renamed into place (or
uploaded once, for an `s3://` destination).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

from schemas.errors import StorageError, UserError
from workers.storage import CHUNK, Storage, unwritable_reason


@dataclass(frozen=True)
class Member:
    """One archive member copied from storage."""

    name: str  # inside the top folder, from workers.keys
    key: str  # storage key
    size: int
    sha256: str


@dataclass(frozen=True)
class Destination:
    path: Path | None  # local file, or None when the archive is uploaded
    storage: Storage | None  # where to upload, or None for a local file
    key: str | None
    label: str



@contextmanager
def atomic_file(dest: Destination) -> Iterator[tuple[Path, Callable[[Path], str]]]:
    """A temp file to write, and `final(tmp)`, which publishes it and returns its URL.

    The temp file sits beside a local destination (so the rename is atomic) and is removed on
    any failure; an upload happens once, after the archive is complete.
    """
    folder = dest.path.parent if dest.path else None
    try:
        fd, name = tempfile.mkstemp(prefix=".charforge-export-", suffix=".part", dir=folder)
    except OSError as err:
        raise UserError(f"cannot write to {folder or tempfile.gettempdir()}: {err.strerror}") from None
    os.close(fd)
    tmp = Path(name)

    def final(path: Path) -> str:
        if dest.path is not None:
            reason = unwritable_reason(dest.path, now=True)  # swapped in while the archive was written?
            if reason is not None:
                raise UserError(reason)
            path.chmod(0o644)  # mkstemp makes it private; an archive is meant to be shared
            os.replace(path, dest.path)
            return dest.path.as_uri()
        assert dest.storage is not None and dest.key is not None
        dest.storage.put_file(dest.key, path)
        return dest.storage.presign(dest.key)

    try:
        yield tmp, final
    finally:
        tmp.unlink(missing_ok=True)


def write_archive(
    tmp: Path, fmt: str, top: str, manifest: dict[str, Any], readme: bytes,
    members: list[Member], storage: Storage,
) -> None:
    with open(tmp, "wb") as raw:
        if fmt == "jsonl":
            _write_jsonl(raw, manifest, readme, members, storage)
        elif fmt == "zip":
            _write_zip(raw, top, manifest, readme, members, storage)
        else:
            _write_tar(raw, top, manifest, readme, members, storage)
        raw.flush()
        os.fsync(raw.fileno())


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, ensure_ascii=False).encode() + b"\n"


def _write_tar(raw: BinaryIO, top: str, manifest: dict, readme: bytes, members: list[Member],
               storage: Storage) -> None:
    now = time.time()

    def info(name: str, size: int) -> tarfile.TarInfo:
        entry = tarfile.TarInfo(f"{top}/{name}")
        entry.size, entry.mtime, entry.mode = size, now, 0o644
        return entry

    with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("manifest.json", _manifest_bytes(manifest)), ("README.txt", readme)):
            tar.addfile(info(name, len(data)), io.BytesIO(data))
        for member in members:
            with _verified(storage, member) as src:
                try:
                    tar.addfile(info(member.name, member.size), src)
                except OSError as err:  # tarfile's "unexpected end of data": a short object
                    raise _changed(member, f"read failed: {err}") from None


def _write_zip(raw: BinaryIO, top: str, manifest: dict, readme: bytes, members: list[Member],
               storage: Storage) -> None:
    stamp = datetime.now().timetuple()[:6]

    def info(name: str) -> zipfile.ZipInfo:
        entry = zipfile.ZipInfo(f"{top}/{name}", date_time=stamp)
        entry.compress_type = zipfile.ZIP_DEFLATED
        return entry

    with zipfile.ZipFile(raw, "w", allowZip64=True) as zf:
        zf.writestr(info("manifest.json"), _manifest_bytes(manifest))
        zf.writestr(info("README.txt"), readme)
        for member in members:
            with _verified(storage, member) as src, zf.open(info(member.name), "w",
                                                            force_zip64=True) as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)


def _write_jsonl(raw: BinaryIO, manifest: dict, readme: bytes, members: list[Member],
                 storage: Storage) -> None:
    """The manifest as the first line (`"type": "manifest"`), then every batch's lines verbatim."""
    head = {"type": "manifest", **manifest, "readme": readme.decode()}
    raw.write(json.dumps(head, ensure_ascii=False).encode() + b"\n")
    for member in members:
        last = b"\n"
        with _verified(storage, member) as src:
            while chunk := src.read(CHUNK):
                raw.write(chunk)
                last = chunk[-1:]
        if last != b"\n":
            raw.write(b"\n")


class _HashingReader:
    """Reads an object through, hashing and counting; at EOF the caller checks the totals."""

    def __init__(self, src: IO[bytes]) -> None:
        self._src = src
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._src.read(size)
        self.hash.update(data)
        self.size += len(data)
        return data


@contextmanager
def _verified(storage: Storage, member: Member) -> Iterator[_HashingReader]:
    """Stream a member; if what was read is not what the manifest says, abort the export."""
    with storage.open(member.key) as src:
        reader = _HashingReader(src)
        yield reader
        if reader.size == member.size:
            # tarfile stops at the recorded size: a longer object must still be caught.
            reader.read(1)
        if reader.size != member.size or reader.hash.hexdigest() != member.sha256:
            raise _changed(member, "its size or sha256 differs from the recorded artifact")


def _changed(member: Member, why: str) -> StorageError:
    return StorageError(f"export aborted: {member.key}: {why}; no archive was written")


