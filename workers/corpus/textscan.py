"""Scans of corpus text that run over every byte: a byte histogram (`count_bytes`), and the flags
a file's verdict needs (`text_flags`: NUL, encoding, CR, a line too long, whitespace only).

Both come from the C extension `_native` (workers/corpus/native/, built by `pip install`: see
setup.py) when it is there: on the bench tree the histogram runs at ~0.7 GB/s in numpy and
~2 GB/s in C, the flags at ~10 GB/s in C (the long-line check alone costs a Python loop step per
window here). Without a compiler the install goes on, and these pure-Python versions give the
same answers (the tests hold both to it). CHARFORGE_NO_NATIVE=1 turns the extension off (worker processes inherit it).
"""

from __future__ import annotations

import os
from array import array
from types import ModuleType

NATIVE_API = 3  # the _native.API_VERSION these sources were written for


def native_module() -> ModuleType | None:
    """The C extension, or None when it was not built, was built from other sources (an in-place
    build not redone: see scripts/install), or CHARFORGE_NO_NATIVE=1 turns it off."""
    if os.environ.get("CHARFORGE_NO_NATIVE", "") not in ("", "0"):
        return None
    try:
        from workers.corpus import _native
    except ImportError:  # not compiled: see setup.py
        return None
    return _native if getattr(_native, "API_VERSION", None) == NATIVE_API else None


_native = native_module()
NATIVE = _native is not None
SMALL_COUNT = 1 << 16
COUNT_SLICE = 1 << 20  # pairs: bincount widens its input to intp (4x), 8 MiB at a time at most


def new_counts() -> array[int]:
    """A zeroed histogram for `count_bytes`: 256 signed 64-bit counts."""
    return array("q", bytes(256 * 8))


def py_count_bytes(data: bytes | memoryview, counts: array[int]) -> None:
    """`count_bytes` in numpy: counting 16-bit pairs halves the elements numpy must widen."""
    import numpy as np  # only here: worker processes do without it when the C scan is built

    arr = np.frombuffer(data, dtype=np.uint8)
    if len(arr) < SMALL_COUNT:  # a 64K-bin histogram costs more than it saves on little data
        result = np.bincount(arr, minlength=256)
    else:
        pairs = arr[: len(arr) & ~1].view(np.uint16)
        square = np.zeros(1 << 16, dtype=np.int64)
        for start in range(0, len(pairs), COUNT_SLICE):
            square += np.bincount(pairs[start:start + COUNT_SLICE], minlength=1 << 16)
        table = square.reshape(256, 256)  # [first byte, second byte] of each pair
        result = table.sum(axis=0) + table.sum(axis=1)
        if len(arr) & 1:
            result[arr[-1]] += 1
    np.frombuffer(counts, dtype=np.int64)[:] += result


def py_has_long_line(data: bytes | memoryview, limit: int) -> bool:
    """Whether a line of `data` (split at b"\\n") is longer than `limit` bytes (`text_flags`'s LONG):
    jumps a window at a time, not a line."""
    data = bytes(data) if isinstance(data, memoryview) else data
    pos, end = 0, len(data)
    while end - pos > limit:
        newline = data.rfind(b"\n", pos, pos + limit + 1)
        if newline < 0:
            return True
        pos = newline + 1
    return False


# text_flags: what the judging asks of a file's bytes, found in one call while they are in
# cache (the C reader scans each file it reads; content.judge then only looks at the flags).
NUL, ASCII, UTF8, BOM, CR, LONG, SPACE = (1 << i for i in range(7))
ASCII_BYTES = bytes(range(128))  # deleted from UTF-8 text, they leave its other characters whole


def py_text_flags(data: bytes, line_limit: int) -> tuple[int, bytes | None]:
    """(flags, beyond): NUL a NUL byte; ASCII all bytes below 0x80; UTF8 valid UTF-8 (strict);
    BOM starts with a UTF-8 byte-order mark; CR a carriage return; LONG a line longer than
    `line_limit` bytes (never when it is negative); SPACE nothing but ASCII whitespace (and not
    empty). `beyond`: for valid UTF-8 that is not all ASCII, its bytes past 0x7F in order (they
    decode to its characters past U+007F); None otherwise."""
    flags = (NUL if b"\0" in data else 0) | (BOM if data.startswith(b"\xef\xbb\xbf") else 0)
    if data.isascii():
        flags |= ASCII | UTF8
    else:
        try:
            data.decode("utf-8")
            flags |= UTF8
        except UnicodeDecodeError:
            pass
    flags |= CR if b"\r" in data else 0
    flags |= LONG if line_limit >= 0 and py_has_long_line(data, line_limit) else 0
    flags |= SPACE if data.isspace() else 0
    beyond = data.translate(None, ASCII_BYTES) if flags & (ASCII | UTF8) == UTF8 else None
    return flags, beyond


if _native is not None:
    count_bytes = _native.count_bytes
    text_flags = _native.text_flags
else:
    count_bytes = py_count_bytes
    text_flags = py_text_flags

