"""What goes into a corpus. Owned by the corpus builder (workers/corpus); see docs/corpus.md."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.base import Frozen

MiB = 1024 * 1024


class CorpusConfig(Frozen):
    # Globs matched against repo-relative paths (fnmatch with `**` support); empty = everything.
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    # Languages by `identify` tag (e.g. "c", "lua", "python"); empty = every text file.
    langs: tuple[str, ...] = ()
    # A file larger than this is skipped ("too large"), not truncated.
    max_file_bytes: int = Field(default=1 * MiB, gt=0)
    # The build stops with a clear error past this many bytes of corpus text.
    max_total_bytes: int = Field(default=4096 * MiB, gt=0)
    # A file with any line longer than this is treated as minified/generated and skipped.
    max_line_length: int = Field(default=1000, gt=0)
    # A short comment-like header naming each file's path, so samples begin files the way code does.
    file_header: bool = True
    # Invalid UTF-8: skip the whole file ("skip") or replace bad bytes with U+FFFD ("replace").
    invalid_utf8: Literal["skip", "replace"] = "skip"
    # Drop exact duplicate files (by content hash); the manifest reports them.
    dedupe: bool = True
    # Skip vendored/generated paths (node_modules/, vendor/, third_party/, lock files,
    # .gitattributes linguist-vendored / linguist-generated).
    skip_vendored: bool = True
