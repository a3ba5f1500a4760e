"""The dispatcher when its own footing slips: the database away at the worst moment, a run whose
stages are all done, a launch that fails, a spec that no longer validates. Real local Ray, real
git, real training (tiny); the only fault injected by hand is a database error at one exact call,
which cannot be caused on cue otherwise."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from sqlalchemy import update

from orchestrator.dispatcher import Dispatcher
from orchestrator.settings import load_settings
from orchestrator.store import RunStore
from schemas.errors import DatabaseUnavailable
from schemas.models import Run
from schemas.run import build_run_spec
from schemas.status import TERMINAL, RunStatus
from tests.gitserver import source_files
from tests.settings import use_embedded
from tests.test_pipeline import invoke

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


@pytest.fixture
def setup(tmp_path, git_server, monkeypatch):
    use_embedded(monkeypatch, tmp_path / "home", git_server.base_url)
    cfg = load_settings()
    store = RunStore(cfg.database_url, migrate=True)
    name = git_server.unique("acme/faults")
    git_server.publish(name, source_files())
    return cfg, store, name


def _drive(dispatcher: Dispatcher, store: RunStore, run_id: str, timeout: float = 120) -> RunStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            dispatcher.tick()
        except DatabaseUnavailable:
            pass
        status = store.get_run(run_id).status
        if status in TERMINAL:
            return status
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} still {store.get_run(run_id).status} after {timeout}s")


def test_the_database_away_at_the_finish_does_not_strand_the_run(setup, monkeypatch):
    cfg, store, name = setup
    run = store.create_run(build_run_spec([name], preset="tiny"))
    dispatcher = Dispatcher(store, cfg, only_runs={run.id})
    dispatcher.start()
    real = store.transition
    failed = []

    def flaky(run_id, new, **kwargs):
        if new is RunStatus.SUCCEEDED and not failed:
            failed.append(run_id)
            raise DatabaseUnavailable("cannot reach the database at sqlite:///...: injected")
        return real(run_id, new, **kwargs)

    monkeypatch.setattr(store, "transition", flaky)
    try:
        assert _drive(dispatcher, store, run.id) is RunStatus.SUCCEEDED
    finally:
        dispatcher.stop(requeue=False)
    assert failed == [run.id] and dispatcher.idle
    assert store.get_run(run.id).sample_batches  # the last stage's artifact made it too


def test_a_requeued_run_whose_stages_are_all_done_just_finishes(setup):
    cfg, store, name = setup
    done = store.create_run(build_run_spec([name], preset="tiny"))
    dispatcher = Dispatcher(store, cfg, only_runs={done.id})
    dispatcher.start()
    try:
        assert _drive(dispatcher, store, done.id) is RunStatus.SUCCEEDED
        # A dispatcher stopped between the last result and the finish leaves such a run queued.
        copy = store.create_run(build_run_spec([name], preset="tiny"))
        with store.engine.begin() as conn:
            conn.execute(update(Run).where(Run.id == copy.id).values(results=store.results(done.id)))
        dispatcher.only_runs = {copy.id}
        assert _drive(dispatcher, store, copy.id, timeout=20) is RunStatus.SUCCEEDED
        assert store.get_run(copy.id).attempts == []  # nothing ran again
    finally:
        dispatcher.stop(requeue=False)


def test_a_spec_that_no_longer_validates_fails_that_run_only(setup):
    cfg, store, name = setup
    broken = store.create_run(build_run_spec([name], preset="tiny"))
    good = store.create_run(build_run_spec([name], preset="tiny"))
    with store.engine.begin() as conn:
        conn.execute(update(Run).where(Run.id == broken.id).values(spec={"name": "x", "repos": "nonsense"}))
    dispatcher = Dispatcher(store, cfg, only_runs={broken.id, good.id})
    dispatcher.start()
    try:
        assert _drive(dispatcher, store, broken.id, timeout=20) is RunStatus.FAILED
        assert _drive(dispatcher, store, good.id) is RunStatus.SUCCEEDED
    finally:
        dispatcher.stop(requeue=False)
    assert store.get_run(broken.id).error.startswith("internal error in the fetch stage: ValidationError")


def test_names_with_markup_are_shown_as_typed_and_cancel_goes_on_past_a_refusal(setup):
    _, store, name = setup
    queued = invoke("jobs", "submit", "--repo", name, "--name", "[/oops] [bold]x", "--detach")
    assert queued.exit_code == 0, queued.output
    assert "[/oops] [bold]x" in queued.stdout
    assert "[/oops] [bold]x" in invoke("jobs", "list").stdout
    finished = store.create_run(build_run_spec([name], preset="tiny"))
    store.claim("someone", 1, only={finished.id})
    store.transition(finished.id, RunStatus.SUCCEEDED)
    waiting = store.list_runs(status=RunStatus.QUEUED)[0]
    result = invoke("jobs", "cancel", finished.id, waiting.id)
    assert result.exit_code == 1
    assert f"run {waiting.id}: cancelled" in result.stdout
    assert result.stderr == f"error: run {finished.id} already succeeded: nothing to cancel\n"


def test_status_and_list_import_neither_torch_nor_ray(setup):
    _cfg, store, name = setup
    run = store.create_run(build_run_spec([name], preset="tiny"))
    probe = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from orchestrator.cli import app\n"
        f"for args in (['jobs', 'status', '{run.id}', '--json'], ['jobs', 'list', '--json'],"
        f" ['jobs', 'status', '{run.id}'], ['jobs', 'list']):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
        "print(sorted(m for m in ('torch', 'ray', 'numpy', 'boto3') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
