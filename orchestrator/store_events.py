"""How the store writes what a stage reported (called inside one of RunStore's sessions)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from schemas.events import Event, EventKind
from schemas.models import (
    Artifact,
    LogLineRow,
    MetricPointRow,
    Run,
    StageAttempt,
    utcnow,
)
from schemas.status import Stage


def _apply_progress(session: Session, run: Run, event: Event) -> None:
    if event.stage == Stage.TRAIN.value:
        run.step = event.data.get("step")
        run.total_steps = event.data.get("total")


def _apply_metric(session: Session, run: Run, event: Event) -> None:
    """Upsert the point at this step; a resumed run rewinds the history past its checkpoint."""
    data = event.data
    step = int(data["step"])
    session.execute(delete(MetricPointRow).where(MetricPointRow.run_id == run.id, MetricPointRow.step > step))
    row = session.scalar(
        select(MetricPointRow).where(MetricPointRow.run_id == run.id, MetricPointRow.step == step)
    )
    if row is None:
        row = MetricPointRow(run_id=run.id, step=step, recorded_at=utcnow())
        session.add(row)
    _merge_metric(row, data)
    latest = dict(run.metrics or {})
    latest.update({k: float(v) for k, v in data.items() if k != "step" and v is not None})
    run.metrics = latest
    val = data.get("val_loss")
    if val is not None and (run.best_val_loss is None or val < run.best_val_loss):
        run.best_val_loss = float(val)


def _apply_artifact(session: Session, run: Run, event: Event) -> None:
    data = event.data
    row = session.scalar(select(Artifact).where(Artifact.run_id == run.id, Artifact.key == data["key"]))
    if row is None:
        row = Artifact(run_id=run.id, key=data["key"], created_at=utcnow())
        session.add(row)
    row.kind, row.size, row.sha256 = data["kind"], int(data["size"]), data["sha256"]
    row.meta = dict(data.get("meta") or {})


def _apply_log(session: Session, run: Run, event: Event) -> None:
    at = datetime.fromtimestamp(event.ts, UTC)
    session.add(LogLineRow(run_id=run.id, stage=event.stage, message=str(event.data["message"]), at=at))


def _apply_node(session: Session, run: Run, event: Event) -> None:
    attempt = session.scalar(
        select(StageAttempt)
        .where(StageAttempt.run_id == run.id, StageAttempt.stage == event.stage)
        .order_by(StageAttempt.attempt.desc())
        .limit(1)
    )
    if attempt is not None:
        attempt.node_id = event.data.get("node_id")


def apply_event(session: Session, run: Run, event: Event) -> None:
    _APPLY[event.kind](session, run, event)


_APPLY = {
    EventKind.PROGRESS: _apply_progress,
    EventKind.METRIC: _apply_metric,
    EventKind.ARTIFACT: _apply_artifact,
    EventKind.LOG: _apply_log,
    EventKind.NODE: _apply_node,
}


def _merge_metric(row: MetricPointRow, data: dict[str, Any]) -> None:
    for field in ("train_loss", "val_loss", "chars_per_sec", "lr"):
        if data.get(field) is not None:
            setattr(row, field, float(data[field]))
