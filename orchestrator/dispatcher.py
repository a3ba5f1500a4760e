"""The dispatcher: claims queued runs, runs their stages on Ray, and keeps the store true.

One loop, one thread. Each `tick()`:
 1. stamps the heartbeats of the runs it drives (first, so a dispatcher coming back from a
    database outage says it is alive before anyone judges it; orchestrator/ownership.py);
 2. drains the progress relay and writes the events to the store (kept and retried if the
    database is briefly away, so nothing a worker reported is lost; orchestrator/relay.py);
 3. collects finished stages (`ray.wait`, no `ray.get` in a loop over pending work): a result
    starts the next stage, an infrastructure failure is retried with backoff, a user error fails
    the run with its message;
 4. kills the Ray task of any run that was cancelled, or that another dispatcher took over (and
    later reads what the killed task returned, so Ray does not print it as an unhandled error;
    orchestrator/ownership.py);
 5. claims queued runs while below `max_concurrent`, and launches the stages that are due;
 6. reconciles with Ray and the clock (orchestrator/liveness.py): a running run whose dispatcher
    is gone from this Ray cluster, or whose heartbeat is older than the timeout, is recovered:
    queued again to resume from its last checkpoint, or failed as "lost: ..." after
    `max_recoveries`.
Stage tasks fate-share with this process (Ray kills a driver's tasks when it exits), so a run
never runs twice: a dead dispatcher's runs stop with it and are recovered once it is known dead.
See docs/cluster.md.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from orchestrator import pipeline, ray_runtime
from orchestrator.liveness import Reconciler
from orchestrator.ownership import Ownership
from orchestrator.relay import EventRelay
from orchestrator.settings import Settings
from orchestrator.store import RunStore
from schemas.errors import DatabaseUnavailable, IllegalTransition, StorageError, UserError
from schemas.run import RunSpec
from schemas.status import RunStatus, Stage
from workers import keys

log = logging.getLogger("charforge.dispatcher")

# How long a run whose corpus another run is building waits before looking again.
CORPUS_WAIT_S = 1.0
# How long a task may wait for Ray to place it before the run's log says so.
WAITING_NOTE_S = 120.0


def new_dispatcher_id() -> str:
    # Host names can be 63 characters (Kubernetes pods); the column holds 64 with the cluster tag.
    return f"{socket.gethostname()[:30]}-{os.getpid()}-{os.urandom(3).hex()}"


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
    worker: tuple[str, int] | None = None  # (node id, pid) running the current attempt
    waiting_for: str | None = None  # the run building the corpus this one needs
    launched_at: float | None = None  # when the current task was submitted (see _note_waiting)
    asks: str = ""  # the Ray resources the current task asked for

    @property
    def current(self) -> Stage:
        """The stage launched last: a flight with a task or an outcome has one."""
        if self.stage is None:
            raise RuntimeError(f"run {self.run_id}: no stage launched yet")
        return self.stage


@dataclass
class Dispatcher:
    store: RunStore
    settings: Settings
    only_runs: set[str] | None = None  # embedded mode: drive just the runs of this submit
    dispatcher_id: str = field(default_factory=new_dispatcher_id)
    flights: dict[str, Flight] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._events = EventRelay(self.store)  # the progress relay; outlives a relay actor that dies
        self._ownership: Ownership  # made by start(), once the id is final
        self._next_reconcile = 0.0
        self._accelerator: str | None = None
        self._cpu_nodes = ray_runtime.NodePicker()
        self._reconciler: Reconciler  # made by start()
        self._num_cpus = 1
        self.owns_ray = False  # whether start() started Ray (embedded callers shut it down)

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self.owns_ray = ray_runtime.connect(self.settings.ray_address)  # before anything imports ray
        tag = f"-r{ray_runtime.cluster_tag()}"
        if not self.dispatcher_id.endswith(tag):
            self.dispatcher_id += tag
        self._ownership = Ownership(self.store, self.settings, self.dispatcher_id)
        self._reconciler = Reconciler(self.store, self.settings, self.dispatcher_id, tag)
        self._accelerator = ray_runtime.accelerator_resource(self.settings.accelerator)
        if self.settings.train_cpus > 0:
            self._num_cpus = self.settings.train_cpus
            biggest = ray_runtime.largest_node_cpus()
            if self._num_cpus > biggest:
                raise UserError(f"CHARFORGE_TRAIN_CPUS={self._num_cpus}, but no Ray node has more than "
                                f"{biggest} CPUs: training could never be placed")
        else:
            self._num_cpus = ray_runtime.cluster_cpus() if self.settings.embedded else 1
        self._events.open(self.dispatcher_id)
        log.info("dispatcher %s started (accelerator: %s)", self.dispatcher_id, self._accelerator)

    def stop(self, *, requeue: bool = True) -> None:
        """Stop driving runs: kill their tasks and queue them again for another dispatcher.

        The relay goes too: from then on other dispatchers see this one as gone, so a run that
        could not be queued again here (the database was away) is recovered by them.
        """
        if self._events.actor is not None:
            try:  # what the stages already said belongs in the store before they go
                self._relay_events()
            except Exception as exc:  # noqa: BLE001 - stopping goes on regardless
                log.warning("could not write the last progress events: %s", exc)
        for flight in list(self.flights.values()):
            self._ownership.kill(flight)
            if requeue:
                self._ownership.hand_back(flight)
        self.flights.clear()
        self._events.close()

    @property
    def idle(self) -> bool:
        return not self.flights

    @property
    def _relay(self) -> Any:
        """The progress relay actor that stage tasks report to (tests kill it)."""
        return self._events.actor

    # ---- the loop ---------------------------------------------------------------------------

    def tick(self) -> None:
        self._ownership.heartbeat(list(self.flights))
        self._relay_events()
        self._collect()
        self._ownership.enforce(self.flights, self._events)
        self._claim()
        self._launch_due()
        self._note_waiting()
        self._reconcile()
        self._ownership.reap()

    def _relay_events(self) -> None:
        if not self._events.drain(self.flights):
            # Without its relay this dispatcher looks dead to the others: give its runs back.
            log.error("the progress relay died: re-queueing this dispatcher's runs")
            self.stop(requeue=True)
            self._events.open(self.dispatcher_id)

    def _collect(self) -> None:
        """Note each finished stage's outcome; the handlers below write it down (again next tick
        if the database is away)."""
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
                    flight.outcome = pipeline.classify(exc, flight.current)
            if done:
                self._relay_events()  # what a stage said before it ended belongs before its end
        for flight in list(self.flights.values()):
            if flight.outcome is None:
                continue
            if isinstance(flight.outcome, pipeline.Failure):
                self._guarded(flight, self._stage_failed, flight.outcome)
            else:
                self._guarded(flight, self._stage_done, flight.outcome)

    def _guarded(self, flight: Flight, action: Any, *args: Any) -> None:
        """Run `action` for one flight; an unexpected error fails that run, not the dispatcher.

        The database being away is everyone's problem: it goes up to the caller's loop, which
        retries. Anything else (a Ray hiccup launching a task, a bug) is classified like a
        stage's own failure: retried with backoff when it is infrastructure, else the run fails
        with an "internal error" line and the traceback in its log.
        """
        try:
            action(flight, *args)
        except DatabaseUnavailable:
            raise
        except Exception as exc:  # classified, logged, and charged to this run only
            log.exception("run %s: %s", flight.run_id, exc)
            flight.ref = None
            flight.stage = flight.stage or pipeline.next_stage(flight.results) or Stage.SAMPLE
            self._stage_failed(flight, pipeline.classify(exc, flight.stage))

    # Both handlers write the store first and change the flight last: if the database is away,
    # the outcome stays on the flight and the next tick settles it again.

    def _stage_done(self, flight: Flight, result: Any) -> None:
        stage = flight.current
        self.store.finish_attempt(flight.run_id, stage, flight.attempt, "succeeded")
        self.store.record_result(flight.run_id, stage, result.model_dump(mode="json"))
        facts = pipeline.run_facts(stage, result)
        if facts:
            self.store.update_run(flight.run_id, **facts)
        if stage is Stage.TRAIN:
            self._prune_checkpoints(flight.run_id)
        flight.results[stage] = result
        if pipeline.next_stage(flight.results) is None:
            self._finish(flight, RunStatus.SUCCEEDED)  # raises, outcome kept, if the database is away
        else:
            flight.retry_at = time.monotonic()  # launched by _launch_due
        flight.outcome, flight.failures, flight.worker = None, 0, None

    def _stage_failed(self, flight: Flight, failure: pipeline.Failure) -> None:
        stage, failures = flight.current, flight.failures + 1
        if failure.detail:
            self.store.append_log(flight.run_id, failure.detail, stage=stage.value)
        if failure.cancelled:
            self.store.finish_attempt(flight.run_id, stage, flight.attempt, "cancelled")
            self.flights.pop(flight.run_id, None)
            return
        if failure.retry and failures < self.settings.max_attempts:
            delay = pipeline.backoff(self.settings.retry_backoff, failures)
            self.store.finish_attempt(flight.run_id, stage, flight.attempt, "retried", failure.message)
            resume = " from its last checkpoint" if stage is Stage.TRAIN else ""
            self.store.append_log(
                flight.run_id, f"{failure.message}; retrying{resume} in {delay:.1f}s "
                f"(attempt {failures + 1} of {self.settings.max_attempts})", stage=stage.value,
            )
            flight.outcome, flight.failures, flight.worker = None, failures, None
            flight.retry_at = time.monotonic() + delay
            return
        self.store.finish_attempt(flight.run_id, stage, flight.attempt, "failed", failure.message)
        message = failure.message
        if failure.retry:
            message = f"{message} (gave up after {failures} attempts)"
        self._finish(flight, RunStatus.FAILED, error=message)

    def _finish(self, flight: Flight, status: RunStatus, error: str | None = None) -> None:
        try:
            self.store.transition(flight.run_id, status, expected=RunStatus.RUNNING, error=error,
                                  owner=self.dispatcher_id)
        except IllegalTransition:
            pass  # cancelled (or taken over) meanwhile: that status stands
        self.flights.pop(flight.run_id, None)

    def _launch(self, flight: Flight) -> None:
        """Start the run's next stage, unless the run stopped being ours meanwhile."""
        from workers.remote import run_stage, stage_options

        status, owner = self.store.owners([flight.run_id]).get(flight.run_id, (None, None))
        if status is not RunStatus.RUNNING or owner != self.dispatcher_id:
            self.flights.pop(flight.run_id, None)  # cancelled in the hand-off, or during a backoff
            return
        stage = pipeline.next_stage(flight.results)
        if stage is None:  # every stage is done (stopped between the last result and the finish)
            self._finish(flight, RunStatus.SUCCEEDED)
            return
        if stage is Stage.CORPUS and self._corpus_busy(flight):
            flight.retry_at = time.monotonic() + CORPUS_WAIT_S
            return
        flight.attempt = self.store.start_attempt(flight.run_id, stage, self.dispatcher_id)
        flight.stage = stage  # a launch that fails below is that attempt's failure (_guarded)
        heavy = stage in (Stage.TRAIN, Stage.SAMPLE)
        ctx = pipeline.stage_context(self.settings, flight.run_id, num_threads=self._num_cpus if heavy else 1,
                                     use_accelerator=self._accelerator is not None)
        options = stage_options(stage, num_cpus=ctx.num_threads, accelerator=self._accelerator,
                                run_id=flight.run_id, prefer_node=None if heavy or not self._accelerator
                                else self._cpu_nodes.pick(without=self._accelerator))
        inputs = pipeline.stage_inputs(stage, flight.run_id, flight.spec, flight.results)
        flight.ref = run_stage.options(**options).remote(stage, ctx, inputs, self._events.actor)
        flight.retry_at, flight.launched_at = None, time.monotonic()
        flight.asks = ", ".join(f"{k}={v}" for k, v in options.items() if k in ("num_cpus", "num_gpus", "resources"))

    def _note_waiting(self) -> None:
        """Say in the run's log when a task has waited long for Ray to place it.

        Ray keeps a task it cannot place pending (the accelerator nodes left, or no node has the
        CPUs asked for): the run is alive but going nowhere, and the user should know why.
        """
        now = time.monotonic()
        for flight in self.flights.values():
            waited = now - (flight.launched_at or now)
            if flight.ref is not None and flight.worker is None and waited > WAITING_NOTE_S:
                self.store.append_log(
                    flight.run_id, f"{flight.current.value} has waited {waited:.0f}s for Ray to place it "
                    f"(it asks for {flight.asks}); check `ray status` for free resources",
                    stage=flight.current.value,
                )
                flight.launched_at = now  # again after another WAITING_NOTE_S

    def _launch_due(self) -> None:
        now = time.monotonic()
        for flight in list(self.flights.values()):
            if flight.ref is None and flight.retry_at is not None and flight.retry_at <= now:
                self._guarded(flight, self._launch)

    def _corpus_busy(self, flight: Flight) -> bool:
        """Whether another run is building this run's corpus now: then wait and reuse it.

        The corpus cache makes a second build of the same corpus redundant, not wrong: two
        builds write identical objects atomically (and dispatchers that look at the same moment
        may both build). Waiting just saves the work.
        """
        fetch = flight.results.get(Stage.FETCH)
        if fetch is None or fetch.cached or not fetch.corpus_hash:
            return False
        builder = self.store.corpus_builders().get(fetch.corpus_hash)
        if builder in (None, flight.run_id):
            flight.waiting_for = None
            return False
        if flight.waiting_for != builder:
            self.store.append_log(flight.run_id, f"waiting for run {builder}, which is building the same corpus")
            flight.waiting_for = builder
        return True

    def _claim(self) -> None:
        room = self.settings.max_concurrent - len(self.flights)
        if room <= 0:
            return
        for view in self.store.claim(self.dispatcher_id, room, only=self.only_runs):
            self._events.unfence(view.id)
            flight = Flight(view.id, None, {}, retry_at=time.monotonic())  # type: ignore[arg-type]
            self.flights[view.id] = flight
            self._guarded(flight, self._load)

    def _load(self, flight: Flight) -> None:
        """A claimed run's spec and the results of the stages it already finished."""
        flight.spec = RunSpec.model_validate(self.store.get_run(flight.run_id).spec)
        flight.results = pipeline.load_results(self.store.results(flight.run_id))
        if flight.results:
            done = ", ".join(s.value for s in flight.results)
            self.store.append_log(flight.run_id, f"continuing after {done}")

    # ---- liveness ---------------------------------------------------------------------------

    def _reconcile(self) -> None:
        now = time.monotonic()
        if now < self._next_reconcile:
            return
        if self._accelerator is None:  # accelerator nodes may join after the start
            self._accelerator = ray_runtime.accelerator_resource(self.settings.accelerator)
        self._next_reconcile = now + self._reconciler.run(set(self.flights))

    def _prune_checkpoints(self, run_id: str) -> None:
        """Forget checkpoint records whose objects training rotated away (best effort)."""
        try:
            present = set(self.settings.storage().list(keys.checkpoints_prefix(run_id)))
        except StorageError as exc:
            log.warning("cannot list checkpoints of run %s: %s", run_id, exc.message)
            return
        self.store.prune_artifacts(run_id, "checkpoint", present)
