"""Cluster mode on a real multi-node Ray cluster (issue 6), driven by an in-process dispatcher.

One `ray.cluster_utils.Cluster` per module on loopback: a head (1 CPU), a CPU node and a "GPU"
node carrying the custom resource `accel` (CHARFORGE_ACCELERATOR=accel). Faults are real: a node
removed, a worker SIGKILLed, PostgreSQL and SeaweedFS stopped, a git server that stops answering.
The tests tick the dispatcher themselves (what `charforge serve` does in its loop), so each one
can act at a precise point; tests/test_cluster_serve.py runs `charforge serve` processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
from sqlalchemy import update

from orchestrator import pipeline
from orchestrator.dispatcher import Dispatcher
from orchestrator.settings import Settings, load_settings
from orchestrator.store import RunStore
from schemas.errors import TransientError
from schemas.models import Run, utcnow
from schemas.run import build_run_spec
from schemas.status import TERMINAL, RunStatus, Stage
from tests.gitserver import source_files
from tests.settings import use_embedded
from tests.test_cluster_support import (
    ACCEL,
    GitTarpit,
    alive,
    assert_resumed_not_restarted,
    stage_processes,
    wait_until,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture
def env(tmp_path, git_server, monkeypatch, ray_cluster):
    """A fresh store (SQLite) and storage (a directory every node sees) for each test."""
    use_embedded(monkeypatch, tmp_path / "home", git_server.base_url)
    monkeypatch.setenv("CHARFORGE_STORAGE_URL", (tmp_path / "store").as_uri())
    monkeypatch.setenv("CHARFORGE_ACCELERATOR", "accel")
    monkeypatch.setenv("CHARFORGE_RETRY_BACKOFF", "0.2")
    monkeypatch.setenv("CHARFORGE_HEARTBEAT_TIMEOUT", "4")
    monkeypatch.setenv("CHARFORGE_MAX_CONCURRENT", "6")
    return monkeypatch


class Harness:
    """A store, a started dispatcher, and the loop `charforge serve` runs, one tick at a time."""

    def __init__(self, cfg: Settings, only_runs: set[str] | None = None) -> None:
        self.cfg = cfg
        self.store = RunStore(cfg.database_url, migrate=True)
        self.dispatcher = Dispatcher(self.store, cfg, only_runs=only_runs)
        self.dispatcher.start()

    def submit(self, repo: str, *sets: str):
        return self.store.create_run(build_run_spec([repo], preset="tiny", sets=sets))

    def tick(self) -> None:
        try:
            self.dispatcher.tick()
        except TransientError:
            pass  # the database or storage is away: the next tick retries, as serve does

    def drive(self, until, what: str, timeout: float = 90.0) -> None:
        return wait_until(until, what, timeout, step=self.tick)

    def finish(self, *run_ids: str, timeout: float = 120.0) -> list:
        self.drive(lambda: all(self.store.get_run(r).status in TERMINAL for r in run_ids),
                   f"runs {run_ids} to finish", timeout)
        return self.store.get_runs(run_ids)

    def attempts(self, run_id: str, stage: Stage) -> list:
        return [a for a in self.store.get_run(run_id).attempts if a.stage is stage]

    def close(self) -> None:
        self.dispatcher.stop(requeue=False)
        self.store.close()


@pytest.fixture
def harness(env):
    made: list[Harness] = []

    def make(only_runs: set[str] | None = None, **overrides) -> Harness:
        h = Harness(load_settings(**overrides), only_runs)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def _long_training(budget: str = "3s") -> tuple[str, ...]:
    """Tiny training that runs for `budget` (the budget spans attempts), checkpointing often."""
    return ("train.max_iters=1000000", f"train.time_budget={budget}", "train.checkpoint_every=100",
            "train.eval_val_every=100")


# --- placement and the corpus cache ---------------------------------------------------------


def test_six_runs_on_three_corpora_train_only_on_the_accelerator_node(harness, git_server, ray_cluster):
    h = harness()
    repos = [git_server.unique("acme/six") for _ in range(3)]
    for i, name in enumerate(repos):
        git_server.publish(name, {**source_files(), "extra.py": f"x = {i}\n"})
    runs = [h.submit(name) for name in repos for _ in range(2)]
    views = h.finish(*(r.id for r in runs), timeout=150)
    assert [v.status for v in views] == [RunStatus.SUCCEEDED] * 6, [v.error for v in views]
    for view in views:
        by_stage = {a.stage: a for a in view.attempts}
        assert set(by_stage) == set(Stage), view.attempts
        assert by_stage[Stage.TRAIN].node_id == ray_cluster.gpu_node_id
        assert by_stage[Stage.SAMPLE].node_id == ray_cluster.gpu_node_id
        # fetch and corpus run on nodes without the accelerator (there are two of them)
        assert by_stage[Stage.FETCH].node_id in ray_cluster.cpu_node_ids
        assert by_stage[Stage.CORPUS].node_id in ray_cluster.cpu_node_ids
    # each corpus was built once; its second run reused it from the cache
    for i in range(3):
        pair = views[2 * i: 2 * i + 2]
        assert pair[0].corpus["key"] == pair[1].corpus["key"]
        assert sorted(v.corpus["cached"] for v in pair) == [False, True]
    assert len({v.corpus["key"] for v in views}) == 3


def test_concurrent_builds_of_one_corpus_agree(env, git_server, ray_cluster):
    """Two dispatchers may build one corpus at once: both builds succeed and write the same bytes."""
    import ray

    from workers.remote import ProgressRelay, StageContext, run_stage

    name = git_server.unique("acme/twice")
    git_server.publish(name, source_files())
    # The git server answers the fetch, then holds both clones until both builds are under way.
    tarpit = GitTarpit(git_server.port, allow=1)
    cfg = load_settings()
    spec = build_run_spec([name], preset="tiny")
    ctx = StageContext(run_id="c0ffee000001", storage_url=cfg.storage_url, s3_endpoint_url=None,
                       git_base_url=tarpit.base_url, num_threads=1, use_accelerator=False)
    relay = ProgressRelay.remote()
    fetch = ray.get(run_stage.remote(Stage.FETCH, ctx, pipeline.stage_inputs(Stage.FETCH, "x", spec, {}), relay))
    assert not fetch.cached
    inputs = pipeline.stage_inputs(Stage.CORPUS, "x", spec, {Stage.FETCH: fetch})
    refs = [run_stage.remote(Stage.CORPUS, ctx, inputs, relay) for _ in range(2)]
    wait_until(lambda: tarpit.connections == 3, "both builds to start cloning")
    tarpit.release()
    both = ray.get(refs)
    assert [r.cached for r in both] == [False, False]  # both built it: neither found it stored
    assert both[0].text_key == both[1].text_key and both[0].bytes == both[1].bytes
    storage = cfg.storage()
    text = storage.get_bytes(both[0].text_key)
    manifest = json.loads(storage.get_bytes(both[0].manifest_key))
    assert manifest["text"]["sha256"] == hashlib.sha256(text).hexdigest()
    assert len(text) == both[0].bytes
    ray.kill(relay)
    tarpit.close()


# --- workers and nodes that die mid-training ------------------------------------------------


def _training_underway(h: Harness, run_id: str, min_step: int = 100):
    """Wait until training has stored a checkpoint at `min_step` or later; returns (step, worker)."""
    def ready():
        view = h.store.get_run(run_id)
        steps = [c.meta.get("step") or 0 for c in view.checkpoints]
        worker = h.dispatcher.flights[run_id].worker if run_id in h.dispatcher.flights else None
        return view.stage is Stage.TRAIN and steps and max(steps) >= min_step and worker and (max(steps), worker)
    return h.drive(ready, "a training checkpoint")


def test_a_killed_training_worker_resumes_from_its_checkpoint(harness, git_server, ray_cluster):
    """Issue 4: SIGKILL the Ray worker process that trains; the run resumes, not restarts."""
    h = harness()
    name = git_server.unique("acme/worker-kill")
    git_server.publish(name, source_files())
    run = h.submit(name, *_long_training())
    seen_step, (node, pid) = _training_underway(h, run.id)
    killed_at = utcnow()
    os.kill(pid, 9)
    (final,) = h.finish(run.id)
    assert final.status is RunStatus.SUCCEEDED, final.error
    first, *_, last = h.attempts(run.id, Stage.TRAIN)
    assert (first.outcome, first.node_id) == ("retried", node)
    assert "train worker lost" in first.error
    assert (last.outcome, last.node_id) == ("succeeded", ray_cluster.gpu_node_id)
    resumed = assert_resumed_not_restarted(h.store, run.id, seen_step, killed_at)
    print(f"worker kill: checkpoint seen {seen_step}, resumed from {resumed}, "
          f"train attempts {[a.outcome for a in h.attempts(run.id, Stage.TRAIN)]}")


def test_losing_the_accelerator_node_mid_training_resumes_on_a_new_one(harness, git_server, ray_cluster):
    h = harness()
    name = git_server.unique("acme/node-kill")
    git_server.publish(name, source_files())
    run = h.submit(name, *_long_training())
    seen_step, (node, _pid) = _training_underway(h, run.id)
    assert node == ray_cluster.gpu_node_id
    killed_at = utcnow()
    ray_cluster.kill_gpu_node()
    # Training waits for an accelerator: none is left until a fresh node joins.
    h.drive(lambda: h.attempts(run.id, Stage.TRAIN)[0].outcome == "retried", "the loss to be noticed")
    new_node = ray_cluster.add_gpu_node()
    (final,) = h.finish(run.id)
    assert final.status is RunStatus.SUCCEEDED, final.error
    train = h.attempts(run.id, Stage.TRAIN)
    assert (train[0].node_id, train[0].outcome) == (node, "retried")
    assert (train[-1].node_id, train[-1].outcome) == (new_node, "succeeded")
    sample = h.attempts(run.id, Stage.SAMPLE)
    assert [a.node_id for a in sample] == [new_node]
    resumed = assert_resumed_not_restarted(h.store, run.id, seen_step, killed_at)
    print(f"node kill: checkpoint seen {seen_step}, resumed from {resumed}, "
          f"train attempts {[(a.outcome, a.error) for a in train]}")


def test_a_dead_progress_relay_gives_the_runs_back_and_they_resume(harness, git_server):
    """The dispatcher's relay actor dies: its runs are queued again (resuming), a new relay serves."""
    import ray

    h = harness()
    name = git_server.unique("acme/relay")
    git_server.publish(name, source_files())
    run = h.submit(name, *_long_training())
    seen_step, _worker = _training_underway(h, run.id)
    ray.kill(h.dispatcher._relay)
    (final,) = h.finish(run.id)
    assert final.status is RunStatus.SUCCEEDED, final.error
    assert [a.outcome for a in h.attempts(run.id, Stage.TRAIN)] == ["interrupted", "succeeded"]
    logs = [line.message for line in h.store.logs(run.id)]
    assert any(m.endswith("stopped: queued again") for m in logs)
    resumed = [m for m in logs if m.startswith("resuming from checkpoint")]
    assert resumed and int(resumed[-1].rsplit(" ", 1)[1]) >= seen_step


# --- cancel everywhere ----------------------------------------------------------------------


@pytest.mark.parametrize("stage", list(Stage), ids=lambda s: s.value)
def test_cancel_during_each_stage_kills_its_task(stage, harness, env, git_server, ray_cluster):
    import ray

    name = git_server.unique(f"acme/cancel-{stage.value}")
    git_server.publish(name, source_files())
    tarpit = None
    if stage in (Stage.FETCH, Stage.CORPUS):  # the git server hangs: fetch (or the clone) never ends
        tarpit = GitTarpit(git_server.port, allow=0 if stage is Stage.FETCH else 1)
        env.setenv("CHARFORGE_GIT_BASE_URL", tarpit.base_url)
    sets = {Stage.TRAIN: ("train.max_iters=1000000",), Stage.SAMPLE: ("sample.length=1000000",)}
    h = harness()
    run = h.submit(name, *sets.get(stage, ()))
    resource = ACCEL if stage in (Stage.TRAIN, Stage.SAMPLE) else "CPU"
    total = ray.cluster_resources()[resource]

    def running_on_a_worker():
        flight = h.dispatcher.flights.get(run.id)
        return flight is not None and flight.stage is stage and flight.ref is not None and flight.worker

    _node, pid = h.drive(running_on_a_worker, f"the {stage.value} stage to run")
    assert alive(pid) and ray_cluster.free(resource) < total
    h.store.cancel(run.id)  # what `charforge jobs cancel` does: the store only
    h.tick()
    dialled = tarpit.connections if tarpit else 0
    assert run.id not in h.dispatcher.flights
    wait_until(lambda: not alive(pid), "the stage's worker process to exit", 15)
    wait_until(lambda: ray_cluster.free(resource) == total, f"the {resource} to be free again", 15)
    final = h.store.get_run(run.id)
    assert final.status is RunStatus.CANCELLED
    assert (final.attempts[-1].stage, final.attempts[-1].outcome) == (stage, "cancelled")
    for _ in range(5):  # nothing starts again, nothing moves on, no worker runs it
        h.tick()
        assert not [key for key in stage_processes() if key[0] == run.id]
        time.sleep(0.2)
    after = h.store.get_run(run.id)
    assert (after.attempts, after.step) == (final.attempts, final.step)
    if tarpit:
        assert tarpit.connections == dialled  # no worker went on to reach the git server
        tarpit.close()


def test_cancel_in_the_hand_off_between_stages(harness, git_server):
    h = harness()
    d = h.dispatcher
    name = git_server.unique("acme/hand-off")
    git_server.publish(name, source_files())
    run = h.submit(name)
    h.drive(lambda: run.id in d.flights, "the claim")
    # Settle finished stages without launching the next one (the first half of a tick), so the
    # run sits between fetch and corpus: fetch's result is stored, corpus not started.
    wait_until(lambda: Stage.FETCH in d.flights[run.id].results, "fetch to finish",
               step=lambda: (d._relay_events(), d._collect()))
    assert h.store.results(run.id).keys() == {"fetch"}
    h.store.cancel(run.id)
    for _ in range(3):
        h.tick()
    final = h.store.get_run(run.id)
    assert final.status is RunStatus.CANCELLED and run.id not in d.flights
    assert [(a.stage, a.outcome) for a in final.attempts] == [(Stage.FETCH, "succeeded")]


def test_cancel_while_queued_claimed_and_while_a_retry_waits(harness, env, git_server):
    env.setenv("CHARFORGE_RETRY_BACKOFF", "30")
    h = harness()
    d = h.dispatcher
    name = git_server.unique("acme/retry-cancel")
    git_server.publish(name, source_files())
    queued = h.submit(name)
    h.store.cancel(queued.id)
    claimed = h.submit(name)
    d._claim()  # claimed, its first stage not launched yet
    assert h.store.get_run(claimed.id).status is RunStatus.RUNNING
    h.store.cancel(claimed.id)
    h.tick()
    assert claimed.id not in d.flights and h.store.get_run(claimed.id).attempts == []
    assert queued.id not in d.flights and h.store.get_run(queued.id).started_at is None  # never claimed

    run = h.submit(name, "train.max_iters=1000000")
    _step, (_node, pid) = _training_underway(h, run.id, min_step=100)
    os.kill(pid, 9)  # an infrastructure failure: the retry waits 30 s (CHARFORGE_RETRY_BACKOFF)
    h.drive(lambda: h.attempts(run.id, Stage.TRAIN)[0].outcome == "retried", "the retry to be planned")
    assert d.flights[run.id].retry_at is not None
    h.store.cancel(run.id)
    h.tick()
    assert run.id not in d.flights
    final = h.store.get_run(run.id)
    assert final.status is RunStatus.CANCELLED
    assert [a.outcome for a in h.attempts(run.id, Stage.TRAIN)] == ["retried"]  # the retry never started


# --- heartbeats and dispatchers that are gone -----------------------------------------------


def test_runs_of_dead_dispatchers_are_recovered_never_running_forever(harness, env, ray_cluster):
    """Runs marked running by dispatchers that are gone: recovered within the timeout."""
    from orchestrator import ray_runtime

    env.setenv("CHARFORGE_MAX_RECOVERIES", "2")
    h = harness(only_runs=set())  # watch the recovery; claim nothing
    store = h.store
    here = f"-r{ray_runtime.cluster_tag()}"
    ghosts = {
        "same-cluster": f"ghost-1-aaaaaa{here}",  # on this Ray cluster: its relay actor is missing
        "elsewhere": "ghost-2-bbbbbb-rffffff",  # another cluster: only its heartbeat tells
        "too-often": f"ghost-3-cccccc{here}",  # lost twice before: this time it fails
    }
    runs = {}
    for label, ghost in ghosts.items():
        run = store.create_run(build_run_spec(["acme/ghost"], preset="tiny"))
        (claimed,) = store.claim(ghost, 1)
        store.start_attempt(run.id, Stage.TRAIN, ghost)
        runs[label] = claimed.id
    with store.engine.begin() as conn:
        conn.execute(update(Run).where(Run.id == runs["too-often"]).values(recoveries=2))
    # Each ghost heartbeat its run just now (the claim stamps it); none will again.
    started, took = time.monotonic(), {}

    def all_recovered() -> bool:
        for label, rid in runs.items():
            if label not in took and store.get_run(rid).status is not RunStatus.RUNNING:
                took[label] = round(time.monotonic() - started, 1)
        return len(took) == len(runs)

    h.drive(all_recovered, "every ghost's run to be recovered", timeout=30)
    views = {label: store.get_run(rid) for label, rid in runs.items()}
    assert views["same-cluster"].status is RunStatus.QUEUED
    assert views["elsewhere"].status is RunStatus.QUEUED
    assert views["too-often"].status is RunStatus.FAILED
    assert views["too-often"].error.startswith("lost: its dispatcher ghost-3-cccccc")
    assert "gave up after 2 recoveries" in views["too-often"].error
    logs = {label: [line.message for line in store.logs(rid)] for label, rid in runs.items()}
    assert f"lost: its dispatcher {ghosts['same-cluster']} is gone" in logs["same-cluster"]
    assert "lost: no heartbeat for 4s" in logs["elsewhere"]
    for view in views.values():
        assert [(a.outcome, a.finished_at is not None) for a in view.attempts] == [("lost", True)]
    assert all(owner is None for _status, owner in store.owners(list(runs.values())).values())
    # (The ghosts on this cluster are found gone at once, confirmed 1 s later; the other only
    # when its heartbeat is older than the 4 s timeout. The reasons in the logs above say which.)
    print(f"dead dispatchers: seconds until recovered {took}")


# --- the database and the object store going away ---------------------------------------------


def _outage(h: Harness, ticks: int = 25) -> int:
    """Keep ticking while a service is down (as serve does); returns how many ticks failed."""
    failed = 0
    for _ in range(ticks):
        try:
            h.dispatcher.tick()
        except TransientError:
            failed += 1
        time.sleep(0.1)
    return failed


def test_postgresql_stopping_mid_run_loses_nothing(harness, env, git_server, throwaway_postgres):
    pg = throwaway_postgres()
    env.setenv("CHARFORGE_DATABASE_URL", pg.url)
    h = harness()
    name = git_server.unique("acme/pg-outage")
    git_server.publish(name, source_files())
    run = h.submit(name, *_long_training())
    _training_underway(h, run.id, min_step=100)
    pg.stop()
    failed = _outage(h)  # ~3 s without the database; training goes on in Ray meanwhile
    pg.start()
    (final,) = h.finish(run.id)
    assert failed > 0 and final.status is RunStatus.SUCCEEDED, final.error
    assert [a.outcome for a in h.attempts(run.id, Stage.TRAIN)] == ["succeeded"]
    # what the worker reported during the outage was kept and written afterwards
    logged = [p.step for p in h.store.metrics(run.id) if p.train_loss is not None]
    assert logged == list(range(5, logged[-1] + 1, 5))
    print(f"postgres outage: {failed} ticks failed; run {final.status.value}, {len(logged)} train-loss points")


def test_seaweedfs_restarting_during_checkpoint_uploads(harness, env, git_server, seaweedfs_factory):
    server = seaweedfs_factory()
    for key, value in server.env().items():  # the cluster's workers already hold these credentials
        env.setenv(key, value)
    env.setenv("CHARFORGE_MAX_ATTEMPTS", "5")
    env.setenv("CHARFORGE_RETRY_BACKOFF", "1")
    h = harness()
    name = git_server.unique("acme/s3-outage")
    git_server.publish(name, source_files())
    # a checkpoint every 10 steps: an upload is under way at almost any moment
    run = h.submit(name, "train.max_iters=1000000", "train.time_budget=3s", "train.checkpoint_every=10")
    _training_underway(h, run.id, min_step=50)
    server.stop()
    _outage(h, ticks=20)
    server.start()
    (final,) = h.finish(run.id)
    train = h.attempts(run.id, Stage.TRAIN)
    print(f"seaweedfs restart: run {final.status.value}; train attempts {[(a.outcome, a.error) for a in train]}")
    assert final.status is RunStatus.SUCCEEDED, final.error
    assert final.sample_batches
    # The outage hit an upload (one every 10 steps), and the stage was retried, resuming, not restarting.
    assert train[0].outcome == "retried" and "S3" in (train[0].error or ""), train
    assert any(line.message.startswith("resuming from checkpoint at step ") for line in h.store.logs(run.id))
