"""A dispatcher's hold on its own runs: heartbeats, letting go of runs it lost, handing runs back.

A dispatcher drives a run only while the store says the run is running under it. `Ownership`
stamps the heartbeats of the runs it drives (so no other dispatcher recovers them), lets go of a
run that was cancelled or taken over by another dispatcher (its Ray task killed, its late progress
fenced off, this dispatcher's open attempts closed), queues its runs again when it stops, and
later reads what each killed task returned. Finding the runs that nobody drives any more is
orchestrator/liveness.py's job.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.liveness import heartbeat_interval
from orchestrator.relay import EventRelay
from orchestrator.settings import Settings
from orchestrator.store import RunStore
from schemas.errors import DatabaseUnavailable, IllegalTransition
from schemas.status import RunStatus

if TYPE_CHECKING:
    from orchestrator.dispatcher import Flight


@dataclass
class Ownership:
    store: RunStore
    settings: Settings
    dispatcher_id: str
    killed: list[Any] = field(default_factory=list)  # refs of killed tasks, read once they end (see reap)
    last_heartbeat: float = 0.0

    def heartbeat(self, run_ids: Sequence[str]) -> None:
        """Stamp the runs this dispatcher drives, once every `heartbeat_interval`."""
        now = time.monotonic()
        if now - self.last_heartbeat >= heartbeat_interval(self.settings):
            self.store.heartbeat(self.dispatcher_id, run_ids)
            self.last_heartbeat = now

    def enforce(self, flights: dict[str, Flight], events: EventRelay) -> None:
        """Let go of the runs in `flights` that the store no longer has running under this dispatcher.

        Each one (cancelled, or taken over by another dispatcher) has its task killed and fenced
        in `events`, the attempts this dispatcher opened closed, and leaves `flights`.
        """
        if not flights:
            return
        owners = self.store.owners(list(flights))
        for run_id, flight in list(flights.items()):
            status, owner = owners.get(run_id, (None, None))
            if status is RunStatus.RUNNING and owner == self.dispatcher_id:
                continue
            self.kill(flight)
            events.fence(run_id)
            outcome = "cancelled" if status is RunStatus.CANCELLED else "lost"
            # ours only: a dispatcher that took the run over may have started attempts of its own
            self.store.close_open_attempts(run_id, outcome, dispatcher_id=self.dispatcher_id)
            flights.pop(run_id, None)

    def hand_back(self, flight: Flight) -> None:
        """Queue a run this dispatcher stops driving again, for another dispatcher to claim."""
        try:
            self.store.close_open_attempts(flight.run_id, "interrupted", "dispatcher stopped",
                                           dispatcher_id=self.dispatcher_id)
            self.store.transition(flight.run_id, RunStatus.QUEUED, expected=RunStatus.RUNNING,
                                  owner=self.dispatcher_id)
            self.store.append_log(flight.run_id, f"dispatcher {self.dispatcher_id} stopped: queued again")
        except (IllegalTransition, DatabaseUnavailable):
            pass  # cancelled meanwhile, or recovered later as lost

    def kill(self, flight: Flight) -> None:
        import ray

        if flight.ref is not None:
            # force: the worker process is killed at once (a training loop never checks for a
            # polite cancel), which frees its CPU and accelerator.
            ray.cancel(flight.ref, force=True, recursive=True)
            self.killed.append(flight.ref)
            flight.ref = None

    def reap(self) -> None:
        """Read the outcome of killed tasks, and drop it.

        Ray kills a worker's child processes (git, say) a moment before the worker itself, so a
        killed stage sometimes ends with its own error ("git failed") instead of a cancellation.
        Unread, Ray would print that error with its traceback when the ref is dropped, as if
        something had gone wrong.
        """
        import ray

        if not self.killed:
            return
        done, self.killed = ray.wait(self.killed, num_returns=len(self.killed), timeout=0)
        for ref in done:
            try:
                ray.get(ref)
            except Exception:  # noqa: BLE001 - the run was cancelled or taken over: nothing to say
                pass
