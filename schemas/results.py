"""What each stage returns: storage keys and small facts, never corpora or weights.

These cross Ray (pickled pydantic models) and are stored on the run by the dispatcher.
"""

from __future__ import annotations

from schemas.base import Frozen


class ResolvedRepo(Frozen):
    spec: str  # what the user typed
    url: str  # what git was given (or the local path)
    ref: str | None = None
    commit: str | None = None  # None for a plain local folder (no git history)


class FetchResult(Frozen):
    repos: tuple[ResolvedRepo, ...]
    # The corpus cache key when every repo has a commit; None when it cannot be known in advance.
    corpus_hash: str | None = None
    # True when storage already holds that corpus: the corpus stage will not clone anything.
    cached: bool = False


class CorpusResult(Frozen):
    hash: str
    text_key: str
    manifest_key: str
    bytes: int
    files: int
    skipped: int
    vocab_size: int  # distinct characters in the corpus
    repos: tuple[ResolvedRepo, ...]
    cached: bool = False
    main_language: str | None = None  # for syntax highlighting and lexer metrics


class TrainResult(Frozen):
    final_step: int
    checkpoint_key: str  # the last checkpoint written
    best_checkpoint_key: str | None = None
    best_val_loss: float | None = None
    final_train_loss: float | None = None
    final_val_loss: float | None = None
    chars_per_sec: float | None = None
    stop_reason: str = "max_iters"  # max_iters | max_epochs | time_budget


class SampleResult(Frozen):
    key: str
    batch_id: str
    n: int
    checkpoint_step: int
    checkpoint_key: str
