"""The corpus builder's C extension (workers/corpus/native/) against the Python it stands in
for: the same byte counts, the same long-line verdicts, the same readings of hostile paths (links
anywhere on the path, a FIFO, a directory, sizes around the probe), and the same corpus and
manifest from a whole build. Also the threads and part files that carry the bytes (streams.py).

Without the extension (no C compiler at install) these tests skip, unless CHARFORGE_REQUIRE_NATIVE=1
(.ci/run sets it): then its absence is a failure.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import threading
from array import array
from collections import Counter
from pathlib import Path

import pytest

from schemas.corpus import CorpusConfig
from schemas.errors import CorpusError
from tests.gitserver import Symlink, hostile_files, write_files
from workers.corpus import build_corpus_file, content, payload
from workers.corpus.content import Item, Rules, Task, examine_batch
from workers.corpus.reading import (
    NOT_REGULAR,
    OPEN_FAILED,
    PROBE_BYTES,
    REGULAR,
    FileReader,
)
from workers.corpus.streams import Parts, ReadAhead, Writer
from workers.corpus.textscan import (
    ASCII,
    BOM,
    CR,
    LONG,
    NUL,
    SPACE,
    UTF8,
    native_module,
    new_counts,
    py_count_bytes,
    py_has_long_line,
    py_text_flags,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def native():
    module = native_module()
    if module is None:
        if os.environ.get("CHARFORGE_REQUIRE_NATIVE") == "1":
            pytest.fail("the C extension workers.corpus._native is not built (or was built from other sources): "
                        "run scripts/install")
        pytest.skip("the C extension workers.corpus._native is off (not built, or CHARFORGE_NO_NATIVE=1)")
    return module


@pytest.mark.parametrize("size", [0, 1, 3, 4, 65535, 65536, 65537, (1 << 20) + 3])
def test_count_bytes_matches_numpy_and_counter(native, size):
    data = random.Random(size).randbytes(size)
    c, py = new_counts(), new_counts()
    native.count_bytes(data, c)
    native.count_bytes(memoryview(data)[: size // 2], c)  # counts add up across calls
    py_count_bytes(data, py)
    py_count_bytes(memoryview(data)[: size // 2], py)
    assert c == py
    expected = Counter(data) + Counter(data[: size // 2])
    assert {b: n for b, n in enumerate(c) if n} == dict(expected)


def test_count_bytes_refuses_a_counts_buffer_of_the_wrong_shape(native):
    for wrong in (array("q", bytes(255 * 8)), array("i", bytes(256 * 4)), array("b", bytes(2048))):
        with pytest.raises(ValueError, match="256 64-bit"):
            native.count_bytes(b"abc", wrong)


@pytest.mark.parametrize(("text", "limit", "long"), [
    (b"", 10, False), (b"a" * 10, 10, False), (b"a" * 11, 10, True), (b"a" * 10 + b"\n", 10, False),
    (b"a" * 10 + b"\n" + b"b" * 11, 10, True), (b"\n" * 50, 0, False), (b"a", 0, True),
    (b"x\n" * 1000 + b"y" * 11 + b"\n" + b"z\n" * 1000, 10, True), (b"ab\r\n" * 3000, 2, True),
    (b"ab\r\n" * 3000, 3, False), (b"q" * 5000 + b"\n", 4999, True), (b"q" * 5000 + b"\n", 5000, False),
])
def test_long_lines_match_python(native, text, limit, long):
    assert bool(native.text_flags(text, limit)[0] & LONG) is long
    assert py_has_long_line(text, limit) is long
    assert bool(native.text_flags(memoryview(text), limit)[0] & LONG) is long


def test_long_lines_on_random_text(native):
    rng = random.Random(7)
    for _ in range(200):
        text = b"\n".join(b"x" * rng.randrange(0, 40) for _ in range(rng.randrange(0, 30)))
        limit = rng.randrange(0, 45)
        assert bool(native.text_flags(text, limit)[0] & LONG) == py_has_long_line(text, limit) == (
            max((len(line) for line in text.split(b"\n")), default=0) > limit)


@pytest.mark.parametrize(("text", "flags"), [
    (b"", ASCII | UTF8), (b"abc\n", ASCII | UTF8), (b"a\0b", NUL | ASCII | UTF8),
    (b" \t\n\x0b\x0c\r", ASCII | UTF8 | SPACE | CR), (b"\xef\xbb\xbfx = 1\n", UTF8 | BOM),
    ("héllo\r\n".encode(), UTF8 | CR), (b"x" * 11, ASCII | UTF8 | LONG), ("ü😀".encode(), UTF8),
    (b"\xff", 0), (b"\xc3", 0), (b"\xc0\xaf", 0), (b"\xe0\x80\x80", 0),  # cut short, overlong
    (b"\xed\xa0\x80", 0), (b"\xf4\x90\x80\x80", 0), (b"\xf8\x88\x80\x80\x80", 0),  # surrogate, past U+10FFFF
    ("\U0010ffff\ud7ff\ue000".encode(), UTF8), (b"abcdefgh\x80", 0), (b"abcdefg\xc3\xa9z", UTF8),
])
def test_text_flags_match_python(native, text, flags):
    beyond = bytes(b for b in text if b > 127) if flags & (ASCII | UTF8) == UTF8 else None
    assert native.text_flags(text, 10) == py_text_flags(text, 10) == (flags, beyond)
    assert native.text_flags(memoryview(text), -1)[0] == flags & ~LONG  # a negative limit: no check


def test_text_flags_on_random_bytes(native):
    rng = random.Random(11)
    alphabet = [b"a", b" ", b"\n", b"\r", b"\t", b"\0", "é".encode(), "€".encode(), "😀".encode(), b"\xff",
                b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"x" * 9]
    for _ in range(2000):
        text = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        limit = rng.randrange(-1, 12)
        assert native.text_flags(text, limit) == py_text_flags(text, limit), (text, limit)


def test_sink_hashes_counts_and_writes_pieces_in_order(native, tmp_path):
    """More pieces than one writev takes (512), empty ones, memoryviews and bytearrays."""
    pieces = [b"ab", memoryview(b"xcdx")[1:3], b"", bytearray("é\n".encode())] + [b"z%d" % i for i in range(1500)]
    expected = b"".join(pieces) + b"tail"
    counts, quiet_counts = new_counts(), new_counts()
    with open(tmp_path / "out", "wb") as fh:
        sink, quiet = native.Sink(fh.fileno()), native.Sink(-1)  # -1: hashed and counted, not written
        for s, c in ((sink, counts), (quiet, quiet_counts)):
            s.write(pieces, c)
            s.write([b"tail"], c)
    assert (tmp_path / "out").read_bytes() == expected
    assert sink.hexdigest() == quiet.hexdigest() == hashlib.sha256(expected).hexdigest()
    assert sink.size == quiet.size == len(expected)
    assert counts == quiet_counts and {b: n for b, n in enumerate(counts) if n} == dict(Counter(expected))
    assert native.Sink(-1).hexdigest() == hashlib.sha256(b"").hexdigest()


def test_sink_errors(native, tmp_path):
    (tmp_path / "ro").write_bytes(b"")
    with open(tmp_path / "ro", "rb") as fh:
        with pytest.raises(OSError) as failed:
            native.Sink(fh.fileno()).write([b"x"], new_counts())  # a descriptor not open for writing
        assert failed.value.errno == errno.EBADF
        writer = Writer(fh)  # ... and through the writer: raised where the build waits for it
        writer.write_all([b"text"])
        with pytest.raises(OSError, match="Bad file descriptor"):
            writer.close()
    with pytest.raises(TypeError):
        native.Sink(-1).write([b"x", "not bytes"], new_counts())
    with pytest.raises(ValueError, match="256 64-bit"):
        native.Sink(-1).write([b"x"], array("q", bytes(8)))
    bare = native.Sink.__new__(native.Sink)  # never initialised: an error, not a crash
    with pytest.raises(RuntimeError, match="not called"):
        bare.write([b"x"], new_counts())
    with pytest.raises(RuntimeError, match="not called"):
        bare.hexdigest()


_NO_LIBCRYPTO = """
import sys
sys.modules["_hashlib"] = sys.modules["_ssl"] = None  # hashlib falls back to its own sha256
from pathlib import Path
from schemas.corpus import CorpusConfig
from workers.corpus import build_corpus_file, streams
from workers.corpus.textscan import NATIVE
assert NATIVE and "libcrypto" not in Path("/proc/self/maps").read_text(), "libcrypto is loaded"
assert type(streams._sink(None)).__name__ == "_PySink"
build_corpus_file([sys.argv[1]], CorpusConfig(), Path(sys.argv[2]), git_base_url="git://unused/", jobs=1)
"""


@pytest.mark.timeout(120)
def test_without_a_loaded_libcrypto_the_c_reader_and_the_writer_use_hashlib(native, tmp_path):
    """A Python whose OpenSSL is linked in statically has no libcrypto for the C code to borrow:
    the reader leaves the hashing to hashlib and the writer uses its Python sink."""
    folder = tmp_path / "src"
    write_files(folder, {**hostile_files(), "deep/é.py": "s = 'ß'\n"})
    write_files(folder, {f"many/{i:03}.c": f"int f{i}(void) {{ return {i % 7}; }}\n" for i in range(50)})
    normal, without = tmp_path / "c.txt", tmp_path / "no-crypto.txt"
    build_corpus_file([str(folder)], CorpusConfig(), normal, git_base_url="git://unused/", jobs=1)
    subprocess.run([sys.executable, "-c", _NO_LIBCRYPTO, str(folder), str(without)], check=True, cwd=ROOT)
    assert without.read_bytes() == normal.read_bytes()
    assert Path(f"{without}.manifest.json").read_bytes() == Path(f"{normal}.manifest.json").read_bytes()


def test_a_module_built_from_other_sources_is_not_used(native, monkeypatch):
    """An in-place build not redone after the C sources changed: the pure-Python code runs."""
    monkeypatch.setattr(native, "API_VERSION", native.API_VERSION - 1)
    assert native_module() is None
    monkeypatch.undo()
    assert native_module() is native


MAX = 20_000  # max_file_bytes for the reading tests


def _hostile_tree(root: Path) -> list[str]:
    """Every kind of path the reader may be asked for, and the paths, in order."""
    write_files(root, {
        "a.py": b"print(1)\n",
        "probe.dat": b"y" * PROBE_BYTES,  # exactly the probe: read on, nothing more
        "bin.dat": b"\0" + b"b" * (2 * PROBE_BYTES),  # NUL in the probe: the rest is never read
        "late.dat": b"t" * (2 * PROBE_BYTES) + b"\0",  # NUL after the probe: read whole
        "edge.py": b"e" * MAX,  # exactly max_file_bytes
        "over.py": b"o" * (MAX + 1),  # one byte over: not read
        "empty.txt": b"",
        "real/x.py": b"x = 1\n",
        "linkdir": Symlink("real"),  # linkdir/x.py: a link in the middle of the path
        "link.py": Symlink("a.py"),
        "zero": Symlink("/dev/zero"),
        "passwd": Symlink("/etc/passwd"),
    })
    os.mkfifo(root / "fifo")
    return ["a.py", "probe.dat", "bin.dat", "late.dat", "edge.py", "over.py", "empty.txt", "real/x.py",
            "linkdir/x.py", "link.py", "zero", "passwd", "fifo", "real", "missing.py", "real/nope/x.py"]


@pytest.mark.timeout(60)  # a FIFO opened without O_NONBLOCK would hang here
@pytest.mark.parametrize("walk", [False, True], ids=["openat2", "one-directory-at-a-time"])
def test_read_files_gives_what_the_python_reader_gives(native, tmp_path, walk):
    paths = _hostile_tree(tmp_path)
    probe = bytes(p.endswith(".dat") for p in paths)
    c_reader = FileReader(str(tmp_path), walk=walk)
    py_reader = FileReader(str(tmp_path), native=False)
    try:
        got = c_reader.read(paths, probe, MAX, 1 << 30, 100)
        want = py_reader.read(paths, probe, MAX, 1 << 30, 100)
    finally:
        c_reader.close()
        py_reader.close()
    assert [tuple(r[:4]) for r in got] == [tuple(r[:4]) for r in want]
    by_path = dict(zip(paths, got, strict=True))
    assert by_path["bin.dat"][3] == b"\0" + b"b" * (PROBE_BYTES - 1)  # the probe only
    assert by_path["late.dat"][3].endswith(b"\0") and by_path["edge.py"][3] == b"e" * MAX
    assert by_path["over.py"][1:4] == (REGULAR, MAX + 1, b"")
    for link in ("linkdir/x.py", "link.py", "zero", "passwd"):
        assert by_path[link][:2] == (errno.ELOOP, OPEN_FAILED), link
    assert by_path["fifo"][1] == by_path["real"][1] == NOT_REGULAR
    assert by_path["missing.py"][:2] == (errno.ENOENT, OPEN_FAILED)
    for _err, kind, _, data, digest, flags, beyond in got:  # the C reader hashes and scans what it read
        if kind == REGULAR and data:
            assert digest == hashlib.sha256(data).digest()
            assert (flags, beyond) == py_text_flags(data, 100)
        else:
            assert flags is None and beyond is None


def test_read_files_stops_at_its_budget_and_refuses_a_nul_in_a_path(native, tmp_path):
    write_files(tmp_path, {f"f{i}.py": b"z" * 100 for i in range(5)})
    reader = FileReader(str(tmp_path))
    try:
        paths, probe = [f"f{i}.py" for i in range(5)], bytes(5)
        assert len(reader.read(paths, probe, MAX, 1)) == 1  # at least one, however small the budget
        assert len(reader.read(paths, probe, MAX, 250)) == 3  # until the data reach the budget
        with pytest.raises(ValueError, match="embedded null"):
            reader.read(["f0.py\0/etc/passwd"], b"\0", MAX, 1 << 20)
        with pytest.raises(ValueError, match="one byte per path"):
            reader.read(paths, b"\0", MAX, 1 << 20)
    finally:
        reader.close()


_BUILD = """
import sys
from pathlib import Path
from schemas.corpus import CorpusConfig
from workers.corpus import build_corpus_file
from workers.corpus.textscan import NATIVE
assert not NATIVE, "CHARFORGE_NO_NATIVE=1 should turn the extension off"
config = CorpusConfig.model_validate_json(sys.argv[3])
build_corpus_file([sys.argv[1]], config, Path(sys.argv[2]), git_base_url="git://unused/", jobs=1)
"""


# What the encoding policy changes before a verdict (docs/corpus.md): after the C reader's scan
# the text is scanned again, and the verdicts must be the pure-Python ones.
_POLICY_FILES = {
    "policy/bom.py": b"\xef\xbb\xbfx = 1\r\n", "policy/bom_only.txt": b"\xef\xbb\xbf",
    "policy/crlf.c": b"int x;\r\n" * 3, "policy/lone_cr.txt": b"a\rb\r", "policy/blank.py": b"  \n\t\n",
    "policy/cr_long_50.py": b"y" * 50 + b"\r\n", "policy/cr_long_1000.py": b"y" * 1000 + b"\r\n",
    "policy/bad.py": b"x = '\xff'\n", "policy/bad_bom.py": b"\xef\xbb\xbf\xff\n",
    "policy/script": "#!/usr/bin/env python3\nprint('ü')\n".encode(), "policy/only_ü.md": "ü\n".encode(),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("config", [
    CorpusConfig(), CorpusConfig(invalid_utf8="replace", normalize_newlines=False, max_line_length=50),
], ids=["defaults", "replace-keep-cr"])
def test_a_build_without_the_extension_writes_the_same_corpus_and_manifest(native, tmp_path, config):
    folder = tmp_path / "src"
    write_files(folder, {**hostile_files(), "deep/é/ünï.py": "s = 'ß'\n", "min.js": "x;" * 700})
    write_files(folder, {f"many/{i:03}.c": f"int f{i}(void) {{ return {i % 7}; }}\n" for i in range(300)})
    write_files(folder, _POLICY_FILES)
    os.mkfifo(folder / "fifo")
    with_c, without = tmp_path / "c.txt", tmp_path / "py.txt"
    build_corpus_file([str(folder)], config, with_c, git_base_url="git://unused/", jobs=1)
    subprocess.run([sys.executable, "-c", _BUILD, str(folder), str(without), config.model_dump_json()],
                   check=True, cwd=ROOT, env={**os.environ, "CHARFORGE_NO_NATIVE": "1"})
    assert with_c.read_bytes() == without.read_bytes()
    manifest = Path(f"{with_c}.manifest.json").read_bytes()
    assert manifest == Path(f"{without}.manifest.json").read_bytes()
    assert json.loads(manifest)["totals"]["files"] > 300


def test_read_ahead_raises_the_readers_error_and_stops_when_left_half_way(native, tmp_path, monkeypatch):
    write_files(tmp_path, {f"f{i:02}.py": b"z" * 100 for i in range(20)})
    monkeypatch.setattr(content, "READ_BYTES", 1)  # a slice per file: more than fit in the queue
    reader = FileReader(str(tmp_path))
    ahead = ReadAhead(reader, MAX, 100)
    try:
        ahead.submit([f"f{i:02}.py" for i in range(20)], bytes(20))
        ahead.submit(["bad\0name"], b"\0")
        first = next(ahead.slices())
        assert [r[3] for r in first] == [b"z" * 100]
        assert len(list(ahead.slices())) == 19  # the rest of the first chunk, then its end
        with pytest.raises(ValueError, match="embedded null"):
            list(ahead.slices())
        ahead.submit([f"f{i:02}.py" for i in range(20)], bytes(20))
        assert len(next(ahead.slices())) == 1  # chunks after an error are read as before
        # ... and the build stops here: the reader is blocked on a full queue; close() ends it.
    finally:
        ahead.close()
        ahead.close()  # again: nothing to wait for
        reader.close()
    assert not [t for t in threading.enumerate() if t.name == "corpus-reader"]


def test_part_files_are_copied_in_order_and_deleted_once_copied(tmp_path, monkeypatch):
    """A worker starts a new part file once the last one is past PART_BYTES; the writer copies
    each batch's text from it and deletes a file once every batch in it is copied."""
    src, parts_dir = tmp_path / "src", tmp_path / "parts"
    write_files(src, {f"f{i}.py": f"x{i} = {'1' * i}\n" for i in range(6)})
    parts_dir.mkdir()
    monkeypatch.setattr(payload, "PART_BYTES", 1)  # every batch in a part file of its own
    monkeypatch.setattr(payload.PartFile, "current", None)
    task = Task(str(src), "", 0, Rules.of(CorpusConfig()), str(parts_dir))
    results = [examine_batch(task, [Item(f"f{i}.py", None), Item(f"f{i + 1}.py", None)]) for i in (0, 2, 4)]
    os.close(payload.PartFile.current.fd)  # what the worker's exit does
    assert len({r.part.path for r in results}) == 3 and all(r.payload == [] for r in results)
    sink = io.BytesIO()
    writer = Writer(sink)
    parts = Parts(parts_dir, writer)
    for r in results:
        writer.write_all([(parts.fd(r.part.path), r.part.offset, r.part.length)])
    sha = writer.close()
    assert sorted(os.listdir(parts_dir)) == [os.path.basename(results[-1].part.path)]  # still open
    parts.close()
    assert os.listdir(parts_dir) == []
    expected = b"".join(f"# f{i}.py\nx{i} = {'1' * i}\n".encode() for i in range(6))
    assert sink.getvalue() == expected and sha == hashlib.sha256(expected).hexdigest()


def test_a_part_file_shorter_than_its_batch_fails_the_build(tmp_path):
    part = tmp_path / "part-1-0"
    part.write_bytes(b"abc")
    writer = Writer(io.BytesIO())
    parts = Parts(tmp_path, writer)
    writer.write_all([(parts.fd(str(part)), 0, 10)])
    with pytest.raises(CorpusError, match="ended 7 bytes early"):
        writer.close()
    parts.close()
    (tmp_path / "elsewhere").mkdir()
    other = Writer(io.BytesIO())
    with pytest.raises(CorpusError, match="outside the build's directory"):
        Parts(tmp_path / "elsewhere", other).fd(str(part))
    other.close()
