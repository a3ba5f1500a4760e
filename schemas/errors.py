"""Domain exceptions shared by workers and the orchestrator.

Library code raises these; only the CLI turns them into a one-line message and exit code 1.
The dispatcher reads `retryable` to decide between retrying a stage (infrastructure trouble) and
failing the run at once (the user's input is wrong: retrying cannot help).

They must survive a trip through Ray (pickling), so every subclass keeps `args == (message,)`.
"""

from __future__ import annotations


class CharforgeError(Exception):
    """Base of every error charforge raises on purpose. `str(err)` is the user-facing line."""

    retryable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class UserError(CharforgeError):
    """The input is wrong (a bad spec, an empty corpus, a bad option): fail at once."""


class InvalidSpec(UserError):
    """A repo spec, option or `--set` value was refused before anything ran."""


class RepoError(UserError):
    """The repository cannot be fetched: it does not exist, or the ref is unknown."""


class CorpusError(UserError):
    """The corpus cannot be built from what the repositories hold (empty, too big, ...)."""


class TrainingError(UserError):
    """Training stopped for a reason retrying cannot fix (NaN, divergence, vocab mismatch)."""


class CheckpointDamaged(TrainingError):
    """A checkpoint whose bytes are not the ones recorded when it was written."""


class SamplingError(UserError):
    """Sampling options do not fit the checkpoint (e.g. a prime character outside the vocab)."""


class NotFound(UserError):
    """A run, checkpoint or object that the user named does not exist."""


class RunNotFound(NotFound):
    pass


class ArtifactNotFound(NotFound):
    pass


class IllegalTransition(CharforgeError):
    """A status change the state machine does not allow (e.g. cancelling a succeeded run)."""


class StorageError(CharforgeError):
    """Storage refused or failed a request (bad credentials, missing bucket, endpoint down)."""


class TransientError(CharforgeError):
    """Infrastructure trouble worth retrying with backoff (network, a restarting service)."""

    retryable = True


class StorageUnavailable(TransientError, StorageError):
    """The storage endpoint cannot be reached right now."""


class DatabaseUnavailable(TransientError):
    """The run store's database cannot be reached right now."""
