"""The process pool that runs `examine_batch` for the builder, where it pays.

A pool starts only once a tree is big enough (INLINE_FILES examined in-process first), from a
forkserver (never fork: the builder may run inside a Ray worker full of threads), and without
the caller's `__main__` (see `_import_safe_main`).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import types
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager

from workers.corpus.content import BatchResult, Item, Task, examine_batch

INLINE_FILES = 1024  # files examined in-process before a pool is worth starting


def default_jobs() -> int:
    """Worker processes. One core stays with the main process (walk, write, hash). On two cores
    or fewer a pool costs more than it gives (measured: docs/corpus.md), so the build runs
    in-process there."""
    cpus = len(os.sched_getaffinity(0))
    return 1 if cpus <= 2 else min(cpus - 1, 8)


def _context() -> multiprocessing.context.BaseContext:
    # Never fork: the builder may run inside a Ray worker full of threads. A forkserver starts
    # workers from a clean process that has imported the content module once.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["workers.corpus.content"])
    return ctx


# Serialises every swap of sys.modules["__main__"] in this process (see _import_safe_main).
_MAIN_LOCK = threading.Lock()


@contextmanager
def _import_safe_main() -> Iterator[None]:
    """Start workers without the caller's `__main__`.

    A forkserver child re-imports the parent's main script unless it is guarded by
    `if __name__ == "__main__"`; an unguarded script calling the builder would then run again
    in every worker. Workers need nothing from `__main__`, so none is handed to them.

    The swap is process-wide, so it is kept small and safe: it happens only while a worker
    process may be started (`Runner.submit`), under a lock, so two builders on two threads
    never save each other's stand-in as "the" main module. In a Ray worker `__main__` is Ray's
    own default_worker script; nothing of Ray's looks it up by name while a submit runs
    (cloudpickle pickles `__main__` functions by value without importing the module).
    """
    with _MAIN_LOCK:
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            if main is None:
                del sys.modules["__main__"]
            else:
                sys.modules["__main__"] = main


class Runner:
    """Runs `examine_batch` in-process for small trees, on a process pool once a tree is big."""

    def __init__(self, jobs: int, inline_files: int) -> None:
        self.jobs = jobs
        self._inline_left = inline_files
        self._pool: ProcessPoolExecutor | None = None

    @property
    def window(self) -> int:
        return 2 * self.jobs if self._pool else 1

    def _may_start_worker(self) -> bool:
        """True until the pool holds all its workers. A non-fork pool starts them one per
        `submit`, while none is idle (CPython keeps them in `_processes`)."""
        if self._pool is None:
            return True
        started = getattr(self._pool, "_processes", None)
        return started is None or len(started) < self.jobs

    def inline(self, items: list[Item]) -> bool:
        """Whether to examine `items` in-process: with one job, while a tree is small (the
        first INLINE_FILES files), and when there is nothing to read (all decided by the walk)."""
        real = sum(1 for item in items if not item.skip)
        if not real or (self._pool is None and (self.jobs <= 1 or self._inline_left > 0)):
            self._inline_left -= real
            return True
        return False

    def submit(self, task: Task, items: list[Item]) -> Future[BatchResult]:
        if not self._may_start_worker():
            return self._pool.submit(examine_batch, task, items)  # type: ignore[union-attr]
        with _import_safe_main():
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.jobs, mp_context=_context())
            return self._pool.submit(examine_batch, task, items)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
