"""The whole path, as a user drives it: `charforge jobs submit` -> fetch -> corpus -> train -> sample.

Real git (a `git daemon` on loopback), real local Ray, real training, real storage; once on the
embedded default (SQLite + a local directory) and once on PostgreSQL + SeaweedFS over HTTP.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.dispatcher import Dispatcher
from orchestrator.settings import load_settings
from orchestrator.store import RunStore
from schemas.run import build_run_spec
from schemas.status import RunStatus, Stage
from tests.gitserver import source_files
from tests.settings import use_embedded

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


@pytest.fixture
def env(tmp_path, git_server, monkeypatch):
    """The embedded default under a temporary CHARFORGE_HOME, resolving owner/name on our daemon."""
    use_embedded(monkeypatch, tmp_path / "home", git_server.base_url)
    monkeypatch.setenv("CHARFORGE_RETRY_BACKOFF", "0.2")
    return monkeypatch


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result


def submit_json(*args: str):
    result = invoke("jobs", "submit", *args, "--json")
    runs = json.loads(result.stdout) if result.stdout.strip().startswith("[") else None
    return result, runs


def _check_succeeded_run(status: dict, storage) -> None:
    assert status["status"] == "succeeded", status["error"]
    assert status["stage"] == "sample"
    assert status["repos"][0]["commit"] and len(status["repos"][0]["commit"]) == 40
    corpus = status["corpus"]
    assert corpus["files"] > 0 and corpus["bytes"] > 0 and corpus["vocab_size"] > 10
    manifest = json.loads(storage.get_bytes(corpus["manifest_key"]))
    kept = [f["path"] for f in manifest["files"]]
    assert kept and not any(p == ".git" or p.startswith(".git/") for p in kept)
    text = storage.get_bytes(corpus["key"]).decode()
    assert "def " in text and "[core]" not in text  # sources in, .git/config out
    assert status["checkpoints"] and all(storage.exists(c["key"]) for c in status["checkpoints"])
    (batch,) = status["samples"]
    records = [json.loads(line) for line in storage.get_bytes(batch["key"]).splitlines()]
    assert len(records) == batch["n"] == 16 and all(len(r["text"]) >= 500 for r in records)
    assert status["progress"]["step"] == status["progress"]["total_steps"] == 60
    assert status["metrics"]["train_loss"] > 0 and status["metrics"]["best_val_loss"] > 0
    assert status["metrics"]["chars_per_sec"] > 0
    assert [a["stage"] for a in status["attempts"]] == ["fetch", "corpus", "train", "sample"]


def test_submit_runs_to_the_end_on_the_embedded_default(env, git_server, tmp_path):
    git_server.publish("acme/widgets", source_files())
    result, runs = submit_json("--repo", "acme/widgets", "--preset", "tiny")
    assert result.exit_code == 0, result.output
    (status,) = runs
    _check_succeeded_run(status, load_settings().storage())
    store = RunStore(load_settings().database_url)
    assert [m.step for m in store.metrics(status["id"])][-1] == 60

    # status answers from the database alone, with the documented object
    shown = json.loads(invoke("jobs", "status", status["id"], "--json").stdout)
    for key in ("id", "name", "status", "stage", "error", "created_at", "started_at", "finished_at",
                "repos", "corpus", "progress", "metrics", "checkpoints", "samples"):
        assert key in shown
    listed = json.loads(invoke("jobs", "list", "--json").stdout)
    assert [r["id"] for r in listed] == [status["id"]]

    out = tmp_path / "x.tar.gz"
    exported = invoke("jobs", "export", "--all", "--out", str(out))
    assert exported.exit_code == 0, exported.output
    with tarfile.open(out) as tar:
        names = tar.getnames()
        manifest_name = next(n for n in names if n.endswith("manifest.json"))
        manifest = json.loads(tar.extractfile(manifest_name).read())
    assert [r["id"] for r in manifest["runs"]] == [status["id"]]
    assert sum(n.endswith(".jsonl") for n in names) == 1


def test_two_repos_make_two_runs_that_share_nothing(env, git_server):
    git_server.publish("acme/one", source_files())
    git_server.publish("acme/two", {**source_files(), "extra.py": "print('two')\n"})
    result, runs = submit_json("--repo", "acme/one", "--repo", "acme/two", "--preset", "tiny", "--detach")
    assert result.exit_code == 0
    assert [r["status"] for r in runs] == ["queued", "queued"]
    assert runs[0]["id"] != runs[1]["id"]


def test_unknown_repo_fails_the_run_with_that_message(env, git_server):
    result, runs = submit_json("--repo", "acme/does-not-exist", "--preset", "tiny")
    assert result.exit_code == 1
    (status,) = runs
    assert status["status"] == "failed"
    assert "acme/does-not-exist" in status["error"] and "not found" in status["error"]
    assert status["error"] in result.stderr


def test_empty_repo_fails_with_a_clear_message(env, git_server):
    git_server.publish_empty("acme/empty")
    result, runs = submit_json("--repo", "acme/empty", "--preset", "tiny")
    assert result.exit_code == 1
    assert runs[0]["status"] == "failed"
    assert runs[0]["error"] == ("repository is empty (no commits on its default branch): "
                                f"acme/empty ({git_server.base_url}acme/empty)")
    # watch and logs say how it ended too
    watched = invoke("jobs", "watch", runs[0]["id"])
    assert watched.exit_code == 1
    assert watched.stderr.endswith(f"error: 1 of 1 runs did not succeed ({runs[0]['id']} failed: "
                                   f"{runs[0]['error']})\n")
    last = invoke("jobs", "logs", runs[0]["id"]).stdout.splitlines()[-1]
    assert last.endswith(f" run failed: {runs[0]['error']}")


@pytest.mark.parametrize("spec", ["--upload-pack=touch /tmp/pwned", "-oProxyCommand=x", "ext::sh -c id", "fd::3"])
def test_hostile_specs_are_refused_before_git_runs(env, spec):
    result = invoke("jobs", "submit", "--repo", spec, "--detach")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: repo spec")
    assert "refused" in result.stderr and "Traceback" not in result.output
    assert json.loads(invoke("jobs", "list", "--json").stdout) == []  # nothing was queued


def test_a_wrong_s3_key_is_refused_at_submit(env, git_server, seaweedfs):
    for key, value in seaweedfs.env(seaweedfs.storage_url("wrongkey")).items():
        env.setenv(key, value)
    env.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    result = invoke("jobs", "submit", "--repo", "acme/anything", "--preset", "tiny")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: S3 refused the request")
    assert "AWS_SECRET_ACCESS_KEY" in result.stderr and result.stderr.count("\n") == 1
    env.delenv("CHARFORGE_STORAGE_URL")
    assert json.loads(invoke("jobs", "list", "--json").stdout) == []  # nothing was queued


def test_an_unreachable_database_is_one_line(env):
    env.setenv("CHARFORGE_DATABASE_URL", "postgresql://postgres@127.0.0.1:1/charforge")
    result = invoke("jobs", "list")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot reach the database at postgresql://postgres@127.0.0.1:1/")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_a_home_or_storage_folder_that_cannot_be_made_is_one_line(env, tmp_path):
    (tmp_path / "afile").write_text("")
    env.setenv("CHARFORGE_HOME", str(tmp_path / "afile" / "home"))
    result = invoke("jobs", "list")
    assert (result.exit_code, result.stderr) == (
        1, f"error: cannot make the database's folder {tmp_path}/afile/home "
           f"(from sqlite:///{tmp_path}/afile/home/charforge.db): Not a directory\n")
    env.setenv("CHARFORGE_HOME", str(tmp_path / "home"))
    env.setenv("CHARFORGE_STORAGE_URL", f"file://{tmp_path}/afile/store")
    result = invoke("jobs", "submit", "--repo", "acme/anything", "--detach")
    assert (result.exit_code, result.stderr) == (
        1, f"error: cannot use the storage folder {tmp_path}/afile/store: Not a directory\n")


def test_an_embedded_submit_rides_out_a_database_outage(env, git_server, throwaway_postgres):
    """PostgreSQL stops for a few seconds mid-training: the dispatcher thread and the follower
    both wait for it (the follower says so), and the run ends as if nothing happened."""
    import threading

    pg = throwaway_postgres()
    env.setenv("CHARFORGE_DATABASE_URL", pg.url)
    store = RunStore(pg.url, migrate=True)  # a deployment's database: `charforge db upgrade` first
    git_server.publish("acme/outage", source_files())
    done: list = []
    submit = threading.Thread(target=lambda: done.append(submit_json(
        "--repo", "acme/outage", "--preset", "tiny", "--set", "train.max_iters=1000000",
        "--set", "train.time_budget=8s", "--set", "train.eval_val_every=100")))
    submit.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any((r.step or 0) > 50 for r in store.list_runs()):
        time.sleep(0.2)
    assert any((r.step or 0) > 50 for r in store.list_runs()), "training never got going"
    pg.stop()
    time.sleep(3)
    pg.start()
    submit.join(timeout=120)
    assert done, "submit did not return"
    result, runs = done[0]
    assert result.exit_code == 0, result.output
    assert runs[0]["status"] == "succeeded" and [a["outcome"] for a in runs[0]["attempts"]] == ["succeeded"] * 4
    assert result.stderr.count("cannot reach the database") == 1 and "waiting for it" in result.stderr  # said once
    assert result.stderr.count("the database is back") == 1


def test_a_follower_gives_up_on_a_database_that_stays_away(throwaway_postgres, capsys):
    from orchestrator.cli.follow import _Reader
    from schemas.errors import DatabaseUnavailable

    pg = throwaway_postgres()
    store = RunStore(pg.url, migrate=True)
    run = store.create_run(build_run_spec(["acme/x"], preset="tiny"))
    reader = _Reader(store, [run.id], limit=0.5)
    first = reader.read()
    pg.stop()
    assert reader.read() == first  # the last views, while it waits
    time.sleep(0.6)
    with pytest.raises(DatabaseUnavailable, match=rf"gave up waiting after 0.5s\. Once it is back, `charforge jobs "
                                                  rf"resume RUN` takes back a run this left running \({run.id}\)"):
        reader.read()
    assert capsys.readouterr().err.count("waiting for it (the runs go on)") == 1


def test_ctrl_c_cancels_the_runs_of_a_submit_cleanly(env, git_server):
    """A real SIGINT to a real `charforge jobs submit` process (its own local Ray) mid-training."""
    git_server.publish("acme/ctrl-c", source_files())
    charforge = Path(sys.executable).with_name("charforge")
    proc = subprocess.Popen(
        [str(charforge), "jobs", "submit", "--repo", "acme/ctrl-c", "--preset", "tiny",
         "--set", "train.max_iters=1000000", "--set", "train.time_budget=5m"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        store = RunStore(load_settings().database_url, migrate=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not any((r.step or 0) > 0 for r in store.list_runs()):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    [run] = store.list_runs()
    assert proc.returncode == 1, stderr
    assert "interrupted: cancelling" in stderr
    assert stderr.endswith(f"error: 1 of 1 runs did not succeed ({run.id} cancelled: cancelled by user)\n")
    view = store.get_run(run.id)
    assert view.status is RunStatus.CANCELLED and view.attempts[-1].stage is Stage.TRAIN
    assert view.attempts[-1].outcome == "cancelled"


def test_a_git_server_that_stays_down_fails_the_run_after_its_attempts(env):
    """A refused connection is transient: retried with backoff, then the run fails saying so."""
    env.setenv("CHARFORGE_GIT_BASE_URL", "git://127.0.0.1:1/")  # nothing listens on port 1
    env.setenv("CHARFORGE_MAX_ATTEMPTS", "3")
    result, runs = submit_json("--repo", "acme/down", "--preset", "tiny")
    assert result.exit_code == 1
    [run] = runs
    assert run["status"] == "failed" and run["stage"] == "fetch"
    assert run["error"].startswith("cannot reach the git server for acme/down (git://127.0.0.1:1/acme/down): ")
    assert "Connection refused" in run["error"]
    assert run["error"].endswith("(gave up after 3 attempts)")
    assert [(a["stage"], a["outcome"]) for a in run["attempts"]] == [("fetch", "retried")] * 2 + [("fetch", "failed")]


def test_a_setting_out_of_bounds_is_one_line_naming_its_variable(env):
    for name, value, message in [
        ("CHARFORGE_MAX_CONCURRENT", "0", "Input should be greater than or equal to 1 (got '0')"),
        ("CHARFORGE_MAX_CONCURRENT", "abc", "Input should be a valid integer, unable to parse string as an integer "
                                            "(got 'abc')"),
        ("CHARFORGE_HEARTBEAT_TIMEOUT", "nan", "Input should be a finite number (got 'nan')"),
    ]:
        env.setenv(name, value)
        result = invoke("jobs", "list")
        assert (result.exit_code, result.stderr) == (1, f"error: invalid setting {name}: {message}\n")
        env.delenv(name)
    serve = invoke("serve", "--max-concurrent", "0")
    assert serve.exit_code == 2 and "--max-concurrent" in serve.output  # a usage error: nothing started


def test_status_of_an_unknown_run(env):
    result = invoke("jobs", "status", "0123456789ab")
    assert result.exit_code == 1
    assert result.stderr == "error: no run with id '0123456789ab'\n"


def test_cancel_stops_the_running_training_task(env, git_server):
    import ray

    git_server.publish("acme/long", source_files())
    cfg = load_settings()
    store = RunStore(cfg.database_url, migrate=True)
    spec = build_run_spec(["acme/long"], preset="tiny", sets=["max_iters=1000000"])
    run = store.create_run(spec)
    dispatcher = Dispatcher(store, cfg, only_runs={run.id})
    dispatcher.start()
    cpus = ray.available_resources().get("CPU")
    deadline = time.monotonic() + 120
    while store.get_run(run.id).step in (None, 0) and time.monotonic() < deadline:
        dispatcher.tick()
        time.sleep(0.2)
    view = store.get_run(run.id)
    assert view.stage is Stage.TRAIN and view.step > 0
    assert invoke("jobs", "cancel", run.id).stdout == f"run {run.id}: cancelled\n"
    dispatcher.tick()
    assert dispatcher.idle
    deadline = time.monotonic() + 15
    while ray.available_resources().get("CPU") != cpus and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU") == cpus  # the task's CPU is free again
    step = store.get_run(run.id).step
    time.sleep(1.5)
    dispatcher.tick()
    final = store.get_run(run.id)
    assert final.status is RunStatus.CANCELLED and final.step == step  # nothing trains on
    assert final.attempts[-1].outcome == "cancelled"
    assert invoke("jobs", "cancel", run.id).exit_code == 0  # idempotent


def test_a_silent_running_run_never_reads_as_plain_running(env):
    from datetime import timedelta

    from sqlalchemy import update

    from schemas.models import Run, utcnow

    store = RunStore(load_settings().database_url, migrate=True)
    run = store.create_run(build_run_spec(["acme/ghost"], preset="tiny"))
    store.claim("ghost-dispatcher", 1)
    with store.engine.begin() as conn:
        conn.execute(update(Run).where(Run.id == run.id).values(heartbeat_at=utcnow() - timedelta(seconds=300)))
    shown = json.loads(invoke("jobs", "status", run.id, "--json").stdout)
    assert shown["status"] == "running" and shown["stale"] is True and shown["heartbeat_age_s"] >= 300
    [listed] = json.loads(invoke("jobs", "list", "--json").stdout)
    for stamp in ("created_at", "started_at", "heartbeat_at"):  # one form of time in every JSON output
        assert listed[stamp] == shown[stamp] and shown[stamp].endswith("+00:00")
    text = invoke("jobs", "status", run.id).stdout
    assert "running, no heartbeat for 30" in text and "charforge serve" in text
    assert f"charforge jobs resume {run.id}" in " ".join(text.split())  # however the note wraps
    assert "no heartbeat" in invoke("jobs", "list").stdout
    # Nobody serves: the user takes it back by hand.
    resumed = invoke("jobs", "resume", run.id, "--detach", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)[0]["status"] == "queued"
    assert store.get_run(run.id).attempts == [] and "lost: no heartbeat" in invoke("jobs", "logs", run.id).stdout
