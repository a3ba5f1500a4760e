"""The run store's queries for dispatchers: stage attempts, heartbeats, ownership, lost runs,
shared corpora.

A mixin of `RunStore` (kept apart so store.py stays readable); every method opens one session
scope like the rest of the store. Status changes still go through `RunStore.transition`/`recover`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from schemas.models import Run, StageAttempt, utcnow
from schemas.status import RunStatus, Stage


class ClusterQueries:
    _session: Any  # RunStore's session scope

    def start_attempt(self, run_id: str, stage: Stage, dispatcher_id: str) -> int:
        with self._session() as session:
            previous = session.scalars(
                select(StageAttempt.attempt).where(
                    StageAttempt.run_id == run_id, StageAttempt.stage == stage.value
                )
            ).all()
            attempt = max(previous, default=0) + 1
            session.add(StageAttempt(run_id=run_id, stage=stage.value, attempt=attempt, dispatcher_id=dispatcher_id))
            session.execute(update(Run).where(Run.id == run_id).values(stage=stage.value))
            return attempt

    def finish_attempt(
        self, run_id: str, stage: Stage, attempt: int, outcome: str, error: str | None = None
    ) -> None:
        with self._session() as session:
            session.execute(
                update(StageAttempt)
                .where(StageAttempt.run_id == run_id, StageAttempt.stage == stage.value,
                       StageAttempt.attempt == attempt)
                .values(outcome=outcome, error=error, finished_at=utcnow())
            )

    def close_open_attempts(self, run_id: str, outcome: str, error: str | None = None, *,
                            dispatcher_id: str | None = None) -> None:
        """Finish the run's unfinished attempts (only `dispatcher_id`'s, when given)."""
        where = [StageAttempt.run_id == run_id, StageAttempt.finished_at.is_(None)]
        if dispatcher_id is not None:
            where.append(StageAttempt.dispatcher_id == dispatcher_id)
        with self._session() as session:
            session.execute(update(StageAttempt).where(*where).values(outcome=outcome, error=error,
                                                                        finished_at=utcnow()))

    def heartbeat(self, dispatcher_id: str, run_ids: Sequence[str]) -> None:
        """Stamp the runs this dispatcher still owns (a run taken over meanwhile is not touched)."""
        if not run_ids:
            return
        with self._session() as session:
            session.execute(
                update(Run)
                .where(Run.id.in_(list(run_ids)), Run.dispatcher_id == dispatcher_id,
                       Run.status == RunStatus.RUNNING.value)
                .values(heartbeat_at=utcnow())
            )

    def stale_runs(self, timeout: float) -> list[str]:
        """Running runs whose heartbeat is older than `timeout` seconds."""
        cutoff = utcnow() - timedelta(seconds=timeout)
        with self._session() as session:
            query = select(Run.id).where(Run.status == RunStatus.RUNNING.value, Run.heartbeat_at < cutoff)
            return list(session.scalars(query))

    def owners(self, run_ids: Sequence[str]) -> dict[str, tuple[RunStatus, str | None]]:
        """Status and owning dispatcher of each run: how a dispatcher learns it lost a run."""
        with self._session() as session:
            rows = session.execute(
                select(Run.id, Run.status, Run.dispatcher_id).where(Run.id.in_(list(run_ids)))
            )
            return {rid: (RunStatus(status), owner) for rid, status, owner in rows}

    def running_owners(self) -> dict[str, str | None]:
        """Every running run and the dispatcher that owns it (for reconciling with Ray)."""
        with self._session() as session:
            rows = session.execute(
                select(Run.id, Run.dispatcher_id).where(Run.status == RunStatus.RUNNING.value)
            )
            return {run_id: owner for run_id, owner in rows}

    def corpus_builders(self) -> dict[str, str]:
        """corpus hash -> a running run whose corpus stage is building that corpus right now.

        A run is building once its corpus attempt started (`stage` is corpus) until its corpus
        result is stored; the hash comes from its fetch result.
        """
        with self._session() as session:
            rows = session.execute(
                select(Run.id, Run.results)
                .where(Run.status == RunStatus.RUNNING.value, Run.stage == Stage.CORPUS.value)
                .order_by(Run.started_at, Run.id)
            )
            building: dict[str, str] = {}
            for run_id, results in rows:
                results = results or {}
                key = (results.get(Stage.FETCH.value) or {}).get("corpus_hash")
                if key and Stage.CORPUS.value not in results:
                    building.setdefault(key, run_id)
            return building
