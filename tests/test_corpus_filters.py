"""What goes in: globs, languages, vendored and generated files, encodings, layout. Built from
plain folders (no git server needed) through the same builder the pipeline uses."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from schemas.corpus import CorpusConfig
from tests.gitserver import make_repo, write_files
from workers.corpus import build_corpus_file
from workers.corpus.paths import compile_glob


def build(tmp_path, files, **config):
    folder = tmp_path / "src"
    write_files(folder, files)
    out = tmp_path / "out" / "corpus.txt"
    build_corpus_file([str(folder)], CorpusConfig(**config), out, git_base_url="git://unused/")
    manifest = json.loads((tmp_path / "out" / "corpus.txt.manifest.json").read_text())
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    return out.read_bytes().decode("utf-8"), skipped, manifest  # bytes: keep any \r


@pytest.mark.parametrize(("pattern", "path", "hit"), [
    ("*.py", "a.py", True), ("*.py", "deep/dir/a.py", True), ("*.py", "a.pyc", False),
    ("tests", "tests/x.c", True), ("tests", "src/tests/x.c", True), ("tests", "contests/x.c", False),
    ("src/*.c", "src/a.c", True), ("src/*.c", "src/sub/a.c", False), ("src/*.c", "lib/src/a.c", False),
    ("src/**/*.c", "src/a.c", True), ("src/**/*.c", "src/x/y/a.c", True), ("/docs", "docs/a.md", True),
    ("build/", "build/a.c", True), ("build/", "build", False), ("a?.c", "ab.c", True),
    ("[!x]*.c", "y.c", True), ("[!x]*.c", "x.c", False), ("**/gen/*", "a/b/gen/c.c", True),
])
def test_globs_match_like_gitignore(pattern, path, hit):
    assert bool(compile_glob(pattern)(path)) is hit


def test_include_exclude_and_lang(tmp_path):
    files = {"src/a.py": "a = 1\n", "src/b.c": "int b;\n", "tests/t.py": "t = 1\n", "x.lua": "y = 1\n"}
    text, skipped, _ = build(tmp_path, files, include=("src/**", "*.lua"), exclude=("*.c",))
    assert text == "# src/a.py\na = 1\n-- x.lua\ny = 1\n"
    assert skipped == {"src/b.c": "excluded", "tests/t.py": "excluded"}
    text, skipped, _ = build(tmp_path / "2", files, langs=("lua", "c"))
    assert text == "// src/b.c\nint b;\n-- x.lua\ny = 1\n"
    assert skipped == {"src/a.py": "language", "tests/t.py": "language"}


def test_lang_recognises_scripts_by_their_shebang(tmp_path):
    files = {"bin/tool": "#!/usr/bin/env python3\nprint(1)\n", "bin/run": "#!/bin/sh\necho hi\n",
             "notes": "just words\n"}
    text, skipped, manifest = build(tmp_path, files, langs=("python",))
    assert text == "# bin/tool\n#!/usr/bin/env python3\nprint(1)\n"
    assert skipped == {"bin/run": "language", "notes": "language"}
    assert manifest["files"][0]["language"] == "python"


def test_unknown_language_is_refused_with_the_name():
    with pytest.raises(ValidationError, match="unknown language pyhton"):
        CorpusConfig(langs=("pyhton",))
    assert CorpusConfig(langs=("Python", "c", "python")).langs == ("c", "python")


def test_vendored_generated_lock_and_minified(tmp_path):
    files = {
        ".gitattributes": "lib/** linguist-vendored\n*.pb.c linguist-generated\n",
        "lib/dep.c": "int dep;\n", "api.pb.c": "int pb;\n", "main.c": "int main;\n",
        "vendor/x.c": "int v;\n", "third_party/y.c": "int y;\n", "Cargo.lock": "[[package]]\n",
        "ui.min.css": "a{}\n", "long.js": "x;" * 600 + "\n",
        "pkg/__pycache__/m.cpython-311.pyc": b"\xa7\r\r\n\0\0\0\0", ".pytest_cache/README.md": "# cache\n",
    }
    text, skipped, _ = build(tmp_path, files)
    assert text == "# .gitattributes\n" + files[".gitattributes"] + "// main.c\nint main;\n"
    assert skipped == {"Cargo.lock": "lockfile", "api.pb.c": "generated", "lib/dep.c": "vendored",
                       "long.js": "minified", "third_party/": "vendored", "ui.min.css": "minified",
                       "vendor/": "vendored", ".pytest_cache/": "generated", "pkg/__pycache__/": "generated"}
    text, skipped, _ = build(tmp_path / "2", files, skip_vendored=False, max_line_length=2000)
    assert "// vendor/x.c\n" in text and "// lib/dep.c\n" in text and "<!-- .pytest_cache/README.md -->" in text
    assert skipped == {"pkg/__pycache__/m.cpython-311.pyc": "binary"}


def test_gitignore_of_a_plain_folder_is_honoured(tmp_path):
    files = {".gitignore": "build/\n*.log\n", "a.py": "a = 1\n", "build/gen.py": "g = 1\n", "x.log": "log\n"}
    text, skipped, _ = build(tmp_path, files)
    assert text == "# .gitignore\nbuild/\n*.log\n# a.py\na = 1\n"
    assert skipped == {"build/gen.py": "gitignored", "x.log": "gitignored"}


def test_encoding_policy_newlines_and_layout(tmp_path):
    files = {
        "a.py": b"\xef\xbb\xbfprint('caf\xc3\xa9')\r\nx = 1",  # BOM, CRLF, no final newline
        "b.py": b"s = 'caf\xe9'\n",  # Latin-1: invalid UTF-8
        "c.py": b"   \n\n",  # whitespace only
        "d.py": b"",
    }
    text, skipped, manifest = build(tmp_path, files)
    assert text == "# a.py\nprint('café')\nx = 1\n"
    assert skipped == {"b.py": "invalid-utf8", "c.py": "empty", "d.py": "empty"}
    assert ["é", 1] in manifest["vocab"]
    text, skipped, _ = build(tmp_path / "2", files, invalid_utf8="replace", file_header=False,
                             normalize_newlines=False)
    assert text == "print('café')\r\nx = 1\ns = 'caf\ufffd'\n"


def test_duplicates_are_dropped_unless_asked(tmp_path):
    files = {"a.c": "int x;\n", "b.c": "int x;\n", "c.c": "int y;\n"}
    text, skipped, _ = build(tmp_path, files)
    assert text == "// a.c\nint x;\n// c.c\nint y;\n" and skipped == {"b.c": "duplicate"}
    text, skipped, _ = build(tmp_path / "2", files, dedupe=False)
    assert text.count("int x;") == 2 and skipped == {}


def test_too_large_files_are_skipped_not_truncated(tmp_path):
    text, skipped, manifest = build(tmp_path, {"big.txt": "x\n" * 600, "ok.txt": "y\n"}, max_file_bytes=1000)
    assert text == "# ok.txt\ny\n" and skipped == {"big.txt": "too-large"}
    assert manifest["skipped"][0]["bytes"] == 1200


def test_linguist_vendored_false_takes_files_back_from_vendored_directories(tmp_path):
    files = {
        ".gitattributes": "vendor/keep/** -linguist-vendored\nthird_party/** linguist-vendored=false\n",
        "main.c": "int main;\n", "vendor/keep/a.c": "int a;\n", "vendor/drop/b.c": "int b;\n",
        "third_party/c.c": "int c;\n", "node_modules/x.js": "var x;\n",
    }
    expected_text = ("# .gitattributes\n" + files[".gitattributes"] + "// main.c\nint main;\n"
                     "// third_party/c.c\nint c;\n// vendor/keep/a.c\nint a;\n")
    expected_skipped = {"node_modules/x.js": "vendored", "vendor/drop/b.c": "vendored"}
    text, skipped, _ = build(tmp_path, files)
    assert (text, skipped) == (expected_text, expected_skipped)
    work = tmp_path / "work"  # the same as a git work tree: read from a clone
    make_repo(work, files)
    out = tmp_path / "work.txt"
    build_corpus_file([str(work)], CorpusConfig(), out, git_base_url="git://unused/")
    assert out.read_text() == expected_text
    # Without such an attribute a vendored directory is skipped whole, not walked.
    text, skipped, _ = build(tmp_path / "2", {**files, ".gitattributes": "*.c text\n"})
    assert skipped == {"node_modules/": "vendored", "third_party/": "vendored", "vendor/": "vendored"}
