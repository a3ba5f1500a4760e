"""The dispatcher's end of the progress relay: what workers report, written to the run store.

Workers push event batches to a `ProgressRelay` actor named after their dispatcher
(workers/remote.py). `EventRelay` starts that actor on the dispatcher's node, drains it each tick
and writes the events to the store. Events the database could not take stay pending and are
written first next time, so nothing a worker reported is lost when the database is briefly away.
On the way it notes which worker runs each attempt, and drops the late progress of runs whose
tasks the dispatcher killed (`fence`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator import ray_runtime
from orchestrator.store import RunStore
from schemas.events import Event, EventKind

if TYPE_CHECKING:
    from orchestrator.dispatcher import Flight

# What a fenced run's killed task may no longer report (see EventRelay._noted).
_FENCED_KINDS = frozenset({EventKind.PROGRESS, EventKind.METRIC, EventKind.NODE})


@dataclass
class EventRelay:
    store: RunStore
    actor: Any = None  # the ProgressRelay actor; None before open(), after close(), once it died
    pending: dict[str, list[Event]] = field(default_factory=dict)  # drained, not in the store yet
    fenced: set[str] = field(default_factory=set)  # runs whose tasks the dispatcher killed

    def open(self, dispatcher_id: str) -> None:
        """Start the relay actor for `dispatcher_id`; it exists when this returns."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from workers.remote import ProgressRelay, relay_name

        # On this node: it must not die with some other node. Named: its existence is how other
        # dispatchers on the cluster know this one is alive.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        actor = ProgressRelay.options(  # type: ignore[attr-defined]  # a Ray actor class
            name=relay_name(dispatcher_id), namespace=ray_runtime.NAMESPACE, scheduling_strategy=here
        ).remote()
        ray.get(actor.drain.remote())  # it exists before this dispatcher claims anything
        self.actor = actor

    def close(self) -> None:
        """Kill the relay actor: from then on other dispatchers see this one as gone."""
        if self.actor is not None:
            import ray

            ray.kill(self.actor)
            self.actor = None

    def drain(self, flights: dict[str, Flight]) -> bool:
        """Write what workers reported to the store; False (and no actor) if the actor died."""
        import ray

        try:
            drained = ray.get(self.actor.drain.remote())
        except ray.exceptions.RayActorError:
            self.actor = None  # gone: close() must not kill it
            return False
        for run_id, events in drained.items():
            self.pending.setdefault(run_id, []).extend(self._noted(flights.get(run_id), run_id, events))
        for run_id in list(self.pending):
            self.store.apply_events(run_id, self.pending[run_id])
            del self.pending[run_id]
        return True

    def fence(self, run_id: str) -> None:
        """Drop the late progress of `run_id`, whose task the dispatcher killed."""
        self.fenced.add(run_id)

    def unfence(self, run_id: str) -> None:
        """`run_id` was claimed again: its new tasks report in full."""
        self.fenced.discard(run_id)

    def _noted(self, flight: Flight | None, run_id: str, events: list[Event]) -> list[Event]:
        """Remember which worker runs each attempt, and say so in the run's log.

        A killed task's last batches can reach the relay after the kill. For a run this
        dispatcher stopped driving (cancelled, or taken over by another dispatcher) only logs and
        artifacts (objects really written) are kept: late progress, metrics or node reports would
        move a cancelled run's step on, or rewrite the history of the new owner's attempt.
        """
        out: list[Event] = []
        for event in events:
            if run_id in self.fenced and event.kind in _FENCED_KINDS:
                continue
            out.append(event)
            if event.kind is EventKind.NODE and flight is not None:
                node, pid = str(event.data.get("node_id")), int(event.data.get("pid") or 0)
                flight.worker = (node, pid)
                message = f"{event.stage} attempt {flight.attempt} running on node {node[:12]} (pid {pid})"
                out.append(Event(kind=EventKind.LOG, stage=event.stage, data={"message": message}, ts=event.ts))
        return out
