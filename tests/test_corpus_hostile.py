"""Issue 3's hostile repository: the corpus holds exactly the normal sources, and the manifest
gives every skipped file its reason. Served by a real git daemon, read as a local work tree, and
copied into a plain folder with a FIFO, a device and a socket added."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat

import pytest

from schemas.corpus import CorpusConfig
from schemas.errors import CorpusError
from schemas.events import EventKind
from schemas.repo import parse_repo_spec
from tests.gitserver import (
    HOSTILE_KEPT,
    HOSTILE_SKIPPED,
    hostile_files,
    source_files,
    write_files,
)
from workers import keys
from workers.corpus import build_corpus_file, run_corpus_stage, run_fetch_stage, sources
from workers.corpus.scratch import scratch_root
from workers.progress import ListReporter
from workers.storage import LocalStorage


def expected_corpus() -> bytes:
    """The hostile repo's corpus, written out by hand: headers are comments in each language."""
    src = source_files()
    return (
        b"# .gitattributes\n" + hostile_files()[".gitattributes"]
        + b"<!-- README.md -->\n" + src["README.md"]
        + b"-- lib/init.lua\n" + src["lib/init.lua"]
        + b"# src/main.py\n" + src["src/main.py"]
        + b"// src/util.c\n" + src["src/util.c"]
        + b"// src/util.h\n" + src["src/util.h"]
    )


@pytest.fixture(scope="module")
def hostile(git_server):
    return git_server.publish(git_server.unique("acme/hostile"), hostile_files())


@pytest.fixture(scope="module")
def built(git_server, hostile, tmp_path_factory):
    """One pipeline build of the hostile repo: (storage, result, reporter, scratch parent)."""
    storage = LocalStorage(tmp_path_factory.mktemp("store"))
    scratch = tmp_path_factory.mktemp("scratch")
    reporter = ListReporter("corpus")
    fetch = run_fetch_stage(storage, [parse_repo_spec(hostile.name)], CorpusConfig(),
                            git_base_url=git_server.base_url, reporter=reporter)
    result = run_corpus_stage(storage, fetch, CorpusConfig(), git_base_url=git_server.base_url,
                              reporter=reporter, scratch_dir=scratch)
    return storage, result, reporter, scratch


def test_corpus_holds_exactly_the_normal_sources(built):
    storage, result, _, _ = built
    assert storage.get_bytes(result.text_key) == expected_corpus()


def test_manifest_gives_every_skipped_path_its_reason(built, hostile):
    storage, result, _, _ = built
    manifest = json.loads(storage.get_bytes(result.manifest_key))
    assert {s["path"]: s["reason"] for s in manifest["skipped"]} == HOSTILE_SKIPPED
    dup = next(s for s in manifest["skipped"] if s["reason"] == "duplicate")
    assert dup["detail"] == "same as src/util.c"
    files = hostile_files()
    assert [(f["path"], f["bytes"], f["sha256"]) for f in manifest["files"]] == [
        (p, len(files[p]), hashlib.sha256(files[p]).hexdigest()) for p in HOSTILE_KEPT
    ]
    assert [f["language"] for f in manifest["files"]] == ["gitattributes", "markdown", "lua", "python", "c", "c"]
    assert manifest["repos"][0]["commit"] == hostile.commit
    assert manifest["repos"][0]["ref"] == "main"
    totals = manifest["totals"]
    assert totals["skipped_by_reason"] == {"binary": 2, "duplicate": 1, "generated": 1, "invalid-utf8": 1,
                                           "minified": 2, "symlink": 3, "too-large": 1, "vcs": 1, "vendored": 1}
    text = expected_corpus().decode()
    assert dict(manifest["vocab"]) == {c: text.count(c) for c in set(text)}
    assert manifest["text"] == {"key": result.text_key, "bytes": len(expected_corpus()),
                                "sha256": hashlib.sha256(expected_corpus()).hexdigest()}


def test_stage_result_artifacts_and_progress(built):
    storage, result, reporter, scratch = built
    text = expected_corpus()
    assert (result.files, result.bytes, result.skipped) == (6, len(text), len(HOSTILE_SKIPPED))
    assert result.vocab_size == len(set(text.decode()))
    assert result.main_language == "c"
    assert result.text_key == keys.corpus_text(result.hash) and not result.cached
    artifacts = {a["kind"]: a for a in reporter.of(EventKind.ARTIFACT)}
    assert artifacts["corpus"]["sha256"] == hashlib.sha256(text).hexdigest()
    assert artifacts["manifest"]["size"] == storage.size(result.manifest_key)
    last = reporter.of(EventKind.PROGRESS)[-1]
    assert (last["files"], last["bytes"], last["skipped"]) == (6, len(text), len(HOSTILE_SKIPPED))
    assert list(scratch_root(scratch).iterdir()) == []  # the clone and its scratch are gone


def test_local_work_tree_of_the_same_repo_gives_the_same_corpus(hostile, tmp_path):
    out = tmp_path / "corpus.txt"
    build_corpus_file([str(hostile.work_tree)], CorpusConfig(), out, git_base_url="git://unused/")
    assert out.read_bytes() == expected_corpus()


@pytest.mark.timeout(60)  # a FIFO or /dev/zero that blocked the build would fail here, not hang
def test_plain_folder_with_fifo_device_socket_and_links(tmp_path):
    folder = tmp_path / "plain"
    write_files(folder, hostile_files())
    os.mkfifo(folder / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(folder / "sock"))
        try:  # a character device like /dev/zero; only root may create one
            os.mknod(folder / "zero-device", stat.S_IFCHR | 0o644, os.makedev(1, 5))
            devices = {"zero-device": "special-file"}
        except PermissionError:
            devices = {}
        out = tmp_path / "corpus.txt"
        summary = build_corpus_file([str(folder)], CorpusConfig(), out, git_base_url="git://unused/")
    assert out.read_bytes() == expected_corpus()
    manifest = json.loads((tmp_path / "corpus.txt.manifest.json").read_text())
    skipped = {s["path"]: (s["reason"], s.get("detail")) for s in manifest["skipped"]}
    assert skipped["passwd"] == ("symlink", "-> /etc/passwd")
    assert skipped["zero"] == ("symlink", "-> /dev/zero")
    assert skipped["etc_link"] == ("symlink", "-> /etc")
    expected = {p: r for p, r in HOSTILE_SKIPPED.items() if p != ".git/"}
    expected |= {"fifo": "special-file", "sock": "special-file", **devices}
    assert {p: r for p, (r, _) in skipped.items()} == expected
    assert summary["repos"][0]["commit"] is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", [".gitattributes", "sub/.gitignore"])
def test_a_fifo_git_would_read_is_refused_before_git_runs(tmp_path, name):
    """git opens .gitattributes/.gitignore itself and would block on a FIFO: refused by the walk
    at once (not after GIT_TIMEOUT), nothing written."""
    folder = tmp_path / "plain"
    write_files(folder, {**source_files(), "sub/x.c": b"int x;\n"})
    os.mkfifo(folder / name)
    with pytest.raises(CorpusError) as err:
        build_corpus_file([str(folder)], CorpusConfig(), tmp_path / "c.txt", git_base_url="git://unused/")
    assert str(err.value) == (f"{name} is a FIFO, not a regular file: git would block reading it; "
                              "remove it from the folder (or build from a git clone)")
    assert not (tmp_path / "c.txt").exists()


def test_a_git_call_that_times_out_fails_with_one_line(tmp_path, monkeypatch):
    """Slow storage cannot be caused here: a timeout shorter than any git start stands in."""
    monkeypatch.setattr(sources, "GIT_TIMEOUT", 0.001)
    folder = tmp_path / "plain"
    write_files(folder, {**source_files(), ".gitattributes": b"*.c text\n"})
    with pytest.raises(CorpusError) as err:
        build_corpus_file([str(folder)], CorpusConfig(), tmp_path / "c.txt", git_base_url="git://unused/")
    assert re.fullmatch(rf"git (init|check-attr) timed out after 0s in {re.escape(str(folder))}", str(err.value))
    assert not (tmp_path / "c.txt").exists()


def test_a_file_name_cannot_put_lines_into_the_corpus(git_server, tmp_path):
    """Names may hold newlines and other controls: the header escapes them and stays one line."""
    injected = "a\nimport os; os.system(1)\n#.py"
    closer = "notes -->\u2028\x1b[2J.md"  # closes the Markdown header comment, then a line break
    repo = git_server.publish(git_server.unique("acme/names"), {
        injected: b"x = 1\n", closer: b"# notes\n", "ok.c": b"int ok;\n",
    })
    out = tmp_path / "corpus.txt"
    build_corpus_file([repo.name], CorpusConfig(), out, git_base_url=git_server.base_url)
    assert out.read_bytes().decode("utf-8").split("\n") == [
        "# a\\nimport os; os.system(1)\\n#.py", "x = 1",
        "<!-- notes --\\>\\u2028\\x1b[2J.md -->", "# notes",
        "// ok.c", "int ok;", "",
    ]
    manifest = json.loads((tmp_path / "corpus.txt.manifest.json").read_text())
    assert [f["path"] for f in manifest["files"]] == [injected, closer, "ok.c"]
