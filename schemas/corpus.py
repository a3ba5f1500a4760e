"""What goes into a corpus. Owned by the corpus builder (workers/corpus); see docs/corpus.md.

Every field is part of the corpus cache key: two runs with the same commits and the same
config share one stored corpus.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from schemas.base import Frozen
from schemas.errors import InvalidSpec
from schemas.units import parse_size

MiB = 1024 * 1024


class CorpusConfig(Frozen):
    # Globs matched against repo-relative paths (gitignore-like, `**` crosses directories; a
    # pattern without "/" matches a name at any depth); empty = everything.
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    # Languages by `identify` tag (e.g. "c", "lua", "python"); empty = every text file.
    langs: tuple[str, ...] = ()
    # A file larger than this is skipped ("too-large"), not truncated.
    max_file_bytes: int = Field(default=1 * MiB, gt=0)
    # The build stops with a clear error past this many bytes of corpus text.
    max_total_bytes: int = Field(default=4096 * MiB, gt=0)
    # A file with any line longer than this many bytes is treated as minified and skipped.
    max_line_length: int = Field(default=1000, gt=0)
    # A short comment-like header naming each file's path, so samples begin files the way code does.
    file_header: bool = True
    # Invalid UTF-8: skip the whole file ("skip") or replace bad bytes with U+FFFD ("replace").
    invalid_utf8: Literal["skip", "replace"] = "skip"
    # CRLF line endings become LF: one way to end a line is one thing less to learn.
    normalize_newlines: bool = True
    # Drop exact duplicate files (by content hash); the manifest reports them.
    dedupe: bool = True
    # Skip vendored/generated paths (node_modules/, vendor/, third_party/, lock files, *.min.js,
    # .gitattributes linguist-vendored / linguist-generated). An explicit linguist-vendored=false
    # (or -linguist-vendored) in .gitattributes keeps a file even below vendor/ and the like.
    skip_vendored: bool = True

    @field_validator("max_file_bytes", "max_total_bytes", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        """`--set corpus.max_file_bytes=1M` reads as the CLI's `--max-file-size 1M` does."""
        if isinstance(value, str) and not value.strip().isdigit():
            try:
                return parse_size(value)
            except InvalidSpec as exc:
                raise ValueError(exc.message) from None
        return value

    @field_validator("include", "exclude")
    @classmethod
    def _globs(cls, globs: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = tuple(g.strip() for g in globs)
        if any(not g or g == "/" for g in cleaned):
            raise ValueError("empty glob")
        return cleaned

    @field_validator("langs")
    @classmethod
    def _langs(cls, langs: tuple[str, ...]) -> tuple[str, ...]:
        from identify.identify import ALL_TAGS  # the tag set --lang values come from

        cleaned = tuple(sorted({lang.strip().lower() for lang in langs if lang.strip()}))
        unknown = [lang for lang in cleaned if lang not in ALL_TAGS]
        if unknown:
            raise ValueError(
                f"unknown language {', '.join(unknown)} (use identify tags such as c, lua, python)"
            )
        return cleaned
