"""Decisions made from a path alone, before a byte is read: globs, languages, vendored files.

Languages come from `identify` (the tag library pre-commit uses), not from a table of our own;
a file's language is its most specific tag (`a.h` -> c, `x.lua` -> lua).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

from identify import extensions, identify

if TYPE_CHECKING:  # workers pass a plain `content.Rules` with the same fields
    from schemas.corpus import CorpusConfig
    from workers.corpus.content import Rules

# Why a file did not go into the corpus. The manifest names one per skipped file or directory.
VCS = "vcs"  # .git/ (and .hg/, .svn/, .bzr/): repository metadata, packfiles
SYMLINK = "symlink"  # a link (on disk, or a git mode-120000 entry checked out as text)
SUBMODULE = "submodule"  # a gitlink: submodule contents are never fetched
SPECIAL = "special-file"  # FIFO, socket, device
UNREADABLE = "unreadable"  # vanished or permission denied while building
BAD_NAME = "invalid-name"  # a file name that is not UTF-8
GITIGNORED = "gitignored"  # plain folders: matched by a .gitignore
EXCLUDED = "excluded"  # --exclude matched, or --include did not
LANGUAGE = "language"  # not one of --lang
VENDORED = "vendored"  # node_modules/, vendor/, ..., or linguist-vendored
GENERATED = "generated"  # linguist-generated, or a tool's cache directory (__pycache__/, ...)
LOCKFILE = "lockfile"  # package-lock.json, Cargo.lock, ...
MINIFIED = "minified"  # *.min.js, or a line longer than max_line_length
TOO_LARGE = "too-large"  # over max_file_bytes
EMPTY = "empty"
BINARY = "binary"  # a NUL byte
INVALID_UTF8 = "invalid-utf8"  # with invalid_utf8="skip"
DUPLICATE = "duplicate"  # same bytes as a file already kept
OUTPUT = "output"  # our own corpus/manifest inside a plain folder: left out, not even listed

VCS_DIRS = frozenset({".git", ".hg", ".svn", ".bzr"})
VENDORED_DIRS = frozenset({
    "node_modules", "bower_components", "jspm_packages", "vendor", "third_party", "third-party",
    "thirdparty", "3rdparty",
})
# Caches tools write beside the sources: never code anyone wrote (__pycache__ holds .pyc bytecode).
GENERATED_DIRS = frozenset({"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"})
LOCK_FILES = frozenset({
    "package-lock.json", "npm-shrinkwrap.json", "yarn.lock", "pnpm-lock.yaml", "bun.lockb",
    "Cargo.lock", "Gemfile.lock", "composer.lock", "poetry.lock", "Pipfile.lock", "pdm.lock",
    "uv.lock", "go.sum", "flake.lock", "mix.lock", "pubspec.lock", "packages.lock.json",
    "Podfile.lock", "gradle.lockfile",
})
MINIFIED_SUFFIXES = (".min.js", ".min.mjs", ".min.css", "-min.js", ".js.map", ".css.map")

# identify tags that describe a file's kind rather than its language.
_GENERIC_TAGS = frozenset({
    "text", "binary", "executable", "non-executable", "file", "symlink", "directory", "socket",
    "header", "plain-text", "image", "audio", "video", "font", "archive",
})


class NameInfo(NamedTuple):
    """What identify says about a file name."""

    tags: frozenset[str]
    language: str | None  # the most specific tag (language_of)
    text: bool  # identify knows the name as a text format: read the file whole, no probe first


@lru_cache(maxsize=4096)
def _info_from_identify(name: str) -> NameInfo:
    tags = frozenset(identify.tags_from_filename(name))
    return NameInfo(tags, language_of(tags), "text" in tags)


_NAME_PARTS = frozenset(extensions.NAMES)
_BY_EXTENSION: dict[str | None, NameInfo] = {}
_EXTENSIONS_HELD = 4096  # a tree of made-up extensions must not grow the cache without end


def name_info(name: str) -> NameInfo:
    """identify's verdict on a file name, as `identify.tags_from_filename` gives it.

    Asked once per extension, not once per name: a build meets tens of thousands of distinct
    names but a few hundred extensions. identify reads a name as a whole (`Makefile`,
    `Dockerfile.dev`: any dot-separated part in its NAMES table) and otherwise by its extension
    alone, as `os.path.splitext` splits it (leading dots are not one: `.bashrc` has none); only
    names of the first kind are looked up by name.
    """
    parts = name.split(".")
    if name in _NAME_PARTS or not _NAME_PARTS.isdisjoint(parts):
        return _info_from_identify(name)
    ext = parts[-1] if len(parts) > 1 and (parts[0] or any(parts[1:-1])) else None
    info = _BY_EXTENSION.get(ext)
    if info is None:  # the first name with this extension: its tags are the extension's
        if len(_BY_EXTENSION) >= _EXTENSIONS_HELD:
            _BY_EXTENSION.clear()
        info = _BY_EXTENSION[ext] = _info_from_identify(name)
    return info


def filename_tags(name: str) -> frozenset[str]:
    return name_info(name).tags


def language_of_name(name: str) -> str | None:
    return name_info(name).language


def language_of(tags: frozenset[str]) -> str | None:
    """The most specific tag, deterministically: sorted first of the non-generic ones."""
    specific = sorted(tags - _GENERIC_TAGS)
    return specific[0] if specific else None


def interpreter_tags(first_line: bytes) -> frozenset[str]:
    """Tags from a `#!` line, for scripts without an extension."""
    if not first_line.startswith(b"#!"):
        return frozenset()
    words = first_line[2:].decode("utf-8", "replace").split()
    if words and words[0].endswith("/env") and len(words) > 1:
        words = words[1:]
    return frozenset(identify.tags_from_interpreter(words[0])) if words else frozenset()


def _glob_regex(pattern: str) -> str:
    """gitignore-like globs: `*` and `?` stay inside a path segment, `**` crosses them."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def compile_glob(pattern: str) -> Callable[[str], bool]:
    """A matcher for repo-relative paths.

    `*.py` (no slash) matches a file or directory name at any depth; `src/*.c` or `/src` is
    anchored at the root; a match on a directory covers everything below it; a trailing `/`
    matches directories only.
    """
    dir_only = pattern.endswith("/")
    body = pattern.strip("/")
    regex = _glob_regex(body)
    head = "^" if "/" in body or pattern.startswith("/") else "^(?:.*/)?"
    tail = "/.*$" if dir_only else "(?:/.*)?$"
    return re.compile(head + regex + tail, re.DOTALL).match  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Attributes:
    """The linguist attributes `.gitattributes` gives one path: True set, False unset, None neither."""

    vendored: bool | None = None
    generated: bool | None = None


class PathRules:
    """The corpus config's path-level rules: one `classify` call per candidate file."""

    def __init__(self, config: CorpusConfig | Rules) -> None:
        self.config = config
        self._include = [compile_glob(g) for g in config.include]
        self._exclude = [(g, compile_glob(g)) for g in config.exclude]
        self.langs = frozenset(config.langs)

    def prune_dir(self, name: str) -> str | None:
        """The reason to skip a whole directory without walking it, or None."""
        if name in VCS_DIRS:
            return VCS
        if self.config.skip_vendored and name in VENDORED_DIRS:
            return VENDORED
        if self.config.skip_vendored and name in GENERATED_DIRS:
            return GENERATED
        return None

    def classify(
        self, rel: str, size: int | None, attrs: Attributes | None, ignored: bool, vendored_dir: bool = False
    ) -> tuple[str | None, str | None]:
        """(reason, detail) to skip `rel`, or (None, None) to read it.

        `size`: as lstat saw it, or None when the walk did not stat the file (the reader
        applies the size rules to what `fstat` says once it is open, in the same order).

        `vendored_dir`: `rel` is below a vendored directory (`vendor/`, ...) that the walk
        entered because a .gitattributes may un-vendor some of it: only an explicit
        `linguist-vendored=false` (or `-linguist-vendored`) on the file keeps it.
        """
        for glob, match in self._exclude:
            if match(rel):
                return EXCLUDED, f"--exclude {glob}"
        if self._include and not any(match(rel) for match in self._include):
            return EXCLUDED, "not matched by --include"
        if ignored:
            return GITIGNORED, None
        name = rel[rel.rfind("/") + 1:]
        if self.config.skip_vendored:
            if vendored_dir and (attrs is None or attrs.vendored is not False):
                return VENDORED, "vendored directory"
            reason = self._vendored(name, attrs)
            if reason:
                return reason, f"linguist-{reason}" if reason in (VENDORED, GENERATED) else None
        if self.langs:
            tags = filename_tags(name)
            if language_of(tags) is not None and not tags & self.langs:
                return LANGUAGE, None
        if size is None:
            return None, None
        if size > self.config.max_file_bytes:
            return TOO_LARGE, None
        if size == 0:
            return EMPTY, None
        return None, None

    @staticmethod
    def _vendored(name: str, attrs: Attributes | None) -> str | None:
        if attrs is not None and attrs.vendored:
            return VENDORED
        if attrs is not None and attrs.generated:
            return GENERATED
        if name in LOCK_FILES:
            return LOCKFILE
        if name.endswith(MINIFIED_SUFFIXES):
            return MINIFIED
        return None


def attributes_from(values: Mapping[str, str]) -> Attributes:
    """Map `git check-attr` values (set/unset/unspecified/true/false/...) to `Attributes`."""

    def flag(value: str | None) -> bool | None:
        if value is None or value == "unspecified":
            return None
        return value not in ("unset", "false", "0", "no")

    return Attributes(
        vendored=flag(values.get("linguist-vendored")),
        generated=flag(values.get("linguist-generated")),
    )
