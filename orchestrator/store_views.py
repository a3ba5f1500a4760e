"""ORM rows -> the pydantic views callers get (the store never hands out ORM objects).

The views' fields are named after the columns, so pydantic reads the rows directly
(`from_attributes`); only the JSON columns that may be NULL need a default here.
"""

from __future__ import annotations

from schemas.models import Run, StageAttempt
from schemas.views import RunSummary, RunView, StageAttemptView


def run_summary(run: Run) -> RunSummary:
    return RunSummary.model_validate(run, from_attributes=True)


def attempt_view(row: StageAttempt) -> StageAttemptView:
    return StageAttemptView.model_validate(row, from_attributes=True)


def run_view(run: Run) -> RunView:
    return RunView.model_validate({
        **run_summary(run).model_dump(),
        "spec": run.spec,
        "queued_at": run.queued_at,
        "attempts": list(run.attempts),
        "repos": run.repos or [],
        "corpus": run.corpus,
        "metrics": run.metrics or {},
        "artifacts": list(run.artifacts),
    }, from_attributes=True)
