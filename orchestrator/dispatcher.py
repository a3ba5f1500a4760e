"""The dispatcher: claims queued runs, runs their stages on Ray, and keeps the store true.

One loop, one thread. Each `tick()`:
 1. drains the progress relay and writes the events to the store (kept and retried if the
    database is briefly away, so nothing a worker reported is lost);
 2. collects finished stages (`ray.wait`, no `ray.get` in a loop over pending work): a result
    starts the next stage, an infrastructure failure is retried with backoff, a user error fails
    the run with its message;
 3. kills the Ray task of any run that was cancelled, or that another dispatcher took over;
 4. claims queued runs while below `max_concurrent`;
 5. stamps heartbeats, and recovers runs whose heartbeat went stale (their dispatcher died):
    they are queued again and resume from their last checkpoint.
Stage tasks fate-share with this process (Ray kills a driver's tasks when it exits), so a run
never runs twice: a dead dispatcher's runs stop with it and are recovered once stale.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from orchestrator import pipeline, ray_runtime
from orchestrator.settings import Settings
from orchestrator.store import RunStore
from schemas.errors import DatabaseUnavailable, IllegalTransition
from schemas.events import Event
from schemas.run import RunSpec
from schemas.status import RunStatus, Stage
from workers import keys

log = logging.getLogger("charforge.dispatcher")


@dataclass
class Flight:
    """A run this dispatcher is driving."""

    run_id: str
    spec: RunSpec
    results: dict[Stage, Any]
    stage: Stage | None = None
    ref: Any = None  # the ObjectRef of the stage task in flight
    attempt: int = 0  # this stage's attempt number in the store
    failures: int = 0  # infrastructure failures of this stage so far
    retry_at: float | None = None  # when to launch the next stage (or retry this one)
    outcome: Any = None  # a finished stage's result or Failure, until the store has it


@dataclass
class Dispatcher:
    store: RunStore
    settings: Settings
    only_runs: set[str] | None = None  # embedded mode: drive just the runs of this submit
    dispatcher_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}")
    flights: dict[str, Flight] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._pending_events: dict[str, list[Event]] = {}
        self._last_heartbeat = 0.0
        self._last_reconcile = 0.0
        self._relay: Any = None
        self._accelerator: str | None = None
        self._num_cpus = 1
        self.owns_ray = False  # whether start() started Ray (embedded callers shut it down)

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self.owns_ray = ray_runtime.connect(self.settings.ray_address)  # before anything imports ray
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from workers.remote import ProgressRelay

        self._accelerator = ray_runtime.accelerator_resource(self.settings.accelerator)
        if self.settings.train_cpus > 0:
            self._num_cpus = self.settings.train_cpus
        else:
            self._num_cpus = ray_runtime.cluster_cpus() if self.settings.embedded else 1
        # The relay lives on this node: it must not die with some other node.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._relay = ProgressRelay.options(scheduling_strategy=here).remote()
        log.info("dispatcher %s started (accelerator: %s)", self.dispatcher_id, self._accelerator)

    def stop(self, *, requeue: bool = True) -> None:
        """Stop driving runs: kill their tasks and queue them again for another dispatcher."""
        for flight in list(self.flights.values()):
            self._kill(flight)
            if requeue:
                try:
                    self.store.close_open_attempts(flight.run_id, "interrupted", "dispatcher stopped")
                    self.store.transition(flight.run_id, RunStatus.QUEUED, expected=RunStatus.RUNNING)
                except (IllegalTransition, DatabaseUnavailable):
                    pass
        self.flights.clear()

    @property
    def idle(self) -> bool:
        return not self.flights

    # ---- the loop ---------------------------------------------------------------------------

    def tick(self) -> None:
        self._relay_events()
        self._collect()
        self._enforce_ownership()
        self._claim()
        self._launch_due()
        self._heartbeat()

    def _relay_events(self) -> None:
        import ray

        for run_id, events in ray.get(self._relay.drain.remote()).items():
            self._pending_events.setdefault(run_id, []).extend(events)
        for run_id in list(self._pending_events):
            self.store.apply_events(run_id, self._pending_events[run_id])
            del self._pending_events[run_id]

    def _collect(self) -> None:
        """Note each finished stage's outcome; `_settle` writes it down (and retries if it can't)."""
        import ray

        running = {f.ref: f for f in self.flights.values() if f.ref is not None}
        if running:
            done, _ = ray.wait(list(running), num_returns=len(running), timeout=0)
            for ref in done:
                flight = running[ref]
                flight.ref = None
                try:
                    flight.outcome = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - every failure is classified
                    flight.outcome = pipeline.classify(exc, flight.stage)
            if done:
                self._relay_events()  # what a stage said before it ended belongs before its end
        for flight in list(self.flights.values()):
            if flight.outcome is None:
                continue
            if isinstance(flight.outcome, pipeline.Failure):
                self._stage_failed(flight, flight.outcome)
            else:
                self._stage_done(flight, flight.outcome)

    # Both handlers write the store first and change the flight last: if the database is away,
    # the outcome stays on the flight and the next tick settles it again.

    def _stage_done(self, flight: Flight, result: Any) -> None:
        stage = flight.stage
        self.store.finish_attempt(flight.run_id, stage, flight.attempt, "succeeded")
        self.store.record_result(flight.run_id, stage, result.model_dump(mode="json"))
        facts = pipeline.run_facts(stage, result)
        if facts:
            self.store.update_run(flight.run_id, **facts)
        if stage is Stage.TRAIN:
            self._prune_checkpoints(flight.run_id)
        flight.results[stage] = result
        flight.outcome, flight.failures = None, 0
        if pipeline.next_stage(flight.results) is None:
            self._finish(flight, RunStatus.SUCCEEDED)
        else:
            flight.retry_at = time.monotonic()  # launched by _launch_due

    def _stage_failed(self, flight: Flight, failure: pipeline.Failure) -> None:
        stage, failures = flight.stage, flight.failures + 1
        if failure.detail:
            self.store.append_log(flight.run_id, failure.detail, stage=stage.value)
        if failure.cancelled:
            self.store.finish_attempt(flight.run_id, stage, flight.attempt, "cancelled")
            self.flights.pop(flight.run_id, None)
            return
        if failure.retry and failures < self.settings.max_attempts:
            delay = min(self.settings.retry_backoff * 2 ** (failures - 1), 60.0)
            self.store.finish_attempt(flight.run_id, stage, flight.attempt, "retried", failure.message)
            self.store.append_log(
                flight.run_id, f"{failure.message}; retrying in {delay:.1f}s "
                f"(attempt {failures + 1} of {self.settings.max_attempts})", stage=stage.value,
            )
            flight.outcome, flight.failures = None, failures
            flight.retry_at = time.monotonic() + delay
            return
        self.store.finish_attempt(flight.run_id, stage, flight.attempt, "failed", failure.message)
        message = failure.message
        if failure.retry:
            message = f"{message} (gave up after {failures} attempts)"
        self._finish(flight, RunStatus.FAILED, error=message)

    def _finish(self, flight: Flight, status: RunStatus, error: str | None = None) -> None:
        try:
            self.store.transition(flight.run_id, status, expected=RunStatus.RUNNING, error=error)
        except IllegalTransition:
            pass  # cancelled (or taken over) meanwhile: that status stands
        self.flights.pop(flight.run_id, None)

    def _launch(self, flight: Flight) -> None:
        """Start the run's next stage, unless the run stopped being ours meanwhile."""
        from workers.remote import StageContext, run_stage, stage_options

        status, owner = self.store.owners([flight.run_id]).get(flight.run_id, (None, None))
        if status is not RunStatus.RUNNING or owner != self.dispatcher_id:
            self.flights.pop(flight.run_id, None)  # cancelled in the hand-off between stages
            return
        stage = pipeline.next_stage(flight.results)
        flight.attempt = self.store.start_attempt(flight.run_id, stage, self.dispatcher_id)
        flight.stage, flight.retry_at = stage, None
        heavy = stage in (Stage.TRAIN, Stage.SAMPLE)
        ctx = StageContext(
            run_id=flight.run_id,
            storage_url=self.settings.storage_url,
            s3_endpoint_url=self.settings.s3_endpoint_url,
            git_base_url=self.settings.git_base_url,
            num_threads=self._num_cpus if heavy else 1,
            use_accelerator=self._accelerator is not None,
        )
        options = stage_options(stage, num_cpus=ctx.num_threads, accelerator=self._accelerator)
        inputs = pipeline.stage_inputs(stage, flight.run_id, flight.spec, flight.results)
        flight.ref = run_stage.options(**options).remote(stage, ctx, inputs, self._relay)

    def _launch_due(self) -> None:
        now = time.monotonic()
        for flight in list(self.flights.values()):
            if flight.ref is None and flight.retry_at is not None and flight.retry_at <= now:
                self._launch(flight)

    def _claim(self) -> None:
        room = self.settings.max_concurrent - len(self.flights)
        if room <= 0:
            return
        for view in self.store.claim(self.dispatcher_id, room, only=self.only_runs):
            spec = RunSpec.model_validate(view.spec)
            results = pipeline.load_results(self.store.results(view.id))
            self.flights[view.id] = Flight(view.id, spec, results, retry_at=time.monotonic())
            if results:
                self.store.append_log(view.id, f"continuing after {', '.join(s.value for s in results)}")

    def _enforce_ownership(self) -> None:
        if not self.flights:
            return
        owners = self.store.owners(list(self.flights))
        for run_id, flight in list(self.flights.items()):
            status, owner = owners.get(run_id, (None, None))
            if status is RunStatus.RUNNING and owner == self.dispatcher_id:
                continue
            self._kill(flight)
            outcome = "cancelled" if status is RunStatus.CANCELLED else "lost"
            self.store.close_open_attempts(run_id, outcome)
            self.flights.pop(run_id, None)

    def _kill(self, flight: Flight) -> None:
        import ray

        if flight.ref is not None:
            ray.cancel(flight.ref, force=True, recursive=True)
            flight.ref = None

    def _heartbeat(self) -> None:
        now = time.monotonic()
        interval = min(5.0, self.settings.heartbeat_timeout / 4)
        if now - self._last_heartbeat >= interval:
            self.store.heartbeat(self.dispatcher_id, list(self.flights))
            self._last_heartbeat = now
        if now - self._last_reconcile >= interval:
            self._last_reconcile = now
            self._recover_stale()

    def _recover_stale(self) -> None:
        for run_id in self.store.stale_runs(self.settings.heartbeat_timeout):
            if run_id in self.flights:
                continue
            try:
                self.store.close_open_attempts(run_id, "lost", "heartbeat stopped")
                view = self.store.recover(
                    run_id, f"no heartbeat for {self.settings.heartbeat_timeout:.0f}s",
                    max_recoveries=self.settings.max_recoveries,
                )
                log.warning("recovered stale run %s -> %s", run_id, view.status.value)
            except IllegalTransition:
                continue  # its dispatcher came back, or another one recovered it first

    def _prune_checkpoints(self, run_id: str) -> None:
        """Forget checkpoint records whose objects training rotated away."""
        storage = self.settings.storage()
        present = set(storage.list(keys.checkpoints_prefix(run_id)))
        self.store.prune_artifacts(run_id, "checkpoint", present)
