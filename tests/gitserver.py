"""A real git server for tests: `git daemon` on 127.0.0.1 serving repositories the tests build.

A pytest plugin (listed in tests/conftest.py's `pytest_plugins`). Use it like this:

    def test_something(git_server):
        repo = git_server.publish("acme/widgets", source_files())
        # repo.url == git_server.base_url + "acme/widgets"; repo.commit is its HEAD
        ... CHARFORGE_GIT_BASE_URL=git_server.base_url, spec "acme/widgets" ...

- `git_server` (session scope): one daemon for the whole session; `base_url` is
  `git://127.0.0.1:<port>/`. Names are unique per session: use a name per test (or `unique()`).
- `publish(name, files, *, branch="main", tags=(), branches=())` builds a repo (commits with fixed dates, then
  `git gc`, so its `.git` holds packs), publishes a bare copy under `name`, returns a
  `PublishedRepo` (url, commit, work_tree). `commit(name, files)` adds a commit on top;
  `remove(name)` makes the repo vanish from the server; `publish_empty(name)` serves a repo
  without commits.
- `files` maps repo-relative paths to `bytes`/`str` contents, or to `Symlink(target)`.
- `source_files()`: a normal small source repo (.py, .c, .h, .lua; a few KB).
- `hostile_files()`: everything issue 3 asks a corpus builder to survive, and `HOSTILE_KEPT` /
  `HOSTILE_SKIPPED`: what a default build must keep, and the reason for every skipped path.
- `make_repo(path, files)`: the same repo building without the daemon (local work trees).
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest


class Symlink(NamedTuple):
    """A symbolic link to `target`, committed as a link (git mode 120000)."""

    target: str


Files = Mapping[str, "bytes | str | Symlink"]

_GIT_ENV = {
    "GIT_AUTHOR_NAME": "Fixture", "GIT_AUTHOR_EMAIL": "fixture@example.com",
    "GIT_COMMITTER_NAME": "Fixture", "GIT_COMMITTER_EMAIL": "fixture@example.com",
    "GIT_AUTHOR_DATE": "2016-01-12T23:25:05Z", "GIT_COMMITTER_DATE": "2016-01-12T23:25:05Z",
    "GIT_CONFIG_NOSYSTEM": "1", "LC_ALL": "C",
}


def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **_GIT_ENV, "HOME": str(cwd)}  # no user config leaks into fixtures
    proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def write_files(root: Path, files: Files) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()
        if isinstance(content, Symlink):
            os.symlink(content.target, path)
        else:
            path.write_bytes(content.encode() if isinstance(content, str) else content)


def make_repo(path: Path, files: Files, *, branch: str = "main", message: str = "initial commit",
              tags: Sequence[str] = (), branches: Sequence[str] = ()) -> str:
    """A git work tree at `path` with one commit of `files` (packed by `git gc`); its commit id.

    `tags` and extra `branches` all point at that commit.
    """
    path.mkdir(parents=True, exist_ok=True)
    _git(path, "init", "--quiet", "--initial-branch", branch)
    write_files(path, files)
    _git(path, "add", "--all")
    _git(path, "commit", "--quiet", "--message", message)
    for tag in tags:
        _git(path, "tag", tag)
    for extra in branches:
        _git(path, "branch", extra)
    _git(path, "gc", "--quiet")
    return _git(path, "rev-parse", "HEAD")


@dataclass(frozen=True)
class PublishedRepo:
    name: str  # owner/name, the spec a test submits
    url: str  # git://127.0.0.1:<port>/owner/name
    commit: str
    work_tree: Path  # a git work tree of the same history (usable as a local spec)
    branch: str = "main"


class GitServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.repos = root / "served"  # --base-path
        self.work = root / "work"
        self.repos.mkdir(parents=True)
        self.work.mkdir()
        self.port = _free_port()
        self.base_url = f"git://127.0.0.1:{self.port}/"
        self._proc: subprocess.Popen[bytes] | None = None
        self._counter = itertools.count(1)

    def start(self) -> None:
        log = open(self.root / "daemon.log", "wb")  # noqa: SIM115 - the daemon writes it until stop()
        self._proc = subprocess.Popen(
            ["git", "daemon", f"--base-path={self.repos}", "--export-all", "--reuseaddr",
             "--listen=127.0.0.1", f"--port={self.port}", "--informative-errors", str(self.repos)],
            stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"git daemon exited: {(self.root / 'daemon.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("git daemon did not start listening within 15 s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def unique(self, prefix: str = "acme/repo") -> str:
        """A fresh owner/name for this session."""
        return f"{prefix}-{next(self._counter)}"

    def url(self, name: str) -> str:
        return self.base_url + name

    def _bare(self, name: str) -> Path:
        return self.repos / f"{name}.git"

    def publish(self, name: str, files: Files, *, branch: str = "main", tags: Sequence[str] = (),
                branches: Sequence[str] = (), message: str = "initial commit") -> PublishedRepo:
        work = self.work / name
        if work.exists() or self._bare(name).exists():
            raise ValueError(f"repo {name!r} is already published in this session")
        commit = make_repo(work, files, branch=branch, message=message, tags=tags, branches=branches)
        self._bare(name).parent.mkdir(parents=True, exist_ok=True)
        _git(self.root, "clone", "--quiet", "--bare", str(work), str(self._bare(name)))
        return PublishedRepo(name, self.url(name), commit, work, branch)

    def publish_empty(self, name: str) -> str:
        self._bare(name).parent.mkdir(parents=True, exist_ok=True)
        _git(self.root, "init", "--quiet", "--bare", str(self._bare(name)))
        return self.url(name)

    def commit(self, name: str, files: Files, *, message: str = "another commit") -> str:
        """Add a commit changing `files` on the published branch; returns its id."""
        work = self.work / name
        write_files(work, files)
        _git(work, "add", "--all")
        _git(work, "commit", "--quiet", "--message", message)
        branch = _git(work, "symbolic-ref", "--short", "HEAD")
        _git(work, "push", "--quiet", str(self._bare(name)), f"{branch}:{branch}")
        return _git(work, "rev-parse", "HEAD")

    def remove(self, name: str) -> None:
        """Delete the served copy: any later fetch of `name` fails."""
        shutil.rmtree(self._bare(name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    server = GitServer(tmp_path_factory.mktemp("git-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- fixture contents -----------------------------------------------------------------------

def source_files() -> dict[str, bytes]:
    """A small, normal source repository: Python, C and Lua, a few KB."""
    py = b"".join(
        f"def f{i}(x):\n    \"\"\"Return x scaled by {i}.\"\"\"\n    return x * {i}\n\n\n".encode()
        for i in range(20)
    )
    c = b"#include \"util.h\"\n\n" + b"".join(
        f"int add{i}(int a, int b)\n{{\n\treturn a + b + {i};\n}}\n\n".encode() for i in range(25)
    )
    h = b"#ifndef UTIL_H\n#define UTIL_H\n" + b"".join(
        f"int add{i}(int a, int b);\n".encode() for i in range(25)
    ) + b"#endif\n"
    lua = b"local M = {}\n\n" + b"".join(
        f"function M.step{i}(self, x)\n  return self.w * x + {i}\nend\n\n".encode() for i in range(20)
    ) + b"return M\n"
    return {
        "README.md": b"# widgets\n\nA small project used by charforge's tests.\n",
        "src/main.py": py,
        "src/util.c": c,
        "src/util.h": h,
        "lib/init.lua": lua,
    }


def tiny_png() -> bytes:
    """A valid 1x1 PNG (NUL bytes in its chunk lengths: binary by content)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0\xff\0\0")) \
        + chunk(b"IEND", b"")


def hostile_files() -> dict[str, bytes | Symlink]:
    """Normal sources plus everything that must stay out of a corpus (issue 3's list)."""
    files: dict[str, bytes | Symlink] = dict(source_files())
    big_line = b"x = 1  # five MiB of perfectly good text, but too much of it\n"
    files.update({
        ".gitattributes": b"gen/*.c linguist-generated\n",
        "gen/parser.c": b"/* generated by a parser generator */\nint yyparse(void) { return 0; }\n",
        "assets/logo.png": tiny_png(),
        "data/blob.bin": bytes(range(256)) * 16,
        "data/big.txt": big_line * (5 * 1024 * 1024 // len(big_line) + 1),
        "node_modules/leftpad/index.js": b"module.exports = function leftpad(s) { return s; };\n",
        "web/app.js": b"var a=1;" * 1000 + b"\n",  # one 8000-byte line: minified by content
        "web/app.min.js": b"var b=2;\n",  # minified by name
        "src/util_copy.c": source_files()["src/util.c"],  # an exact duplicate
        "src/latin1.c": b"/* caf\xe9 cr\xe8me */\nint x;\n",  # invalid UTF-8
        "passwd": Symlink("/etc/passwd"),
        "zero": Symlink("/dev/zero"),
        "etc_link": Symlink("/etc"),
    })
    return files


# What a default build keeps from `hostile_files()`, in corpus order.
HOSTILE_KEPT = (".gitattributes", "README.md", "lib/init.lua", "src/main.py", "src/util.c",
                "src/util.h")
# The reason the manifest must give each skipped path of a checkout (directories end in "/").
HOSTILE_SKIPPED = {
    ".git/": "vcs",
    "assets/logo.png": "binary",
    "data/big.txt": "too-large",
    "data/blob.bin": "binary",
    "etc_link": "symlink",
    "gen/parser.c": "generated",
    "node_modules/": "vendored",
    "passwd": "symlink",
    "src/latin1.c": "invalid-utf8",
    "src/util_copy.c": "duplicate",
    "web/app.js": "minified",
    "web/app.min.js": "minified",
    "zero": "symlink",
}
