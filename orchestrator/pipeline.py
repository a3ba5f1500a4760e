"""The order of stages, what each one is given, and what a failure means.

Plain functions over stored results, so the dispatcher stays a loop and these rules stay testable.
A run that is queued again (resume, recovery) skips the stages whose results are stored: fetch and
corpus are not redone, and training continues from its last checkpoint.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from schemas.errors import CharforgeError
from schemas.results import CorpusResult, FetchResult, SampleResult, TrainResult
from schemas.run import RunSpec
from schemas.status import STAGES, Stage
from workers import keys

RESULT_TYPES: dict[Stage, type[BaseModel]] = {
    Stage.FETCH: FetchResult,
    Stage.CORPUS: CorpusResult,
    Stage.TRAIN: TrainResult,
    Stage.SAMPLE: SampleResult,
}


def load_results(stored: dict[str, Any] | None) -> dict[Stage, Any]:
    return {Stage(k): RESULT_TYPES[Stage(k)].model_validate(v) for k, v in (stored or {}).items()}


def next_stage(results: dict[Stage, Any]) -> Stage | None:
    for stage in STAGES:
        if stage not in results:
            return stage
    return None


def sample_checkpoint(run_id: str, which: str, train: TrainResult) -> str:
    """The checkpoint the sample stage reads: best (default), latest, or a step number."""
    if which == "latest":
        return train.checkpoint_key
    if which == "best":
        return train.best_checkpoint_key or train.checkpoint_key
    return keys.checkpoint(run_id, int(which))


def stage_context(settings: Any, run_id: str, *, num_threads: int, use_accelerator: bool) -> Any:
    """What a stage task needs from the settings (storage, git) besides its inputs."""
    from workers.remote import StageContext

    return StageContext(
        run_id=run_id, storage_url=settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url,
        git_base_url=settings.git_base_url, num_threads=num_threads, use_accelerator=use_accelerator,
    )


def stage_inputs(stage: Stage, run_id: str, spec: RunSpec, results: dict[Stage, Any]) -> dict[str, Any]:
    if stage is Stage.FETCH:
        return {"repos": spec.repos, "corpus": spec.corpus}
    if stage is Stage.CORPUS:
        return {"fetch": results[Stage.FETCH], "corpus": spec.corpus}
    if stage is Stage.TRAIN:
        return {
            "corpus_result": results[Stage.CORPUS],
            "model": spec.model,
            "train": spec.train,
            "init_from": spec.init_from_checkpoint,
        }
    return {
        "sample": spec.sample,
        "checkpoint_key": sample_checkpoint(run_id, spec.sample.checkpoint, results[Stage.TRAIN]),
        "corpus_result": results[Stage.CORPUS],
    }


def run_facts(stage: Stage, result: Any) -> dict[str, Any]:
    """The run columns a finished stage fills in (what `jobs status` shows)."""
    if stage is Stage.FETCH:
        return {"repos": [_repo(r) for r in result.repos]}
    if stage is Stage.CORPUS:
        corpus = {
            "key": result.text_key,
            "manifest_key": result.manifest_key,
            "hash": result.hash,
            "bytes": result.bytes,
            "files": result.files,
            "skipped": result.skipped,
            "vocab_size": result.vocab_size,
            "main_language": result.main_language,
            "cached": result.cached,
        }
        return {"corpus": corpus, "repos": [_repo(r) for r in result.repos]}
    return {}


def _repo(repo: Any) -> dict[str, Any]:
    return {"spec": repo.spec, "url": repo.url, "ref": repo.ref, "commit": repo.commit}


@dataclass(frozen=True)
class Failure:
    """What a stage's exception means for the run."""

    retry: bool
    message: str
    cancelled: bool = False
    detail: str | None = None  # a traceback for the run's log


# Ray errors that mean the machine, not the input, failed: retry (training resumes).
_INFRA = (
    "WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError", "ObjectFetchTimedOutError",
    "OutOfMemoryError", "RaySystemError", "ActorDiedError", "ActorUnavailableError", "LocalRayletDiedError",
    "ReferenceCountingAssertionError", "ObjectReconstructionFailedError", "RuntimeEnvSetupError",
)


def classify(exc: BaseException, stage: Stage) -> Failure:
    import ray.exceptions as rex

    if isinstance(exc, rex.TaskCancelledError):
        return Failure(retry=False, message="cancelled", cancelled=True)
    cause = exc.cause if isinstance(exc, rex.RayTaskError) and exc.cause is not None else exc
    if isinstance(cause, CharforgeError):
        return Failure(retry=cause.retryable, message=cause.message)
    names = {cls.__name__ for cls in type(cause).__mro__}
    if names & set(_INFRA):
        return Failure(retry=True, message=f"{stage.value} worker lost ({type(cause).__name__}): "
                                           f"{_first_sentence(cause)}", detail=str(cause).strip())
    if isinstance(cause, (ConnectionError, TimeoutError)):
        return Failure(retry=True, message=f"{stage.value}: {type(cause).__name__}: {_first_line(cause)}")
    detail = str(exc) if isinstance(exc, rex.RayTaskError) else "".join(traceback.format_exception(cause))
    return Failure(
        retry=False,
        message=f"internal error in the {stage.value} stage: {type(cause).__name__}: {_first_line(cause)}",
        detail=detail,
    )


def backoff(base: float, failures: int) -> float:
    """Seconds before the retry that follows failure number `failures` (1, 2, ...).

    Doubling from `base`, at most a minute.
    """
    return min(base * 2 ** (failures - 1), 60.0)


def _first_sentence(exc: BaseException) -> str:
    """Ray's errors explain at length; the run's error keeps what happened (the log has all)."""
    return _first_line(exc).split(". ", 1)[0].rstrip(".")[:200]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
