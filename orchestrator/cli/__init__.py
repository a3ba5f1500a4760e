"""The `charforge` executable. Run commands live in its `jobs` group.

A bare `jobs` executable could never be reached: bash, zsh, dash and fish all run their `jobs`
builtin first. Commands here are thin: parse options, call library code, print. This module is
the one error boundary: library code raises `CharforgeError`s, and `CharforgeGroup` turns them
into one line on stderr and exit code 1 (usage errors keep click's exit code 2).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.markup import escape
from typer.core import TyperGroup

from orchestrator.cli import context
from schemas.base import describe_errors
from schemas.errors import CharforgeError


class CharforgeGroup(TyperGroup):
    # ctx: a click Context, not annotated as `click.Context`: recent typer releases (0.29 here)
    # ship their own copy of click, and click is no dependency of ours (ray's, for now).
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except CharforgeError as exc:
            message = exc.message
        except ValidationError as exc:  # an option value a config model refused
            message = f"invalid value: {describe_errors(exc)}"
        context.err.print(f"[red]error:[/red] {escape(message)}", markup=True, soft_wrap=True)
        raise typer.Exit(1)


app = typer.Typer(
    cls=CharforgeGroup,
    help="Train character-level RNNs on source-code repositories, as jobs on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
db_app = typer.Typer(help="Manage the run store's database.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the database migrations (PostgreSQL deployments run this once per release)."""
    from orchestrator import db

    cfg = context.settings()
    engine = db.make_engine(cfg.database_url)
    db.upgrade(engine)
    context.out.print(f"database at {db.redact(cfg.database_url)} is up to date")


@app.command()
def serve(
    max_concurrent: Annotated[
        int | None, typer.Option(min=1, help="Runs in flight at once (default: CHARFORGE_MAX_CONCURRENT or 4).")
    ] = None,
    poll: Annotated[float, typer.Option(min=0.05, help="Seconds between dispatcher ticks.")] = 0.5,
) -> None:
    """Run the dispatcher: claim queued runs and drive them on Ray (RAY_ADDRESS, or local Ray).

    Several `serve` may share one database: each run is claimed by exactly one. On SIGTERM or
    Ctrl-C the runs in flight are stopped (their Ray tasks killed) and queued again; another
    dispatcher (or this one, restarted) resumes them, training from its last checkpoint. A
    `serve` that dies without that (SIGKILL, a lost machine) takes its Ray tasks with it, and
    the others recover its runs (docs/cluster.md).
    """
    from orchestrator import ray_runtime
    from orchestrator.dispatcher import Dispatcher
    from schemas.errors import TransientError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its "Context impl ..." lines at every start
    log = logging.getLogger("charforge.serve")
    cfg = context.settings(max_concurrent=max_concurrent)
    dispatcher = Dispatcher(context.store(cfg), cfg)
    dispatcher.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    context.err.print(f"charforge serve: dispatcher {dispatcher.dispatcher_id} waiting for runs")
    trouble: str | None = None  # the infrastructure error of the last tick, logged once
    try:
        while not stop.is_set():
            try:
                dispatcher.tick()
                if trouble:
                    log.info("recovered from: %s", trouble)
                trouble = None
            except TransientError as exc:  # the database or storage is away: the next tick retries
                if exc.message != trouble:
                    log.warning("%s; retrying", exc.message)
                trouble = exc.message
            stop.wait(poll)
    except KeyboardInterrupt:
        pass
    finally:
        dispatcher.stop(requeue=True)
        ray_runtime.shutdown()  # leave the cluster now: our relay goes, and with it our claim to be alive
        context.err.print("charforge serve: stopped; runs in flight were queued again")


def _register() -> None:
    from orchestrator.cli import results  # noqa: F401 - registers sample/export/eval/... on jobs_app
    from orchestrator.cli.corpus import corpus_app
    from orchestrator.cli.jobs import jobs_app

    app.add_typer(jobs_app, name="jobs")
    app.add_typer(corpus_app, name="corpus")


_register()


def main() -> None:
    app()
