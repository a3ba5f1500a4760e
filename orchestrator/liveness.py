"""Finding running runs that nobody drives any more, and giving them back (docs/cluster.md).

A running run is lost when
 1. its dispatcher is gone from this Ray cluster: the dispatcher's named relay actor no longer
    exists, and still does not `CONFIRM_GONE_S` later (Ray drops a dead driver's actors a few
    milliseconds before it has killed that driver's task workers; the second look makes sure the
    old attempt is dead before a new one can start). Dispatcher ids end in a tag of their Ray
    cluster, and only dispatchers of this cluster are judged this way; or
 2. its heartbeat is older than `heartbeat_timeout`: the fallback for dispatchers of another
    cluster, or whose whole node went away.
Recovery queues the run again (it resumes from its stored stages and last checkpoint) or, after
`max_recoveries`, fails it "lost: ..."; `RunStore.recover` makes it conditional on the owner seen.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from orchestrator import ray_runtime
from orchestrator.settings import Settings
from orchestrator.store import RunStore
from schemas.errors import IllegalTransition

log = logging.getLogger("charforge.dispatcher")

CONFIRM_GONE_S = 1.0


def heartbeat_interval(settings: Settings) -> float:
    """How often a dispatcher stamps its runs and looks for lost ones."""
    return min(5.0, settings.heartbeat_timeout / 4)


@dataclass
class Reconciler:
    store: RunStore
    settings: Settings
    dispatcher_id: str
    tag: str  # the suffix of the ids of dispatchers on this Ray cluster
    suspects: dict[str, float] = field(default_factory=dict)  # dispatcher id -> first seen gone

    def run(self, driving: set[str]) -> float:
        """Recover every lost run but those in `driving`; returns seconds until the next pass."""
        owners = self.store.running_owners()
        for run_id, reason in self.lost(owners).items():
            if run_id in driving:
                continue
            try:
                view = self.store.recover(run_id, reason, max_recoveries=self.settings.max_recoveries,
                                          owner=owners[run_id])
            except IllegalTransition:
                continue  # its dispatcher came back, or another one recovered it first
            log.warning("recovered run %s (%s) -> %s", run_id, reason, view.status.value)
        return CONFIRM_GONE_S if self.suspects else heartbeat_interval(self.settings)

    def lost(self, owners: dict[str, str | None]) -> dict[str, str]:
        """The lost runs among `owners` (running run -> its dispatcher), with the reason."""
        timeout = self.settings.heartbeat_timeout
        gone = self._gone({owner for owner in owners.values() if owner})
        # A dispatcher known gone is the better reason; a stale heartbeat covers the rest.
        lost = {rid: f"its dispatcher {owner} is gone" for rid, owner in owners.items() if owner in gone}
        for run_id in self.store.stale_runs(timeout):
            if run_id in owners:
                lost.setdefault(run_id, f"no heartbeat for {timeout:g}s")
        return lost

    def _gone(self, owners: set[str]) -> set[str]:
        from workers.remote import relay_name

        now, gone = time.monotonic(), set()
        self.suspects = {d: t for d, t in self.suspects.items() if d in owners}
        for owner in owners:
            if owner == self.dispatcher_id or not owner.endswith(self.tag):
                continue
            if ray_runtime.actor_exists(relay_name(owner)):
                self.suspects.pop(owner, None)
            elif now - self.suspects.setdefault(owner, now) >= CONFIRM_GONE_S:
                gone.add(owner)
        return gone
