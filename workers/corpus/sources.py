"""Where files come from: a sorted walk of one tree that never follows a link, and what git
says about its paths (linguist attributes, ignores, link and submodule entries).

The walk yields paths in the order of a plain sort of their full relative paths, without
holding the whole tree: a directory's entries are sorted by name, directories keyed as
`name/`, which is exactly where their contents fall in a full-path sort.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from schemas.errors import CorpusError
from workers.corpus import paths as P
from workers.corpus.content import Item
from workers.fetch import run_git_process

GIT_TIMEOUT = 300.0  # seconds per local git call (2048 paths at most)


@dataclass(frozen=True, slots=True)
class _Scope:
    """What holds for every path below a directory."""

    attr: bool = False  # a .gitattributes at or above it
    ignore: bool = False  # a .gitignore at or above it
    # A .gitattributes at or above it turns linguist-vendored off for something: vendored
    # directories are then walked (each file asks git) instead of skipped whole.
    unvendor: bool = False
    vendored: bool = False  # inside a vendored directory


@dataclass(slots=True)
class _Descend:
    path: str
    rel: str
    scope: _Scope


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
            # Local git on a tree of ours: slow storage, say (a FIFO named .gitattributes or
            # .gitignore, which git would block on, is refused by the walk before git runs).
            # Retrying the same tree cannot help.
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


# `-linguist-vendored` or `linguist-vendored=false` (what git reports as unset / false).
_UNVENDOR = re.compile(rb"(?:^|\s)(?:-linguist-vendored|linguist-vendored=(?:false|0|no))(?:\s|$)", re.MULTILINE)
ATTRS_READ_LIMIT = 1 << 20  # git itself ignores attribute files past 100 MB


def _unvendors(path: str) -> bool:
    """Whether the .gitattributes at `path` turns linguist-vendored off for some pattern.

    Read like corpus files (no links followed, never blocking on a FIFO, at most 1 MiB): it only
    decides whether vendored directories below are walked; git decides for each file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        data = os.read(fd, ATTRS_READ_LIMIT)
    except OSError:
        return False
    finally:
        os.close(fd)
    return _UNVENDOR.search(data) is not None


def _scope_of(path: str, names: set[str], scope: _Scope, rules: P.PathRules) -> _Scope:
    attrs_here = ".gitattributes" in names
    return _Scope(
        attr=scope.attr or attrs_here,
        ignore=scope.ignore or ".gitignore" in names,
        unvendor=scope.unvendor or (attrs_here and rules.config.skip_vendored
                                    and _unvendors(os.path.join(path, ".gitattributes"))),
        vendored=scope.vendored,
    )


def _entries(
    path: str, rel: str, scope: _Scope, rules: P.PathRules, marks: Mapping[str, str]
) -> Iterator[Item | _Descend]:
    try:
        with os.scandir(path) as it:
            entries = list(it)
    except OSError as exc:
        yield _skipped(rel or "./", P.UNREADABLE, exc.strerror)
        return
    for entry in entries:
        if entry.name in _GIT_READS:
            _refuse_special(entry, rel)
    scope = _scope_of(path, {e.name for e in entries}, scope, rules)
    # Sorted as full paths sort: a directory as "name/". DirEntry answers from the directory
    # listing's file type (lstat where the file system gives none): no stat call per entry.
    keyed = {e.name + "/" if e.is_dir(follow_symlinks=False) else e.name: e for e in entries}
    for key in sorted(keyed):
        entry, child = keyed[key], rel + key
        if not key.isascii():  # names are str with surrogates where bytes were not UTF-8
            try:
                child.encode("utf-8")
            except UnicodeEncodeError:
                yield _skipped(_printable(child), P.BAD_NAME)
                continue
        if key[-1] == "/":
            reason = rules.prune_dir(entry.name) or (marks.get(child) if marks else None)
            if reason == P.VENDORED and scope.unvendor:
                yield _Descend(entry.path, child, replace(scope, vendored=True))
            else:
                yield _skipped(child, reason) if reason else _Descend(entry.path, child, scope)
        elif entry.is_symlink():
            yield _skipped(child, P.SYMLINK, _readlink(entry.path))
        elif entry.is_file(follow_symlinks=False):
            if marks and child in marks:
                if marks[child] != P.OUTPUT:  # our own corpus/manifest being written: left out
                    yield _skipped(child, marks[child])
                continue
            # No stat here: the fstat of the open file gives its size.
            # tuple.__new__ with every field: Item(...) would run a Python-level __new__ per file
            yield _new(Item, (child, None, None, False, None, None, scope.vendored, scope.attr, scope.ignore))
        else:
            yield _skipped(child, P.SPECIAL)


_GIT_READS = frozenset({".gitattributes", ".gitignore"})  # files git itself opens in the tree
_new = tuple.__new__
_SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                  (stat.S_ISBLK, "a device"))


def _refuse_special(entry: os.DirEntry[str], rel: str) -> None:
    """A .gitattributes/.gitignore that is a FIFO, socket or device: git opens these files itself
    (without O_NONBLOCK), so asking it about any path below would block on a FIFO. Refused at
    once rather than after GIT_TIMEOUT. (A link is fine: git will not follow it.)"""
    try:
        mode = entry.stat(follow_symlinks=False).st_mode
    except OSError:
        return
    for test, kind in _SPECIAL_KINDS:
        if test(mode):
            raise CorpusError(
                f"{_printable(rel + entry.name)} is {kind}, not a regular file: git would block reading "
                "it; remove it from the folder (or build from a git clone)"
            )


def _skipped(rel: str, reason: str, detail: str | None = None) -> Item:
    return Item(rel, 0, skip=reason, detail=detail)


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
) -> Iterator[Item]:
    """Every entry under `root` in sorted full-path order: regular files to read, and links,
    special files and skipped directories with their `skip` reason.

    Regular files are not stat-ed (`Item.size` is None): the fstat of the open file tells.
    An explicit stack instead of recursion: a hostile tree may nest deeper than Python's limit.
    """
    marks = marks or {}
    stack = [_entries(str(root), "", _Scope(attr=attrs_above), rules, marks)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
        elif isinstance(item, _Descend):
            stack.append(_entries(item.path, item.rel, item.scope, rules, marks))
        else:
            yield item
