"""Where files come from: a sorted walk of one tree that never follows a link, and what git
says about its paths (linguist attributes, ignores, link and submodule entries).

The walk yields paths in the order of a plain sort of their full relative paths, without
holding the whole tree: a directory's entries are sorted by name, directories keyed as
`name/`, which is exactly where their contents fall in a full-path sort.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import CorpusError
from workers.corpus import paths as P
from workers.fetch import run_git_process

GIT_TIMEOUT = 300.0  # seconds per local git call (2048 paths at most)


@dataclass(slots=True)
class Found:
    """A regular file the walk found (lstat: not a link, not a device)."""

    rel: str
    size: int
    attr_scope: bool  # a .gitattributes above it may say something
    ignore_scope: bool  # a .gitignore above it may say something (plain folders)


@dataclass(slots=True)
class Skipped:
    rel: str  # directories end with "/"
    reason: str
    size: int = 0
    detail: str | None = None


@dataclass(slots=True)
class _Descend:
    path: str
    rel: str
    attr: bool
    ignore: bool


class GitView:
    """Answers questions about one tree's paths by asking git itself.

    For a checkout, git finds the repository from `root`. For a plain folder, an empty bare
    repository of our own (`plain_git_dir`, made on first use) stands in, with `root` as its work
    tree: git then reads the folder's .gitattributes/.gitignore files and nothing else of it.
    """

    def __init__(self, root: Path, *, plain_git_dir: Path | None = None) -> None:
        self.root = root
        self.plain_git_dir = plain_git_dir
        self._ready = plain_git_dir is None

    def _git(self, args: Sequence[str], data: bytes | None = None) -> bytes:
        prefix = ["git", "-c", "core.attributesFile=/dev/null", "-c", "core.excludesFile=/dev/null",
                  "-c", "core.fsmonitor=false"]
        if self.plain_git_dir is not None:
            if not self._ready:
                self._run(["git", "init", "--quiet", "--bare", "--template=", str(self.plain_git_dir)], "init")
                self._ready = True
            prefix += [f"--git-dir={self.plain_git_dir}", f"--work-tree={self.root}"]
        return self._run([*prefix, *args], args[0], data)

    def _run(self, argv: list[str], what: str, data: bytes | None = None) -> bytes:
        try:
            proc = run_git_process(argv, timeout=GIT_TIMEOUT, cwd=self.root, data=data)
        except subprocess.TimeoutExpired:
            # Local git on a tree of ours: slow storage, or a FIFO named .gitattributes/.gitignore
            # in a plain folder (git blocks reading it). Retrying the same tree cannot help.
            raise CorpusError(f"git {what} timed out after {GIT_TIMEOUT:.0f}s in {self.root}") from None
        if proc.returncode not in (0, 1):  # check-ignore exits 1 when nothing is ignored
            msg = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            raise CorpusError(f"git {what} failed in {self.root}: {(msg or ['?'])[-1]}")
        return proc.stdout

    def attributes(self, rels: Sequence[str]) -> dict[str, P.Attributes]:
        """Linguist attributes of the paths that have any."""
        if not rels:
            return {}
        out = self._git(["check-attr", "--stdin", "-z", "linguist-vendored", "linguist-generated"],
                        _nul_join(rels))
        fields = out.split(b"\0")
        values: dict[str, dict[str, str]] = {}
        for i in range(0, len(fields) - 2, 3):
            path, attr, value = (f.decode("utf-8") for f in fields[i:i + 3])
            if value != "unspecified":
                values.setdefault(path, {})[attr] = value
        return {path: P.attributes_from(v) for path, v in values.items()}

    def ignored(self, rels: Sequence[str]) -> set[str]:
        """The paths a .gitignore in the tree matches (plain folders only)."""
        if not rels or self.plain_git_dir is None:
            return set()
        out = self._git(["check-ignore", "--stdin", "-z", "--no-index"], _nul_join(rels))
        return {p.decode("utf-8") for p in out.split(b"\0") if p}

    def marks(self) -> dict[str, str]:
        """Tracked entries that are not files: links (mode 120000), submodules (160000)."""
        if self.plain_git_dir is not None:
            return {}
        out = self._git(["ls-files", "--stage", "-z"])
        marks = {}
        for record in out.split(b"\0"):
            mode, _, rest = record.partition(b" ")
            if mode == b"120000":
                marks[rest.split(b"\t", 1)[1].decode("utf-8", "replace")] = P.SYMLINK
            elif mode == b"160000":
                marks[rest.split(b"\t", 1)[1].decode("utf-8", "replace") + "/"] = P.SUBMODULE
        return marks


def _nul_join(rels: Sequence[str]) -> bytes:
    return b"".join(r.encode("utf-8") + b"\0" for r in rels)


def _printable(rel: str) -> str:
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _entries(
    path: str, rel: str, attr: bool, ignore: bool, rules: P.PathRules, marks: Mapping[str, str]
) -> Iterator[Found | Skipped | _Descend]:
    try:
        with os.scandir(path) as it:
            entries = list(it)
    except OSError as exc:
        yield Skipped(rel or "./", P.UNREADABLE, detail=exc.strerror)
        return
    names = {e.name for e in entries}
    attr = attr or ".gitattributes" in names
    ignore = ignore or ".gitignore" in names
    keyed = [(e.name + "/" if e.is_dir(follow_symlinks=False) else e.name, e) for e in entries]
    keyed.sort(key=lambda pair: pair[0])
    for key, entry in keyed:
        child = rel + key
        if not key.isascii():  # names are str with surrogates where bytes were not UTF-8
            try:
                child.encode("utf-8")
            except UnicodeEncodeError:
                yield Skipped(_printable(child), P.BAD_NAME)
                continue
        if key.endswith("/"):
            reason = rules.prune_dir(entry.name) or marks.get(child)
            yield Skipped(child, reason) if reason else _Descend(entry.path, child, attr, ignore)
        elif entry.is_symlink():
            yield Skipped(child, P.SYMLINK, detail=_readlink(entry.path))
        elif entry.is_file(follow_symlinks=False):
            if marks.get(child) == P.OUTPUT:
                continue  # our own corpus/manifest being written: not part of the source
            if child in marks:
                yield Skipped(child, marks[child])
            else:
                yield Found(child, entry.stat(follow_symlinks=False).st_size, attr, ignore)
        else:
            yield Skipped(child, P.SPECIAL)


def _readlink(path: str) -> str | None:
    try:
        return "-> " + _printable(os.readlink(path))
    except OSError:
        return None


def walk(
    root: Path,
    rules: P.PathRules,
    *,
    marks: Mapping[str, str] | None = None,
    attrs_above: bool = False,
) -> Iterator[Found | Skipped]:
    """Every entry under `root` in sorted full-path order; links and special files as `Skipped`.

    An explicit stack instead of recursion: a hostile tree may nest deeper than Python's limit.
    """
    marks = marks or {}
    stack = [_entries(str(root), "", attrs_above, False, rules, marks)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
        elif isinstance(item, _Descend):
            stack.append(_entries(item.path, item.rel, item.attr, item.ignore, rules, marks))
        else:
            yield item
