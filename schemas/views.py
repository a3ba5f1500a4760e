"""What the run store returns: plain pydantic views, never ORM objects.

`RunView.to_status_json()` is the documented `charforge jobs status --json` object.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, PlainSerializer

from schemas.status import RunStatus, Stage

# A stored time (UTC, made aware where it is read: schemas.models) as every JSON output writes it:
# `datetime.isoformat()`, "2026-12-05T10:00:00.123456+00:00", in views dumped by pydantic too
# (whose own form, "...Z", `jobs list --json` printed while `jobs status --json` printed this).
Timestamp = Annotated[datetime, PlainSerializer(datetime.isoformat, when_used="json")]


class MetricPoint(BaseModel):
    step: int
    train_loss: float | None = None
    val_loss: float | None = None
    chars_per_sec: float | None = None
    lr: float | None = None
    recorded_at: Timestamp | None = None


class ArtifactView(BaseModel):
    kind: str  # corpus | manifest | checkpoint | samples | export | log
    key: str
    size: int
    sha256: str
    meta: dict[str, Any] = {}
    created_at: Timestamp | None = None


class StageAttemptView(BaseModel):
    stage: Stage
    attempt: int
    node_id: str | None = None
    dispatcher_id: str | None = None
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    outcome: str | None = None  # succeeded | failed | retried | cancelled | lost | interrupted
    error: str | None = None


class LogLine(BaseModel):
    id: int
    at: Timestamp
    stage: str | None = None
    message: str


class RunSummary(BaseModel):
    id: str
    name: str
    status: RunStatus
    stage: Stage | None = None
    created_at: Timestamp
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    error: str | None = None
    step: int | None = None
    total_steps: int | None = None
    best_val_loss: float | None = None
    heartbeat_at: Timestamp | None = None

    def silent_for(self, now: datetime) -> float | None:
        """Seconds since a running run's last heartbeat (None when it is not running)."""
        if self.status is not RunStatus.RUNNING or self.heartbeat_at is None:
            return None
        return max(0.0, (now - self.heartbeat_at).total_seconds())


# The first fields of `jobs status --json`, in their order.
_STATUS_HEAD = ("id", "name", "status", "stage", "error", "created_at", "queued_at", "started_at", "finished_at",
                "heartbeat_at")


class RunView(RunSummary):
    spec: dict[str, Any]  # the resolved RunSpec, as stored
    queued_at: Timestamp | None = None
    attempts: list[StageAttemptView] = []
    repos: list[dict[str, Any]] = []  # [{spec, url, commit}]
    corpus: dict[str, Any] | None = None  # {key, bytes, files, vocab_size, ...}
    metrics: dict[str, float | None] = {}  # latest train_loss, val_loss, best_val_loss, chars_per_sec
    artifacts: list[ArtifactView] = []

    @property
    def checkpoints(self) -> list[ArtifactView]:
        return [a for a in self.artifacts if a.kind == "checkpoint"]

    @property
    def sample_batches(self) -> list[ArtifactView]:
        return [a for a in self.artifacts if a.kind == "samples"]

    def to_status_json(self) -> dict[str, Any]:
        plain = self.model_dump(mode="json", include=set(_STATUS_HEAD))  # times as Timestamp writes them
        return {
            **{name: plain[name] for name in _STATUS_HEAD},
            "repos": self.repos,
            "corpus": self.corpus,
            "progress": {"step": self.step, "total_steps": self.total_steps},
            "metrics": {
                "train_loss": self.metrics.get("train_loss"),
                "val_loss": self.metrics.get("val_loss"),
                "best_val_loss": self.best_val_loss,
                "chars_per_sec": self.metrics.get("chars_per_sec"),
            },
            "checkpoints": [
                {"step": a.meta.get("step"), "key": a.key, "val_loss": a.meta.get("val_loss")}
                for a in self.checkpoints
            ],
            "samples": [
                {"key": a.key, "n": a.meta.get("n"), "checkpoint_step": a.meta.get("checkpoint_step")}
                for a in self.sample_batches
            ],
            "attempts": [a.model_dump(mode="json") for a in self.attempts],
            "spec": self.spec,
        }
