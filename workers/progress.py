"""How a stage reports progress without knowing who listens.

Stage functions take a `Reporter`. In the pipeline it is an `EventReporter` whose sink ships
events through Ray to the dispatcher; in tests and the local CLI it can be a `ListReporter` or a
callback. Events are buffered and flushed at most every `flush_every` seconds, so a training
loop can report every step without a remote call per step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from schemas.events import Event, EventKind


class Reporter(Protocol):
    def progress(self, step: int, total: int | None = None, **info: Any) -> None: ...
    def metric(self, step: int, **values: float) -> None: ...
    def artifact(self, kind: str, key: str, size: int, sha256: str, **meta: Any) -> None: ...
    def log(self, message: str) -> None: ...
    def flush(self) -> None: ...


class EventReporter:
    """Buffers events for one stage and hands them to `sink` in batches."""

    def __init__(
        self, stage: str, sink: Callable[[list[Event]], None], flush_every: float = 0.5
    ) -> None:
        self.stage = stage
        self._sink = sink
        self._flush_every = flush_every
        self._buffer: list[Event] = []
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()

    def _emit(self, kind: EventKind, data: dict[str, Any], *, urgent: bool = False) -> None:
        with self._lock:
            self._buffer.append(Event(kind=kind, stage=self.stage, data=data))
        if urgent or time.monotonic() - self._last_flush >= self._flush_every:
            self.flush()

    def progress(self, step: int, total: int | None = None, **info: Any) -> None:
        self._emit(EventKind.PROGRESS, {"step": step, "total": total, **info})

    def metric(self, step: int, **values: float) -> None:
        self._emit(EventKind.METRIC, {"step": step, **values})

    def artifact(self, kind: str, key: str, size: int, sha256: str, **meta: Any) -> None:
        # Artifacts are flushed at once: a checkpoint must be on record before anything else
        # can go wrong, or a resume would not find it.
        data = {"kind": kind, "key": key, "size": size, "sha256": sha256, "meta": meta}
        self._emit(EventKind.ARTIFACT, data, urgent=True)

    def log(self, message: str) -> None:
        self._emit(EventKind.LOG, {"message": message})

    def node(self, **data: Any) -> None:
        self._emit(EventKind.NODE, data, urgent=True)

    def flush(self) -> None:
        with self._lock:
            batch, self._buffer = self._buffer, []
            self._last_flush = time.monotonic()
        if batch:
            self._sink(batch)


class ListReporter(EventReporter):
    """Keeps every event in `.events`: for tests and for running a stage in-process."""

    def __init__(self, stage: str = "test") -> None:
        self.events: list[Event] = []
        super().__init__(stage, self.events.extend, flush_every=0.0)

    def of(self, kind: EventKind) -> list[dict[str, Any]]:
        self.flush()
        return [e.data for e in self.events if e.kind is kind]


NULL_REPORTER = EventReporter("null", lambda batch: None, flush_every=0.0)
