"""Storage keys, in one place: the layout in docs/architecture.md.

Every key is built here from ids we generated or hashes we computed; no user string becomes part
of a key (run names, repo specs and file paths never do).
"""

from __future__ import annotations

import re

_ID = re.compile(r"[0-9a-f]{6,64}")
FORMATS = ("tar.gz", "zip", "jsonl")


def _check_id(value: str, what: str) -> str:
    if not _ID.fullmatch(value):  # not match + "$": "$" also matches before a final newline
        raise ValueError(f"invalid {what} {value!r}")
    return value


def corpus_prefix(corpus_hash: str) -> str:
    return f"corpora/{_check_id(corpus_hash, 'corpus hash')}/"


def corpus_text(corpus_hash: str) -> str:
    return corpus_prefix(corpus_hash) + "corpus.txt"


def corpus_manifest(corpus_hash: str) -> str:
    return corpus_prefix(corpus_hash) + "manifest.json"


def corpus_vocab(corpus_hash: str, min_count: int, max_size: int) -> str:
    """The corpus's vocabulary under given thresholds (counted once, reused by every run)."""
    return corpus_prefix(corpus_hash) + f"vocab-min{int(min_count)}-max{int(max_size)}.json"


def corpus_encoded(corpus_hash: str, vocab_tag: str) -> tuple[str, str]:
    """The corpus encoded with one vocabulary: the integer file and its small JSON description."""
    prefix = corpus_prefix(corpus_hash) + f"encoded-{_check_id(vocab_tag, 'vocabulary tag')}"
    return prefix + ".bin", prefix + ".json"


def corpus_metrics(corpus_hash: str, version: int) -> str:
    """The corpus's own code-likeness figures (what samples are compared with)."""
    return corpus_prefix(corpus_hash) + f"codemetrics-v{int(version)}.json"


def run_prefix(run_id: str) -> str:
    return f"runs/{_check_id(run_id, 'run id')}/"


def checkpoints_prefix(run_id: str) -> str:
    return run_prefix(run_id) + "checkpoints/"


def checkpoint(run_id: str, step: int) -> str:
    return checkpoints_prefix(run_id) + f"step-{int(step)}.pt"


def latest_checkpoint(run_id: str) -> str:
    return checkpoints_prefix(run_id) + "latest.json"


def samples(run_id: str, batch_id: str) -> str:
    return run_prefix(run_id) + f"samples/{_check_id(batch_id, 'batch id')}.jsonl"


def export(export_id: str, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"invalid export format {fmt!r}")
    return f"exports/{_check_id(export_id, 'export id')}.{fmt}"
