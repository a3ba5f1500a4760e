"""The run store on SQLite and on the machine's PostgreSQL: the same behaviour on both."""

from __future__ import annotations

import re
import threading
from datetime import timedelta

import pytest
from sqlalchemy import text, update

from orchestrator.store import RunStore
from schemas.errors import DatabaseUnavailable, IllegalTransition, RunNotFound, UserError
from schemas.events import Event, EventKind
from schemas.models import Run, utcnow
from schemas.run import build_run_spec
from schemas.status import TRANSITIONS, RunStatus, Stage


def _spec(name: str = "acme/widgets"):
    return build_run_spec([name], preset="tiny")


def _event(event_kind: EventKind, stage: str = "train", **data) -> Event:
    return Event(kind=event_kind, stage=stage, data=data)


def test_create_and_read_back_with_aware_timestamps(store: RunStore) -> None:
    run = store.create_run(_spec())
    view = store.get_run(run.id)
    assert view.status is RunStatus.QUEUED
    assert view.name == "widgets"
    assert view.spec["repos"][0]["location"] == "acme/widgets"
    # One normalisation for both backends: always timezone-aware UTC.
    assert view.created_at.utcoffset() == timedelta(0)
    assert view.queued_at.utcoffset() == timedelta(0)
    assert store.get_run(run.id[:6]).id == run.id  # a unique prefix is enough


def test_unknown_run_is_a_clear_error(store: RunStore) -> None:
    with pytest.raises(RunNotFound, match="no run with id 'feedface'"):
        store.get_run("feedface")


def test_transitions_follow_the_table(store: RunStore) -> None:
    run = store.create_run(_spec())
    (claimed,) = store.claim("d1", 5)
    assert claimed.status is RunStatus.RUNNING and claimed.started_at is not None
    done = store.transition(run.id, RunStatus.SUCCEEDED)
    assert done.finished_at is not None
    for target in RunStatus:
        if target not in TRANSITIONS[RunStatus.SUCCEEDED]:
            with pytest.raises(IllegalTransition, match="is succeeded"):
                store.transition(run.id, target)


def test_the_database_rejects_an_illegal_status(store: RunStore) -> None:
    run = store.create_run(_spec())
    with pytest.raises(Exception, match=r"ck_runs_status|CHECK constraint"), store.engine.begin() as conn:
        conn.execute(update(Run).where(Run.id == run.id).values(status="exploded"))


def test_cancel_is_idempotent_and_refuses_finished_runs(store: RunStore) -> None:
    run = store.create_run(_spec())
    assert store.cancel(run.id).status is RunStatus.CANCELLED
    assert store.cancel(run.id).status is RunStatus.CANCELLED
    other = store.create_run(_spec())
    store.claim("d1", 1)
    store.transition(other.id, RunStatus.FAILED, error="boom")
    with pytest.raises(IllegalTransition, match="already failed"):
        store.cancel(other.id)


def test_resume_requeues_failed_runs_only(store: RunStore) -> None:
    run = store.create_run(_spec())
    with pytest.raises(IllegalTransition, match="only failed or cancelled"):
        store.resume(run.id)
    store.claim("d1", 1)
    store.transition(run.id, RunStatus.FAILED, error="worker exploded")
    view = store.resume(run.id)
    assert view.status is RunStatus.QUEUED and view.error is None and view.finished_at is None


def test_resume_takes_back_a_running_run_whose_heartbeat_stopped(store: RunStore) -> None:
    run = store.create_run(_spec())
    store.claim("d1", 1)
    store.heartbeat("d1", [run.id])
    with pytest.raises(IllegalTransition, match=r"running \(heartbeat \d+s ago\): only failed or cancelled runs "
                                                r"can be resumed \(or running ones with no heartbeat for over 60s\)"):
        store.resume(run.id, stale_after=60)
    with store.engine.begin() as conn:
        conn.execute(update(Run).where(Run.id == run.id).values(heartbeat_at=utcnow() - timedelta(minutes=5)))
    with pytest.raises(IllegalTransition, match="only failed or cancelled runs can be resumed"):
        store.resume(run.id)  # without stale_after, as before
    attempt = store.start_attempt(run.id, Stage.FETCH, "d1")
    view = store.resume(run.id, stale_after=60)
    assert view.status is RunStatus.QUEUED and store.owners([run.id])[run.id] == (RunStatus.QUEUED, None)
    assert [a.outcome for a in view.attempts] == ["lost"] and attempt == 1
    assert any(re.fullmatch(r"lost: no heartbeat for 30\ds; resumed by user", line.message)
               for line in store.logs(run.id))
    assert store.claim("d2", 1)[0].id == run.id  # and any dispatcher can take it
    # A resume by hand spends none of the automatic recoveries: the first one still queues it.
    assert store.recover(run.id, "no heartbeat", max_recoveries=1).status is RunStatus.QUEUED


def test_resume_leaves_a_run_another_dispatcher_took_meanwhile(store: RunStore, monkeypatch) -> None:
    """A serve recovers the stale run and another claims it between resume's reads: the fresh
    claim stands (the owner is read before the heartbeat, and the move is conditional on it)."""
    run = store.create_run(_spec())
    store.claim("d1", 1)
    with store.engine.begin() as conn:
        conn.execute(update(Run).where(Run.id == run.id).values(heartbeat_at=utcnow() - timedelta(minutes=5)))
    owners = store.owners

    def owners_then_taken(ids):
        seen = owners(ids)
        store.recover(run.id, "no heartbeat", max_recoveries=5)
        store.claim("d2", 1)
        return seen

    monkeypatch.setattr(store, "owners", owners_then_taken)
    with pytest.raises(IllegalTransition, match=r"is running \(heartbeat 0s ago\)"):
        store.resume(run.id, stale_after=60)
    monkeypatch.undo()
    assert store.owners([run.id])[run.id] == (RunStatus.RUNNING, "d2")


def test_claims_never_hand_a_run_to_two_dispatchers(store: RunStore) -> None:
    ids = {store.create_run(_spec(f"acme/r{i}")).id for i in range(12)}
    got: dict[str, list[str]] = {}

    def worker(name: str) -> None:
        mine: list[str] = []
        for _ in range(6):
            mine += [v.id for v in store.claim(name, 2)]
        got[name] = mine

    threads = [threading.Thread(target=worker, args=(f"d{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [rid for ids_ in got.values() for rid in ids_]
    assert sorted(claimed) == sorted(ids)  # every run once, none twice
    with store.engine.connect() as conn:
        claims = conn.execute(text("SELECT claims FROM runs")).scalars().all()
    assert claims == [1] * 12


def test_claim_can_be_restricted_to_some_runs(store: RunStore) -> None:
    a = store.create_run(_spec("acme/a"))
    b = store.create_run(_spec("acme/b"))
    assert [v.id for v in store.claim("d1", 5, only={b.id})] == [b.id]
    assert store.get_run(a.id).status is RunStatus.QUEUED


def test_events_become_metrics_artifacts_logs_and_attempt_nodes(store: RunStore) -> None:
    run = store.create_run(_spec())
    store.claim("d1", 1)
    attempt = store.start_attempt(run.id, Stage.TRAIN, "d1")
    store.apply_events(run.id, [
        _event(EventKind.NODE, node_id="node-a"),
        _event(EventKind.PROGRESS, step=10, total=60),
        _event(EventKind.METRIC, step=10, train_loss=3.0, lr=0.002, chars_per_sec=1000.0),
        _event(EventKind.METRIC, step=10, val_loss=2.5),
        _event(EventKind.ARTIFACT, kind="checkpoint", key=f"runs/{run.id}/checkpoints/step-10.pt",
               size=123, sha256="ab" * 32, meta={"step": 10, "val_loss": 2.5}),
        _event(EventKind.LOG, message="step 10: loss 3.0"),
    ])
    store.finish_attempt(run.id, Stage.TRAIN, attempt, "succeeded")
    view = store.get_run(run.id)
    status = view.to_status_json()
    assert status["progress"] == {"step": 10, "total_steps": 60}
    assert status["metrics"] == {"train_loss": 3.0, "val_loss": 2.5, "best_val_loss": 2.5, "chars_per_sec": 1000.0}
    assert status["checkpoints"] == [{"step": 10, "key": f"runs/{run.id}/checkpoints/step-10.pt", "val_loss": 2.5}]
    assert [(a.stage, a.node_id, a.outcome) for a in view.attempts] == [(Stage.TRAIN, "node-a", "succeeded")]
    assert [m.step for m in store.metrics(run.id)] == [10]
    assert [line.message for line in store.logs(run.id)] == ["step 10: loss 3.0"]


def test_a_resumed_history_rewinds_past_the_checkpoint(store: RunStore) -> None:
    run = store.create_run(_spec())
    store.apply_events(run.id, [_event(EventKind.METRIC, step=s, train_loss=5.0 - s / 10) for s in (10, 20, 30, 40)])
    # The worker died after step 40; the last checkpoint was step 20, so training resumes there.
    store.apply_events(run.id, [_event(EventKind.METRIC, step=30, train_loss=1.0)])
    assert [(m.step, m.train_loss) for m in store.metrics(run.id)] == [(10, 4.0), (20, 3.0), (30, 1.0)]


def test_stale_runs_are_recovered_then_given_up(store: RunStore) -> None:
    run = store.create_run(_spec())
    store.claim("d1", 1)
    with store.engine.begin() as conn:
        conn.execute(update(Run).where(Run.id == run.id).values(heartbeat_at=utcnow() - timedelta(minutes=5)))
    assert store.stale_runs(60) == [run.id]
    assert store.recover(run.id, "no heartbeat", max_recoveries=1).status is RunStatus.QUEUED
    store.claim("d2", 1)
    final = store.recover(run.id, "no heartbeat", max_recoveries=1)
    assert final.status is RunStatus.FAILED
    assert final.error.startswith("lost: no heartbeat")


def test_list_filters_and_orders_newest_first(store: RunStore) -> None:
    ids = [store.create_run(_spec(f"acme/n{i}")).id for i in range(3)]
    store.cancel(ids[0])
    assert [r.id for r in store.list_runs()] == ids[::-1]
    assert [r.id for r in store.list_runs(status=RunStatus.CANCELLED)] == [ids[0]]
    assert [r.id for r in store.list_runs(name_glob="n[12]")] == ids[:0:-1]
    assert len(store.list_runs(limit=2)) == 2


def test_an_ambiguous_prefix_is_refused(store: RunStore) -> None:
    for new_id in ("abcd00000001", "abcd00000002"):
        run = store.create_run(_spec())
        with store.engine.begin() as conn:
            conn.execute(update(Run).where(Run.id == run.id).values(id=new_id))
    with pytest.raises(UserError, match="ambiguous"):
        store.get_run("abcd")
    assert store.get_run("abcd00000002").id == "abcd00000002"
    with pytest.raises(RunNotFound, match=r"no run with id 'abc' \(a prefix needs at least 4 characters\)"):
        store.get_run("abc")


def test_unreachable_database_is_one_clear_line() -> None:
    st = RunStore("postgresql://postgres:hunter2@127.0.0.1:1/nothing")
    with pytest.raises(DatabaseUnavailable) as info:
        st.get_run("abcdef")
    message = str(info.value)
    assert message.startswith("cannot reach the database at postgresql://postgres:***@127.0.0.1:1/nothing: ")
    assert "Connection refused" in message
    assert "hunter2" not in message and "\n" not in message


@pytest.mark.parametrize("url, message", [
    ("notaurl", "cannot read database URL 'notaurl'"),
    ("bogus://u:secret@host/db", "unknown database in URL bogus://u:***@host/db: use sqlite:/// or postgresql://"),
    ("mysql://u:secret@host/db", "no driver for database URL mysql://u:***@host/db: MySQLdb is not installed"),
])
def test_database_urls_charforge_cannot_use_are_one_line(url: str, message: str) -> None:
    with pytest.raises(UserError) as info:
        RunStore(url)
    assert str(info.value) == message


def test_upgrade_from_the_first_revision_keeps_runs(tmp_path) -> None:
    from orchestrator import db

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = db.make_engine(url)
    db.upgrade(engine, "0001")
    assert not db.is_current(engine)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO runs (id, name, status, spec, created_at, claims, recoveries) "
            "VALUES ('abcdef123456', 'old', 'queued', '{}', '2026-01-01 00:00:00', 0, 0)"
        ))
    db.upgrade(engine)
    assert db.is_current(engine)
    with engine.connect() as conn:
        names = {row[1] for row in conn.execute(text("PRAGMA index_list('runs')"))}
        assert {"ix_runs_created", "ix_runs_status_queued"} <= names
        assert conn.execute(text("SELECT name FROM runs")).scalar_one() == "old"


def test_the_migrations_build_exactly_the_models(store: RunStore) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from schemas.models import Base

    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
