"""ORM rows -> the pydantic views callers get (the store never hands out ORM objects)."""

from __future__ import annotations

from schemas.models import Run, StageAttempt
from schemas.status import RunStatus, Stage
from schemas.views import ArtifactView, RunSummary, RunView, StageAttemptView


def run_summary(run: Run) -> RunSummary:
    return RunSummary(
        id=run.id,
        name=run.name,
        status=RunStatus(run.status),
        stage=Stage(run.stage) if run.stage else None,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        error=run.error,
        step=run.step,
        total_steps=run.total_steps,
        best_val_loss=run.best_val_loss,
        heartbeat_at=run.heartbeat_at,
    )


def attempt_view(row: StageAttempt) -> StageAttemptView:
    return StageAttemptView(
        stage=Stage(row.stage),
        attempt=row.attempt,
        node_id=row.node_id,
        dispatcher_id=row.dispatcher_id,
        started_at=row.started_at,
        finished_at=row.finished_at,
        outcome=row.outcome,
        error=row.error,
    )


def run_view(run: Run) -> RunView:
    summary = run_summary(run).model_dump()
    return RunView(
        **summary,
        spec=run.spec,
        queued_at=run.queued_at,
        attempts=[attempt_view(a) for a in run.attempts],
        repos=list(run.repos or []),
        corpus=run.corpus,
        metrics=dict(run.metrics or {}),
        artifacts=[
            ArtifactView(kind=a.kind, key=a.key, size=a.size, sha256=a.sha256, meta=a.meta or {},
                         created_at=a.created_at)
            for a in run.artifacts
        ],
    )
