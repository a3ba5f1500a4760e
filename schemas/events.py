"""What workers tell the dispatcher while a stage runs.

Workers never touch the database: they emit `Event`s through a `workers.progress.Reporter`, the
Ray wrapping ships them to the dispatcher, and the dispatcher writes the run store.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field


class EventKind(StrEnum):
    PROGRESS = "progress"  # data: step, total, and free-form info (e.g. files, bytes)
    METRIC = "metric"  # data: step + any of train_loss, val_loss, chars_per_sec, lr
    ARTIFACT = "artifact"  # data: kind, key, size, sha256, meta
    LOG = "log"  # data: message
    NODE = "node"  # data: node_id, attempt info; sent once when a stage attempt starts


class Event(BaseModel):
    kind: EventKind
    stage: str
    data: dict[str, Any]
    ts: float = Field(default_factory=time.time)
