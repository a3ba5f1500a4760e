"""The run state machine: statuses, stages and the one table of legal moves.

`orchestrator.store.RunStore.transition` is the only code that changes a run's status; it checks
the move against `TRANSITIONS` and stamps the timestamps that belong to it (Airflow's `set_state`).
"""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Stage(StrEnum):
    FETCH = "fetch"
    CORPUS = "corpus"
    TRAIN = "train"
    SAMPLE = "sample"


STAGES: tuple[Stage, ...] = (Stage.FETCH, Stage.CORPUS, Stage.TRAIN, Stage.SAMPLE)

TERMINAL: frozenset[RunStatus] = frozenset(
    {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED}
)

# Which moves are legal. RUNNING -> QUEUED is the re-queue of a run whose dispatcher or worker
# died before anything worth resuming existed; FAILED/CANCELLED -> QUEUED is `jobs resume`.
TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.QUEUED: frozenset({RunStatus.RUNNING, RunStatus.CANCELLED, RunStatus.FAILED}),
    RunStatus.RUNNING: frozenset(
        {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.QUEUED}
    ),
    RunStatus.SUCCEEDED: frozenset(),
    RunStatus.FAILED: frozenset({RunStatus.QUEUED}),
    RunStatus.CANCELLED: frozenset({RunStatus.QUEUED}),
}


def can_transition(current: RunStatus, new: RunStatus) -> bool:
    return new in TRANSITIONS[current]
