"""`charforge serve` processes against a real multi-node Ray cluster and PostgreSQL (issue 6).

The cluster comes from tests/test_cluster_support.py (one per module). Each serve is a real
`charforge serve` subprocess with RAY_ADDRESS set: it joins the cluster with the session's Ray
token (tests/conftest.py puts RAY_AUTH_TOKEN in the environment every process inherits).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import text

from orchestrator.store import RunStore
from schemas.models import utcnow
from schemas.run import build_run_spec
from schemas.status import TERMINAL, RunStatus, Stage
from tests.gitserver import source_files
from tests.test_cluster_support import (
    Serve,
    StageWatcher,
    alive,
    assert_attempts_never_overlap,
    stage_processes,
    titled_processes,
    wait_until,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture
def deployment(tmp_path, git_server, fresh_postgres_url, ray_cluster):
    """What every `charforge serve` here is given: the cluster, PostgreSQL, shared storage."""
    url = fresh_postgres_url()
    store = RunStore(url, migrate=True)
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_cluster.address,
        "CHARFORGE_HOME": str(tmp_path / "home"),
        "CHARFORGE_DATABASE_URL": url,
        "CHARFORGE_STORAGE_URL": (tmp_path / "store").as_uri(),
        "CHARFORGE_GIT_BASE_URL": git_server.base_url,
        "CHARFORGE_ACCELERATOR": "accel",
        "CHARFORGE_TRAIN_CPUS": "1",
        "CHARFORGE_RETRY_BACKOFF": "0.2",
        "CHARFORGE_HEARTBEAT_TIMEOUT": "4",
    }
    serves: list[Serve] = []

    def serve(*args: str) -> Serve:
        s = Serve(env, tmp_path / f"serve-{len(serves)}.log", *args)
        serves.append(s)
        return s

    yield store, env, serve
    for s in serves:
        s.stop()
    store.close()


def _claims(store: RunStore) -> dict[str, int]:
    with store.engine.connect() as conn:
        return {rid: claims for rid, claims in conn.execute(text("SELECT id, claims FROM runs"))}


def _finished(store: RunStore, ids, what: str, timeout: float = 150.0):
    return wait_until(lambda: (v := store.get_runs(ids)) and all(x.status in TERMINAL for x in v) and v,
                      what, timeout, interval=0.25)


def test_stage_watcher_counts_workers_not_their_forked_children(tmp_path):
    """A worker titled `ray::charforge-<stage>-<run>` that forks (as it does to run git) shows its
    title in the child until the child execs: one worker, not a stage running twice. A second
    worker with the same title is a double."""
    title = "ray::charforge-corpus-feedfacecafe"
    # a subshell is a fork that never execs: it keeps its parent's command line
    script = "(sleep 30; true) & sleep 30"
    first = subprocess.Popen(["bash", "-c", f"exec -a '{title}' bash -c '{script}'"], start_new_session=True)
    second = None
    try:
        key = ("feedfacecafe", "corpus")
        wait_until(lambda: len(titled_processes(title)) >= 2, "the worker and its forked child", 10, interval=0.05)
        assert stage_processes()[key] == [first.pid]
        second = subprocess.Popen(["bash", "-c", f"exec -a '{title}' sleep 30"], start_new_session=True)
        wait_until(lambda: len(stage_processes().get(key, [])) == 2, "a second worker counted", 10, interval=0.05)
        assert sorted(stage_processes()[key]) == sorted([first.pid, second.pid])
    finally:
        for proc in (first, second):
            if proc is not None:
                os.killpg(proc.pid, signal.SIGKILL)  # the process, its subshell and their sleeps
                proc.wait()


def test_sigkill_of_serve_mid_run_loses_nothing_and_runs_nothing_twice(deployment, git_server):
    store, _env, serve = deployment
    names = [git_server.unique("acme/sigkill") for _ in range(2)]
    for name in names:
        git_server.publish(name, source_files())
    sets = ("train.max_iters=1000000", "train.time_budget=2s", "train.checkpoint_every=100")
    runs = [store.create_run(build_run_spec([n], preset="tiny", sets=sets)) for n in (*names, names[0])]
    ids = [r.id for r in runs]
    watcher = StageWatcher()
    first = serve()
    first_id = first.dispatcher_id()

    def a_training_checkpoint() -> bool:
        views = store.get_runs(ids)
        return all(v.status is RunStatus.RUNNING for v in views) and any(v.checkpoints for v in views)

    wait_until(a_training_checkpoint, "every run claimed and a checkpoint written", 90, interval=0.1)
    killed_at = utcnow()
    first.kill(signal.SIGKILL)
    second = serve()
    second_id = second.dispatcher_id()
    views = _finished(store, ids, "every run to finish under the second serve")
    watcher.stop()
    assert [v.status for v in views] == [RunStatus.SUCCEEDED] * 3, [v.error for v in views]
    assert _claims(store) == {rid: 2 for rid in ids}  # claimed by the first, then by the second
    for view in views:
        assert_attempts_never_overlap(view)
        assert {a.dispatcher_id for a in view.attempts} == {first_id, second_id}
        assert any(a.outcome == "lost" and a.dispatcher_id == first_id for a in view.attempts)
        lost = [line.message for line in store.logs(view.id) if line.message.startswith("lost: ")]
        # Recovered once. Which sign came first depends on how fast the second serve started:
        # the first's relay actor gone (confirmed a second later), or its 4 s heartbeat lapsed.
        assert len(lost) == 1 and lost[0] in (f"lost: its dispatcher {first_id} is gone",
                                              "lost: no heartbeat for 4s"), lost
    assert not watcher.doubles, watcher.doubles  # no stage ever ran in two processes at once
    assert {(rid, "train") for rid in ids} <= watcher.seen
    resumed = [v.id for v in views if any(line.message.startswith("resuming from checkpoint")
                                          for line in store.logs(v.id))]
    assert resumed  # the run that had a checkpoint continued from it
    recovered = max(a.finished_at for v in views for a in v.attempts if a.outcome == "lost")
    relaunched = min(a.started_at for v in views for a in v.attempts if a.dispatcher_id == second_id)
    print(f"serve SIGKILL: runs recovered {(recovered - killed_at).total_seconds():.1f}s and relaunched "
          f"{(relaunched - killed_at).total_seconds():.1f}s after the kill; resumed from a checkpoint: "
          f"{len(resumed)} of 3; attempts {[[(a.stage.value, a.outcome) for a in v.attempts] for v in views]}")


def test_sigterm_stops_serve_cleanly_and_queues_its_runs(deployment, git_server, ray_cluster):
    store, _env, serve = deployment
    name = git_server.unique("acme/sigterm")
    git_server.publish(name, source_files())
    run = store.create_run(build_run_spec([name], preset="tiny", sets=["train.max_iters=1000000"]))
    s = serve()
    s.dispatcher_id()

    def training_pid() -> int | None:
        for line in store.logs(run.id):
            if line.message.startswith("train attempt 1 running on node "):
                return int(line.message.rsplit("pid ", 1)[1].rstrip(")"))
        return None

    pid = wait_until(training_pid, "training to start", 90, interval=0.1)
    assert s.kill(signal.SIGTERM) == 0
    view = store.get_run(run.id)
    assert view.status is RunStatus.QUEUED
    assert [(a.stage, a.outcome) for a in view.attempts][-1] == (Stage.TRAIN, "interrupted")
    assert "runs in flight were queued again" in s.output
    wait_until(lambda: not alive(pid), "the training worker to exit", 15)
    wait_until(lambda: ray_cluster.free("accel") == 2, "the accelerator to be free again", 15)


def _submit(env: dict[str, str], names: list[str]) -> subprocess.CompletedProcess:
    charforge = os.path.join(os.path.dirname(sys.executable), "charforge")
    repos = [arg for name in names for arg in ("--repo", name)]
    return subprocess.run([charforge, "jobs", "submit", *repos, "--preset", "tiny", "--detach", "--json"],
                          env=env, capture_output=True, text=True, timeout=120, check=False)


def test_200_submissions_from_20_processes_with_two_serves_claim_each_run_once(deployment):
    import json

    store, env, serve = deployment
    env = {**env, "CHARFORGE_MAX_CONCURRENT": "25"}
    del env["RAY_ADDRESS"]  # the submitters only write runs (--detach); the serves need Ray
    serves = [serve("--max-concurrent", "25") for _ in range(2)]  # they claim as submissions arrive
    # Repos the git daemon does not serve: each run fails fast in fetch, which keeps 200 cheap.
    batches = [[f"acme/absent-{p}-{i}" for i in range(10)] for p in range(20)]
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda names: _submit(env, names), batches))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results if r.returncode]
    ids = [run["id"] for r in results for run in json.loads(r.stdout)]
    assert len(ids) == 200 and len(set(ids)) == 200
    dispatchers = {s.dispatcher_id() for s in serves}
    views = _finished(store, ids, "all 200 runs to end", timeout=240)
    assert {v.status for v in views} == {RunStatus.FAILED}
    assert all("not found" in v.error for v in views), {v.error for v in views}
    assert _claims(store) == {rid: 1 for rid in ids}
    for view in views:
        ((stage, owner),) = [(a.stage, a.dispatcher_id) for a in view.attempts]
        assert stage is Stage.FETCH and owner in dispatchers
    per_serve = {d: sum(v.attempts[0].dispatcher_id == d for v in views) for d in dispatchers}
    print(f"200 submissions: runs claimed per serve {sorted(per_serve.values())}")
