"""What a corpus build counts (`BuildStats`: files and bytes kept and skipped, by reason, language
and repo; the vocabulary), and the two ways a build can end without a corpus, said with those
counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from schemas.units import human_size
from workers.corpus.content import BatchResult, Outcome


@dataclass
class BuildStats:
    repos: int
    files: int = 0
    bytes: int = 0  # corpus text, headers included
    source_bytes: int = 0  # the kept files' own sizes
    skipped: int = 0
    skipped_dirs: int = 0  # of `skipped`: directories skipped whole (.git/, node_modules/)
    by_reason: Counter[str] = field(default_factory=Counter)
    files_by_language: Counter[str] = field(default_factory=Counter)
    bytes_by_language: Counter[str] = field(default_factory=Counter)
    ascii: list[int] = field(default_factory=lambda: [0] * 128)  # counts of each character below U+0080
    other: Counter[str] = field(default_factory=Counter)
    repo_files: list[int] = field(default_factory=list)
    repo_bytes: list[int] = field(default_factory=list)
    text_sha256: str = ""

    def __post_init__(self) -> None:
        self.repo_files = [0] * self.repos
        self.repo_bytes = [0] * self.repos

    def skip(self, outcome: Outcome, reason: str) -> None:
        self.skipped += 1
        self.skipped_dirs += outcome.rel.endswith("/")
        self.by_reason[reason] += 1

    def keep(self, tree: int, outcome: Outcome, length: int) -> None:
        language = outcome.language or "other"
        self.files += 1
        self.bytes += length
        self.source_bytes += outcome.size
        self.repo_files[tree] += 1
        self.repo_bytes[tree] += outcome.size
        self.files_by_language[language] += 1
        self.bytes_by_language[language] += outcome.size

    def add_batch(self, tree: int, result: BatchResult) -> None:
        kept = sum(result.files_by_language.values())
        self.files += kept
        self.bytes += result.length
        self.source_bytes += result.source_bytes
        self.repo_files[tree] += kept
        self.repo_bytes[tree] += result.source_bytes
        self.skipped += sum(result.by_reason.values())
        self.skipped_dirs += result.skipped_dirs
        self.by_reason.update(result.by_reason)
        self.files_by_language.update(result.files_by_language)
        self.bytes_by_language.update(result.bytes_by_language)
        if result.beyond_ascii:  # one count of the batch's characters past U+007F (C, on a str)
            self.other.update(b"".join(result.beyond_ascii.values()).decode("utf-8"))

    def vocab(self) -> list[tuple[str, int]]:
        pairs = [(chr(i), n) for i, n in enumerate(self.ascii) if n]
        pairs += [(c, n) for c, n in self.other.items() if n > 0]
        return sorted(pairs, key=lambda p: (-p[1], p[0]))

    def main_language(self) -> str | None:
        named = [(n, lang) for lang, n in self.bytes_by_language.items() if lang != "other"]
        return max(named)[1] if named else None

    def totals(self) -> dict[str, Any]:
        vocab = self.vocab()
        return {
            "files": self.files,
            "bytes": self.bytes,
            "source_bytes": self.source_bytes,
            "chars": sum(n for _, n in vocab),
            "vocab_size": len(vocab),
            "main_language": self.main_language(),
            "skipped": self.skipped,
            "skipped_by_reason": dict(sorted(self.by_reason.items())),
            "files_by_language": dict(self.files_by_language.most_common()),
            "bytes_by_language": dict(self.bytes_by_language.most_common()),
        }


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def empty_message(stats: BuildStats) -> str:
    """Files and directories counted apart: a skipped directory (.git/, a vendored tree of
    thousands of files) is one entry, not one file."""
    reasons = ", ".join(f"{r}: {n}" for r, n in sorted(stats.by_reason.items(), key=lambda kv: (-kv[1], kv[0])))
    what = _count(stats.skipped - stats.skipped_dirs, "file", "files")
    if stats.skipped_dirs:
        what += " and " + _count(stats.skipped_dirs, "directory", "directories")
    return f"corpus is empty after filters: {what} skipped ({reasons or 'no files at all'})"


def cap_message(cap: int, stats: BuildStats) -> str:
    return (
        f"corpus is larger than the total size cap of {human_size(cap)}: stopped after {stats.files} "
        f"files ({human_size(stats.bytes)}); narrow it with --include/--exclude/--lang or raise the cap "
        "(--max-total-size, corpus.max_total_bytes)"
    )
