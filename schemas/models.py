"""The run store's tables (SQLAlchemy 2 typed models). Imported by the orchestrator only.

Timestamps are `UTCDateTime`: stored as UTC and always returned timezone-aware, on SQLite (which
hands back naive datetimes) and PostgreSQL alike — the one place that normalises them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from schemas.status import RunStatus, Stage


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the run store; use an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _in(column: str, values: list[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}  # noqa: RUF012 - SQLAlchemy's


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (
        CheckConstraint(_in("status", [s.value for s in RunStatus]), name="ck_runs_status"),
        CheckConstraint(f"stage IS NULL OR {_in('stage', [s.value for s in Stage])}", name="ck_runs_stage"),
        Index("ix_runs_status_created", "status", "created_at"),  # jobs list --status
        Index("ix_runs_created", "created_at"),  # jobs list
        Index("ix_runs_status_queued", "status", "queued_at"),  # claims, oldest queued first
        Index("ix_runs_status_heartbeat", "status", "heartbeat_at"),  # stale runs
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    stage: Mapped[str | None] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]]
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    # The dispatcher that owns the run while it is running; claims counts every claim ever made.
    dispatcher_id: Mapped[str | None] = mapped_column(String(64))
    claims: Mapped[int] = mapped_column(Integer, default=0)
    # Times the run was recovered after its dispatcher or worker was lost.
    recoveries: Mapped[int] = mapped_column(Integer, default=0)
    step: Mapped[int | None]
    total_steps: Mapped[int | None]
    best_val_loss: Mapped[float | None] = mapped_column(Float)
    repos: Mapped[list[Any] | None]
    corpus: Mapped[dict[str, Any] | None]
    results: Mapped[dict[str, Any] | None]  # each finished stage's result, by stage name
    metrics: Mapped[dict[str, Any] | None]  # the latest value of each metric

    attempts: Mapped[list[StageAttempt]] = relationship(
        back_populates="run", cascade="all, delete-orphan", order_by="StageAttempt.id"
    )
    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="run", cascade="all, delete-orphan", order_by="Artifact.id"
    )


class StageAttempt(Base):
    __tablename__ = "stage_attempts"
    __table_args__ = (Index("ix_attempts_run", "run_id", "stage"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int]
    node_id: Mapped[str | None] = mapped_column(String(64))
    dispatcher_id: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    outcome: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)

    run: Mapped[Run] = relationship(back_populates="attempts")


class MetricPointRow(Base):
    __tablename__ = "metric_points"
    __table_args__ = (UniqueConstraint("run_id", "step", name="uq_metric_run_step"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int]
    train_loss: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    chars_per_sec: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("run_id", "key", name="uq_artifact_run_key"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(512))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    run: Mapped[Run] = relationship(back_populates="artifacts")


class LogLineRow(Base):
    __tablename__ = "log_lines"
    __table_args__ = (Index("ix_log_run", "run_id", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    stage: Mapped[str | None] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
