"""The run store: the one writer path to the database and the source of truth about runs.

Every method opens one session scope that commits or rolls back. ORM objects never leave this
module: callers get the pydantic views of schemas/views.py. `_move` is the only code that changes
a run's status (`transition`, `claim` and `recover` go through it): it checks the move against
schemas/status.py's table, stamps the matching timestamp, and does it as a conditional UPDATE, so
two processes can never both make the same move (that is also how claims work on SQLite;
PostgreSQL adds `FOR UPDATE SKIP LOCKED`).
"""

from __future__ import annotations

import fnmatch
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

from sqlalchemy import delete, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, load_only, selectinload, sessionmaker

from orchestrator import db
from orchestrator.store_cluster import ClusterQueries
from orchestrator.store_events import apply_event
from orchestrator.store_views import run_summary, run_view
from schemas.errors import IllegalTransition, RunNotFound, UserError
from schemas.events import Event
from schemas.models import (
    Artifact,
    LogLineRow,
    MetricPointRow,
    Run,
    StageAttempt,
    utcnow,
)
from schemas.run import RunSpec
from schemas.status import TERMINAL, RunStatus, Stage, can_transition
from schemas.views import LogLine, MetricPoint, RunSummary, RunView

# Which timestamp each status stamps when a run enters it.
_STAMPS = {
    RunStatus.QUEUED: "queued_at",
    RunStatus.RUNNING: "started_at",
    RunStatus.SUCCEEDED: "finished_at",
    RunStatus.FAILED: "finished_at",
    RunStatus.CANCELLED: "finished_at",
}


def new_run_id() -> str:
    return secrets.token_hex(6)


def _move(session: Session, run: Run, source: RunStatus, new: RunStatus, *, error: str | None = None,
          owner: str | None = None, **fields: Any) -> bool:
    """The only code that changes a run's status: checks the table, stamps the timestamps.

    A conditional UPDATE (`WHERE status = source`, and `dispatcher_id = owner` when given): of
    two processes making the same move, one wins and the other gets False. That is also what
    makes claims safe on SQLite, and what stops a dispatcher from finishing or re-queueing a run
    that another dispatcher has taken over meanwhile.
    """
    if not can_transition(source, new):
        raise IllegalTransition(f"run {run.id} is {source.value}: cannot move it to {new.value}")
    now = utcnow()
    values: dict[str, Any] = {"status": new.value, **fields}
    if new is not RunStatus.RUNNING or run.started_at is None:
        values[_STAMPS[new]] = now
    if new in TERMINAL:
        values["error"] = error
        values.setdefault("dispatcher_id", None)
    elif new is RunStatus.QUEUED:
        values.update(error=None, finished_at=None, dispatcher_id=None, heartbeat_at=None, stage=None)
    elif new is RunStatus.RUNNING:
        values["heartbeat_at"] = now
    where = [Run.id == run.id, Run.status == source.value]
    if owner is not None:
        where.append(Run.dispatcher_id == owner)
    result = cast(CursorResult[Any], session.execute(update(Run).where(*where).values(**values)))
    return result.rowcount == 1


class RunStore(ClusterQueries):
    def __init__(self, url: str, *, migrate: bool = False) -> None:
        self.url = url
        self.engine = db.make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if migrate:
            self._guard(self._migrate)

    def require_schema(self) -> None:
        """Refuse to work on a database that `charforge db upgrade` has not brought up to date."""
        if not self._guard(lambda: db.is_current(self.engine)):
            raise UserError(f"the database at {db.redact(self.url)} does not have charforge's current "
                            "schema: run `charforge db upgrade`")

    def _migrate(self) -> None:
        if not db.is_current(self.engine):
            db.upgrade(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def _guard(self, fn: Any) -> Any:
        try:
            return fn()
        except (OperationalError, DBAPIError) as exc:
            if isinstance(exc, OperationalError) or exc.connection_invalidated:
                raise db.unavailable(self.url, exc) from None
            raise

    @contextmanager
    def _session(self) -> Iterator[Session]:
        try:
            with self._sessions.begin() as session:
                yield session
        except OperationalError as exc:
            raise db.unavailable(self.url, exc) from None

    # ---- reading -----------------------------------------------------------------------------

    def _get_run(self, session: Session, run_id: str, *, full: bool = False) -> Run:
        query = select(Run)
        if full:
            query = query.options(selectinload(Run.attempts), selectinload(Run.artifacts))
        run = session.scalar(query.where(Run.id == run_id))
        if run is not None:
            return run
        prefix = bool(run_id) and all(c in "0123456789abcdef" for c in run_id)
        if prefix and len(run_id) < 4:
            raise RunNotFound(f"no run with id {run_id!r} (a prefix needs at least 4 characters)")
        if prefix:
            matches = session.scalars(query.where(Run.id.startswith(run_id)).limit(2)).all()
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise UserError(f"run id prefix {run_id!r} is ambiguous: give more characters")
        raise RunNotFound(f"no run with id {run_id!r}")

    def get_run(self, run_id: str) -> RunView:
        with self._session() as session:
            return run_view(self._get_run(session, run_id, full=True))

    def resolve_id(self, run_id: str) -> str:
        with self._session() as session:
            return self._get_run(session, run_id).id

    def list_runs(
        self,
        *,
        status: RunStatus | None = None,
        limit: int | None = None,
        name_glob: str | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[RunSummary]:
        """Run summaries, newest first."""
        with self._session() as session:
            # Only the summary's columns: not the spec, results or metrics JSON of every run.
            columns = [getattr(Run, f) for f in RunSummary.model_fields]
            query = select(Run).options(load_only(*columns)).order_by(Run.created_at.desc(), Run.id.desc())
            if status is not None:
                query = query.where(Run.status == status.value)
            if ids is not None:
                query = query.where(Run.id.in_(list(ids)))
            if limit is not None and name_glob is None:
                query = query.limit(limit)
            runs = session.scalars(query).all()
            if name_glob is not None:
                runs = [r for r in runs if fnmatch.fnmatchcase(r.name, name_glob)][:limit]
            return [run_summary(r) for r in runs]

    def get_runs(self, run_ids: Sequence[str]) -> list[RunView]:
        with self._session() as session:
            return [run_view(self._get_run(session, rid, full=True)) for rid in run_ids]

    def metrics(self, run_id: str) -> list[MetricPoint]:
        with self._session() as session:
            rid = self._get_run(session, run_id).id
            rows = session.scalars(
                select(MetricPointRow).where(MetricPointRow.run_id == rid).order_by(MetricPointRow.step)
            )
            return [MetricPoint.model_validate(r, from_attributes=True) for r in rows]

    def logs(self, run_id: str, *, after: int = 0, limit: int | None = None) -> list[LogLine]:
        with self._session() as session:
            rid = self._get_run(session, run_id).id
            query = (
                select(LogLineRow)
                .where(LogLineRow.run_id == rid, LogLineRow.id > after)
                .order_by(LogLineRow.id)
                .limit(limit)
            )
            return [LogLine.model_validate(r, from_attributes=True) for r in session.scalars(query)]

    # ---- creating and moving -----------------------------------------------------------------

    def create_run(self, spec: RunSpec) -> RunView:
        now = utcnow()
        with self._session() as session:
            run = Run(
                id=new_run_id(),
                name=spec.name,
                status=RunStatus.QUEUED.value,
                spec=spec.model_dump(mode="json"),
                created_at=now,
                queued_at=now,
                claims=0,
                recoveries=0,
                attempts=[],
                artifacts=[],
            )
            session.add(run)
            session.flush()
            return run_view(run)

    def transition(
        self,
        run_id: str,
        new: RunStatus,
        *,
        expected: RunStatus | None = None,
        error: str | None = None,
        owner: str | None = None,
        **fields: Any,
    ) -> RunView:
        """Move a run to `new`, checked against the transition table.

        `expected` makes the move conditional on the status the caller saw (a claim, say);
        without it the current status is read and checked. `owner` makes it conditional on the
        dispatcher that owns the run. A move that lost a race raises `IllegalTransition` naming
        the status the run actually has.
        """
        with self._session() as session:
            run = self._get_run(session, run_id)
            current = RunStatus(run.status)
            source = expected or current
            if expected and current is not expected:
                raise IllegalTransition(f"run {run.id} is {current.value}: cannot move it to {new.value}")
            if _move(session, run, source, new, error=error, owner=owner, **fields):
                session.expire(run)
                return run_view(self._get_run(session, run.id, full=True))
            rid = run.id  # the UPDATE matched nothing: there is nothing to roll back
        actual = self._status(rid)
        raise IllegalTransition(f"run {rid} is {actual.value}: cannot move it to {new.value}")

    def _status(self, run_id: str) -> RunStatus:
        with self._session() as session:
            return RunStatus(self._get_run(session, run_id).status)

    def cancel(self, run_id: str) -> RunView:
        """Cancel a queued or running run; cancelling a cancelled run is a no-op."""
        view = self.get_run(run_id)
        if view.status is RunStatus.CANCELLED:
            return view
        if view.status in TERMINAL:
            raise IllegalTransition(f"run {view.id} already {view.status.value}: nothing to cancel")
        try:
            return self.transition(view.id, RunStatus.CANCELLED, expected=view.status, error="cancelled by user")
        except IllegalTransition:
            return self.cancel(view.id)  # it moved meanwhile; decide again on its new status

    def resume(self, run_id: str, *, stale_after: float | None = None) -> RunView:
        """Queue a failed or cancelled run again; it continues from its last checkpoint.

        With `stale_after`, also a running run whose heartbeat is older than that many seconds:
        its dispatcher died (an embedded submit killed, say) and no `charforge serve` recovered
        it. It is recovered as a serve would (open attempts closed as lost, conditional on the
        dispatcher seen), by hand.
        """
        rid = self.resolve_id(run_id)
        # The owner first: a claim after this read would stamp a fresh heartbeat on the run.
        _, owner = self.owners([rid])[rid]
        view = self.get_run(rid)
        silent = view.silent_for(utcnow())
        if stale_after is not None and silent is not None and silent > stale_after:
            return self.recover(view.id, f"no heartbeat for {silent:.0f}s; resumed by user",
                                max_recoveries=0, owner=owner, counted=False)
        if view.status not in (RunStatus.FAILED, RunStatus.CANCELLED):
            alive = f" (heartbeat {silent:.0f}s ago)" if silent is not None else ""
            also = (f" (or running ones with no heartbeat for over {stale_after:g}s)"
                    if stale_after is not None else "")
            raise IllegalTransition(
                f"run {view.id} is {view.status.value}{alive}: only failed or cancelled runs can be resumed{also}"
            )
        self.append_log(view.id, f"resumed by user (was {view.status.value})")
        return self.transition(view.id, RunStatus.QUEUED, expected=view.status)

    def claim(self, dispatcher_id: str, limit: int, *, only: set[str] | None = None) -> list[RunView]:
        """Move up to `limit` queued runs, oldest first, to running under `dispatcher_id`.

        `only` restricts the claim to those runs (the embedded default drives its own runs only).
        """
        if limit <= 0 or (only is not None and not only):
            return []
        with self._session() as session:
            query = select(Run.id).where(Run.status == RunStatus.QUEUED.value)
            if only is not None:
                query = query.where(Run.id.in_(list(only)))
            query = (
                query
                .order_by(Run.queued_at, Run.id)
                .limit(limit)
                .with_for_update(skip_locked=True)  # PostgreSQL; SQLite relies on the UPDATE below
            )
            claimed = [
                rid for rid in session.scalars(query)
                if _move(session, session.get_one(Run, rid), RunStatus.QUEUED, RunStatus.RUNNING,
                         dispatcher_id=dispatcher_id, claims=Run.claims + 1)
            ]
        return self.get_runs(claimed)

    def recover(self, run_id: str, reason: str, *, max_recoveries: int, owner: str | None = None,
                counted: bool = True) -> RunView:
        """A running run lost its dispatcher or worker: queue it again, or fail it as lost.

        One transaction: the open attempts are closed as lost, the count goes up, and the move
        is conditional on the run still being running under `owner` (the dispatcher the caller
        saw), so a run another dispatcher recovered and claimed again meanwhile is left alone.
        `counted=False` (a user's `jobs resume`): not counted against `max_recoveries`.
        """
        with self._session() as session:
            run = self._get_run(session, run_id)
            owner = owner or run.dispatcher_id
            gave_up = counted and run.recoveries + 1 > max_recoveries
            new = RunStatus.FAILED if gave_up else RunStatus.QUEUED
            error = f"lost: {reason} (gave up after {max_recoveries} recoveries)" if gave_up else None
            if not _move(session, run, RunStatus.RUNNING, new, error=error, owner=owner,
                         recoveries=Run.recoveries + int(counted)):
                raise IllegalTransition(f"run {run.id} is no longer running under {owner}: not recovering it")
            session.execute(
                update(StageAttempt)
                .where(StageAttempt.run_id == run.id, StageAttempt.finished_at.is_(None))
                .values(outcome="lost", error=reason, finished_at=utcnow())
            )
            session.add(LogLineRow(run_id=run.id, message=f"lost: {reason}", at=utcnow()))
        return self.get_run(run_id)

    # ---- bookkeeping while a run runs (the dispatcher's side) --------------------------------

    def append_log(self, run_id: str, message: str, stage: str | None = None) -> None:
        with self._session() as session:
            session.add(LogLineRow(run_id=run_id, stage=stage, message=message, at=utcnow()))

    def update_run(self, run_id: str, **fields: Any) -> None:
        """Bookkeeping columns only (repos, corpus, results, step, ...); never the status."""
        if "status" in fields:
            raise ValueError("use transition() to change a run's status")
        with self._session() as session:
            session.execute(update(Run).where(Run.id == run_id).values(**fields))

    def results(self, run_id: str) -> dict[str, Any]:
        """The stored result of each finished stage, by stage name."""
        with self._session() as session:
            return dict(self._get_run(session, run_id).results or {})

    def record_result(self, run_id: str, stage: Stage, result: dict[str, Any]) -> None:
        with self._session() as session:
            run = self._get_run(session, run_id)
            run.results = {**(run.results or {}), stage.value: result}

    def apply_events(self, run_id: str, events: Sequence[Event]) -> None:
        """Write what a stage reported: progress, metric points, artifacts, log lines, nodes."""
        if not events:
            return
        with self._session() as session:
            run = session.get(Run, run_id)
            if run is None:
                return
            for event in events:
                apply_event(session, run, event)

    def prune_artifacts(self, run_id: str, kind: str, keep: set[str]) -> None:
        """Forget artifacts of `kind` whose objects are gone (e.g. rotated checkpoints)."""
        with self._session() as session:
            session.execute(
                delete(Artifact).where(Artifact.run_id == run_id, Artifact.kind == kind,
                                       Artifact.key.not_in(keep))
            )

