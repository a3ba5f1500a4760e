"""The rules the dispatcher relies on, without a Ray cluster: failure classification and backoff,
and the store's owner-conditional moves (on SQLite and PostgreSQL).

The dispatcher itself is exercised on a real multi-node cluster in tests/test_cluster.py.
"""

from __future__ import annotations

import pytest
import ray.exceptions as rex
from sqlalchemy import text

from orchestrator import pipeline
from orchestrator.store import RunStore
from schemas.errors import IllegalTransition, RepoError, StorageUnavailable
from schemas.results import FetchResult
from schemas.run import build_run_spec
from schemas.status import RunStatus, Stage


def _running(store: RunStore, owner: str) -> str:
    run = store.create_run(build_run_spec(["acme/widgets"], preset="tiny"))
    (claimed,) = store.claim(owner, 1, only={run.id})
    return claimed.id


# --- what a failure means -------------------------------------------------------------------


def test_a_dead_worker_or_node_is_retried_with_a_short_message() -> None:
    for exc in (rex.WorkerCrashedError(), rex.NodeDiedError("Task failed because the node it was running on "
                                                            "is dead or unavailable. Node IP: 127.0.0.1, ...")):
        failure = pipeline.classify(exc, Stage.TRAIN)
        assert failure.retry and not failure.cancelled
        assert failure.message.startswith(f"train worker lost ({type(exc).__name__}): ")
        assert "\n" not in failure.message and len(failure.message) < 260
        assert failure.detail == str(exc).strip()  # all of Ray's explanation goes to the run's log


def test_user_errors_fail_at_once_and_transient_ones_retry() -> None:
    wrapped = rex.RayTaskError("run_stage", "Traceback ...", RepoError("repo acme/x not found"))
    failure = pipeline.classify(wrapped, Stage.FETCH)
    assert (failure.retry, failure.message) == (False, "repo acme/x not found")
    flaky = rex.RayTaskError("run_stage", "Traceback ...", StorageUnavailable("cannot reach S3 at http://s3"))
    assert pipeline.classify(flaky, Stage.TRAIN).retry
    bug = pipeline.classify(rex.RayTaskError("run_stage", "Traceback ...", ValueError("bad")), Stage.CORPUS)
    assert not bug.retry and bug.message == "internal error in the corpus stage: ValueError: bad"
    assert pipeline.classify(rex.TaskCancelledError(), Stage.SAMPLE).cancelled


def test_backoff_doubles_up_to_a_minute() -> None:
    assert [pipeline.backoff(2.0, n) for n in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    assert pipeline.backoff(2.0, 10) == 60.0


# --- moves conditional on the owner ---------------------------------------------------------


def test_a_run_taken_over_is_neither_finished_nor_requeued_by_its_old_owner(store: RunStore) -> None:
    run_id = _running(store, "old")
    store.recover(run_id, "no heartbeat for 60s", max_recoveries=3, owner="old")
    store.claim("new", 1)
    for status in (RunStatus.SUCCEEDED, RunStatus.QUEUED, RunStatus.FAILED):
        with pytest.raises(IllegalTransition):
            store.transition(run_id, status, expected=RunStatus.RUNNING, owner="old")
    assert store.owners([run_id]) == {run_id: (RunStatus.RUNNING, "new")}
    assert store.transition(run_id, RunStatus.SUCCEEDED, expected=RunStatus.RUNNING, owner="new").status \
        is RunStatus.SUCCEEDED


def test_recovery_only_touches_the_run_as_it_was_seen(store: RunStore) -> None:
    run_id = _running(store, "old")
    store.start_attempt(run_id, Stage.TRAIN, "old")
    # Two dispatchers saw the run stale; the first recovers it and a third claims it again.
    store.recover(run_id, "its dispatcher old is gone", max_recoveries=3, owner="old")
    store.claim("third", 1)
    store.start_attempt(run_id, Stage.TRAIN, "third")
    with pytest.raises(IllegalTransition, match="no longer running under old"):
        store.recover(run_id, "its dispatcher old is gone", max_recoveries=3, owner="old")
    view = store.get_run(run_id)
    assert view.status is RunStatus.RUNNING
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT recoveries FROM runs")).scalar_one() == 1  # counted once
    assert [(a.dispatcher_id, a.outcome) for a in view.attempts] == [("old", "lost"), ("third", None)]
    # the third dispatcher's old owner cleaning up closes its own attempts, never the third's
    store.close_open_attempts(run_id, "lost", dispatcher_id="old")
    assert store.get_run(run_id).attempts[-1].outcome is None


def test_corpus_builders_are_runs_inside_their_corpus_stage(store: RunStore) -> None:
    fetch = FetchResult(repos=[], corpus_hash="c0ffee", cached=False).model_dump(mode="json")
    building, done = _running(store, "d"), _running(store, "d")
    for run_id in (building, done):
        store.record_result(run_id, Stage.FETCH, fetch)
        store.start_attempt(run_id, Stage.CORPUS, "d")
    store.record_result(done, Stage.CORPUS, {"hash": "c0ffee"})
    assert store.corpus_builders() == {"c0ffee": building}
    store.cancel(building)
    assert store.corpus_builders() == {}
