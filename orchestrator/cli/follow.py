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

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from orchestrator.cli import context
from orchestrator.settings import Settings
from orchestrator.store import RunStore
from schemas.errors import DatabaseUnavailable, IllegalTransition
from schemas.status import TERMINAL
from schemas.views import RunView

log = logging.getLogger("charforge.cli")


def describe(view: RunView) -> str:
    stage = f" {view.stage.value}" if view.stage and view.status.value == "running" else ""
    loss = view.metrics.get("train_loss")
    speed = view.metrics.get("chars_per_sec")
    extra = ""
    if loss is not None:
        extra += f" loss {loss:.3f}"
    if speed:
        extra += f" {speed:,.0f} chars/s"
    return f"{view.name} [dim]{view.id}[/dim] {view.status.value}{stage}{extra}"


def follow(store: RunStore, run_ids: Sequence[str], *, bars: bool, poll: float = 0.5,
           stop: threading.Event | None = None) -> list[RunView]:
    """Show progress until every run is finished (or `stop` is set); return their final views."""
    if not bars:
        return _follow_lines(store, run_ids, poll, stop)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=context.err, transient=False) as progress:
        tasks = {rid: progress.add_task(rid, total=None) for rid in run_ids}
        while True:
            views = store.get_runs(run_ids)
            for view in views:
                progress.update(tasks[view.id], description=describe(view),
                                completed=view.step or 0, total=view.total_steps)
            if all(v.status in TERMINAL for v in views) or (stop and stop.is_set()):
                return views
            time.sleep(poll)


def _follow_lines(store: RunStore, run_ids: Sequence[str], poll: float,
                  stop: threading.Event | None) -> list[RunView]:
    """Without a terminal: one line per status or stage change, for logs and CI."""
    seen: dict[str, tuple[str, str | None]] = {}
    while True:
        views = store.get_runs(run_ids)
        for view in views:
            state = (view.status.value, view.stage.value if view.stage else None)
            if seen.get(view.id) != state:
                seen[view.id] = state
                context.err.print(describe(view))
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
    dispatcher.start()
    stop = threading.Event()
    failure: list[BaseException] = []

    def loop() -> None:
        while not stop.is_set():
            try:
                dispatcher.tick()
            except DatabaseUnavailable as exc:
                log.warning("%s; retrying", exc.message)
            except BaseException as exc:  # noqa: BLE001 - surfaced in the main thread
                failure.append(exc)
                stop.set()
                return
            stop.wait(0.2)

    thread = threading.Thread(target=loop, name="charforge-dispatcher", daemon=True)
    thread.start()
    try:
        views = follow(store, run_ids, bars=bars, stop=stop)
    except KeyboardInterrupt:
        context.err.print("interrupted: cancelling")
        for rid in run_ids:
            try:
                store.cancel(rid)
            except IllegalTransition:
                pass
        views = follow(store, run_ids, bars=False, stop=stop)
        _wait_idle(dispatcher, stop)
    finally:
        stop.set()
        thread.join(timeout=30)
        dispatcher.stop(requeue=True)
        if dispatcher.owns_ray:
            ray_runtime.shutdown()
    if failure:
        raise failure[0]
    return views


def _wait_idle(dispatcher: object, stop: threading.Event, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while getattr(dispatcher, "flights", None) and time.monotonic() < deadline and not stop.is_set():
        time.sleep(0.2)
