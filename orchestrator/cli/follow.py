"""Following runs to their end: live progress from the store, and the embedded dispatcher.

`follow` only reads the run store (so `jobs watch` works against any deployment); `run_embedded`
adds a dispatcher on a private local Ray, ticking in a background thread, for the embedded
default of `jobs submit` and `jobs resume`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from orchestrator.cli import context, render
from orchestrator.settings import Settings
from orchestrator.store import RunStore
from schemas.errors import DatabaseUnavailable, IllegalTransition
from schemas.status import TERMINAL, RunStatus
from schemas.views import RunView

if TYPE_CHECKING:
    from orchestrator.dispatcher import Dispatcher

log = logging.getLogger("charforge.cli")


def describe(view: RunView, stale_after: float) -> str:
    stage = f" {view.stage.value}" if view.stage and view.status.value == "running" else ""
    loss = view.metrics.get("train_loss")
    speed = view.metrics.get("chars_per_sec")
    extra = ""
    if loss is not None:
        extra += f" loss {loss:.3f}"
    if speed:
        extra += f" {speed:,.0f} chars/s"
    return f"{escape(view.name)} [dim]{view.id}[/dim] {render.status_word(view, stale_after)}{stage}{extra}"


OUTAGE_LIMIT = 600.0  # seconds a follower waits for the database before it gives up


class _Reader:
    """The runs' views, read again at each poll. Once they have been read, a database that goes
    away is waited for (said once, and once more when it is back), as the dispatcher waits:
    runs in Ray go on meanwhile and their progress reaches the store when it returns. After
    OUTAGE_LIMIT seconds without it (a password changed, a database dropped) it gives up."""

    def __init__(self, store: RunStore, run_ids: Sequence[str], limit: float = OUTAGE_LIMIT) -> None:
        self.store, self.run_ids, self.limit = store, run_ids, limit
        self.views: list[RunView] | None = None
        self.away_since: float | None = None

    def read(self) -> list[RunView]:
        try:
            views = self.store.get_runs(self.run_ids)
        except DatabaseUnavailable as exc:
            if self.views is None:
                raise
            now = time.monotonic()
            if self.away_since is None:
                context.err.print(f"{escape(exc.message)}: waiting for it (the runs go on)")
                self.away_since = now
            elif now - self.away_since > self.limit:
                raise DatabaseUnavailable(
                    f"{exc.message}; gave up waiting after {self.limit:g}s. Once it is back, `charforge jobs "
                    f"resume RUN` takes back a run this left running ({', '.join(self.run_ids)})"
                ) from None
            return self.views
        if self.away_since is not None:
            context.err.print("the database is back")
            self.away_since = None
        self.views = views
        return views


def follow(store: RunStore, run_ids: Sequence[str], *, bars: bool, stale_after: float, poll: float = 0.5,
           stop: threading.Event | None = None) -> list[RunView]:
    """Show progress until every run is finished (or `stop` is set); return their final views."""
    reader = _Reader(store, run_ids)
    if not bars:
        return _follow_lines(reader, poll, stop, stale_after)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=context.err, transient=False) as progress:
        tasks = {rid: progress.add_task(rid, total=None) for rid in run_ids}
        while True:
            views = reader.read()
            for view in views:
                progress.update(tasks[view.id], description=describe(view, stale_after),
                                completed=view.step or 0, total=view.total_steps)
            if all(v.status in TERMINAL for v in views) or (stop and stop.is_set()):
                return views
            time.sleep(poll)


def _follow_lines(reader: _Reader, poll: float, stop: threading.Event | None, stale_after: float) -> list[RunView]:
    """Without a terminal: one line per status or stage change, for logs and CI."""
    seen: dict[str, tuple[str, str | None]] = {}
    while True:
        views = reader.read()
        for view in views:
            state = (view.status.value, view.stage.value if view.stage else None)
            if seen.get(view.id) != state:
                seen[view.id] = state
                context.err.print(describe(view, stale_after))
        if all(v.status in TERMINAL for v in views) or (stop and stop.is_set()):
            return views
        time.sleep(poll)


def run_embedded(cfg: Settings, store: RunStore, run_ids: Sequence[str], *, bars: bool) -> list[RunView]:
    """Drive `run_ids` on a local Ray in this process, following them until they end.

    Ctrl-C cancels them (their Ray tasks are killed) and returns once they are cancelled.
    """
    from orchestrator import ray_runtime
    from orchestrator.dispatcher import Dispatcher

    dispatcher = Dispatcher(store, cfg, only_runs=set(run_ids))
    try:
        dispatcher.start()
    except BaseException as exc:
        _fail_unfinished(store, run_ids, f"could not start the local dispatcher: {exc}")
        raise
    stop = threading.Event()
    failure: list[BaseException] = []

    def loop() -> None:
        while not stop.is_set():
            try:
                dispatcher.tick()
            except DatabaseUnavailable as exc:
                log.debug("%s; retrying", exc.message)  # the follower says it, once
            except BaseException as exc:  # noqa: BLE001 - surfaced in the main thread
                failure.append(exc)
                stop.set()
                return
            stop.wait(0.2)

    thread = threading.Thread(target=loop, name="charforge-dispatcher", daemon=True)
    thread.start()
    try:
        views = follow(store, run_ids, bars=bars, stale_after=cfg.heartbeat_timeout, stop=stop)
    except KeyboardInterrupt:
        context.err.print("interrupted: cancelling")
        try:
            for rid in run_ids:
                try:
                    store.cancel(rid)
                except IllegalTransition:
                    pass
        except DatabaseUnavailable as exc:  # the tasks die with this process; the runs stay running
            raise DatabaseUnavailable(
                f"{exc.message}: could not cancel; the runs' tasks end with this process. Once it is back, "
                f"`charforge jobs cancel` or `jobs resume` them ({', '.join(run_ids)})"
            ) from None
        views = follow(store, run_ids, bars=False, stale_after=cfg.heartbeat_timeout, stop=stop)
        _wait_idle(dispatcher, stop)
    finally:
        stop.set()
        thread.join(timeout=30)
        dispatcher.stop(requeue=not failure)
        if dispatcher.owns_ray:
            ray_runtime.shutdown()
    if failure:
        # Nothing else will drive these runs: fail them (then `jobs resume` continues them).
        _fail_unfinished(store, run_ids, f"the local dispatcher stopped: {failure[0]}")
        raise failure[0]
    return views


def _fail_unfinished(store: RunStore, run_ids: Sequence[str], error: str) -> None:
    """Fail the runs nothing will drive now; with the database away, leave them (the error that
    stopped the dispatcher is the one to show; `jobs resume` takes them back later)."""
    try:
        for view in store.get_runs(run_ids):
            if view.status not in TERMINAL:
                try:
                    store.transition(view.id, RunStatus.FAILED, expected=view.status, error=error)
                except IllegalTransition:
                    pass
    except DatabaseUnavailable:
        log.debug("could not fail %s: the database is away", ", ".join(run_ids))


def _wait_idle(dispatcher: Dispatcher, stop: threading.Event, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not dispatcher.idle and time.monotonic() < deadline and not stop.is_set():
        time.sleep(0.2)
