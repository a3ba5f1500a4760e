"""How the builder reads and writes: what it reads of a file does not change its verdict, a deep
tree is opened one directory at a time without leaking descriptors, identify is asked once per
extension with identify's own answers, and a write that fails ends the build with its error."""

from __future__ import annotations

import errno
import json
import os
import threading

import pytest
from identify import identify

from schemas.corpus import CorpusConfig
from tests.gitserver import write_files
from workers.corpus import build_corpus_file
from workers.corpus.builder import CorpusBuilder, SourceTree
from workers.corpus.manifest import ManifestWriter
from workers.corpus.paths import name_info
from workers.corpus.reading import HELD_DIRS, PROBE_BYTES
from workers.corpus.sources import GitView
from workers.progress import NULL_REPORTER


def build(tmp_path, files):
    folder = tmp_path / "src"
    write_files(folder, files)
    out = tmp_path / "out" / "corpus.txt"
    build_corpus_file([str(folder)], CorpusConfig(), out, git_base_url="git://unused/")
    manifest = json.loads((tmp_path / "out" / "corpus.txt.manifest.json").read_text())
    return out.read_bytes(), {s["path"]: s["reason"] for s in manifest["skipped"]}, manifest


@pytest.mark.parametrize("name", [
    "a.py", "A.PY", "x.pyc", "Makefile", "Dockerfile.dev", "README", "README.md", ".bashrc",
    ".bashrc.py", "..weird", "a.", "a..b", ".a.b", "setup.cfg", "x.tar.gz", "noext", "v1.2.3",
])
def test_names_get_identifys_own_tags(name):
    for first in ("other.py", "b.md", "zz"):  # whatever name of the same extension came first
        name_info(first)
        assert name_info(name).tags == frozenset(identify.tags_from_filename(name))


def test_what_is_read_of_a_file_does_not_change_its_verdict(tmp_path):
    """A name that says text is read whole at once, another is probed first: the verdicts are
    the content's either way."""
    lines = b"".join(b"line %05d of some text\n" % i for i in range(20000))  # ~500 KB
    files = {
        "late_nul.py": b"a = 1\n" * (PROBE_BYTES // 3) + b"\0\n",  # read whole: binary
        "late_nul.dat": b"a = 1\n" * (PROBE_BYTES // 3) + b"\0\n",  # probed, then read on: binary
        "text.pyc": b"x = 1\n",  # a binary-sounding name with text in it: kept
        "probe.dat": b"y" * 63 + b"\n" + b"p" * 63 + b"\n" * (PROBE_BYTES - 127),  # exactly the probe
        "probe_1.dat": (b"z" * 63 + b"\n") * (PROBE_BYTES // 64) + b"\n",  # one byte past it
        "big.txt": lines,
        "big.dat": lines,
        "empty.py": b"",
        "spaces.py": b"  \n",
    }
    text, skipped, _ = build(tmp_path, files)
    assert skipped == {"late_nul.py": "binary", "late_nul.dat": "binary", "empty.py": "empty",
                       "spaces.py": "empty", "big.txt": "duplicate"}
    assert text == b"".join(b"# %s\n%s" % (name.encode(), files[name])
                            for name in ("big.dat", "probe.dat", "probe_1.dat", "text.pyc"))
    assert [len(files[name]) for name in ("probe.dat", "probe_1.dat")] == [PROBE_BYTES, PROBE_BYTES + 1]


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_deep_tree_is_read_in_order_without_leaking_descriptors(tmp_path):
    depth = HELD_DIRS + 8  # deeper than the descriptors an opener keeps
    files, parts = {}, []
    for level in range(depth):
        parts.append(f"d{level}")
        base = "/".join(parts)
        files[f"{base}/a.py"] = f"a{level} = 1\n"
        files[f"{base}/z.py"] = f"z{level} = 1\n"  # after the subdirectory: back up a level
        if level % 5 == 0:
            files[f"{base}/side/s.py"] = f"s{level} = 1\n"  # a sibling of the next level
    before = _open_fds()
    text, skipped, manifest = build(tmp_path, files)
    assert _open_fds() == before
    assert skipped == {}
    assert [f["path"] for f in manifest["files"]] == sorted(files)
    assert text == b"".join(f"# {p}\n{files[p]}".encode() for p in sorted(files))


@pytest.mark.timeout(60)
def test_a_failed_write_ends_the_build_with_its_error(tmp_path):
    """/dev/full fails every write with ENOSPC: the writer thread's error reaches the caller,
    and the thread is gone."""
    folder = tmp_path / "src"
    write_files(folder, {f"f{i}.py": (f"# file {i}\n" + "x = 1\n" * 40000) for i in range(12)})
    tree = SourceTree(folder, "", GitView(folder, plain_git_dir=tmp_path / "git"))
    with (ManifestWriter(tmp_path / "parts") as manifest, open("/dev/full", "wb") as sink,
          pytest.raises(OSError) as failed):
        CorpusBuilder(CorpusConfig(), sink, manifest, NULL_REPORTER, jobs=1).build([tree])
    assert failed.value.errno == errno.ENOSPC
    assert not [t for t in threading.enumerate() if t.name == "corpus-writer"]
