"""The Ray wrapping of the stage functions: the only module in workers/ that imports ray.

Touch points, numbered as Ray's own examples do:
 1. `ProgressRelay`, a tiny actor per dispatcher: workers push event batches to it
    (fire-and-forget), the dispatcher drains it each tick and writes the store. It is named
    after its dispatcher (`relay_name`) and, like the stage tasks, dies with that dispatcher:
    other dispatchers take its absence as proof that the dispatcher and its tasks are gone.
 2. `run_stage`, one remote function for every stage: it rebuilds storage from its URL (workers
    hold storage credentials, never database ones), sets torch's thread count (Ray sets
    OMP_NUM_THREADS only when a worker starts, and reuses workers), reports which node runs this
    attempt, and calls the plain stage function.
 3. `stage_options`: the resources each stage asks for and where it prefers to run, and a task
    name carrying the run id (a worker's process title is `ray::<task name>` while it runs, so
    `ps` shows which run each worker serves). Ray-level retries are off (`max_retries=0`): the
    dispatcher retries with backoff, checks for cancellation first, and records every attempt.
Only storage keys and small result models travel through Ray; corpora and weights never do.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from schemas.events import Event
from schemas.status import Stage
from workers.progress import EventReporter


@ray.remote(num_cpus=0, max_restarts=0)
class ProgressRelay:
    def __init__(self) -> None:
        self._events: dict[str, list[Event]] = defaultdict(list)

    def push(self, run_id: str, events: list[Event]) -> None:
        self._events[run_id].extend(events)

    def drain(self) -> dict[str, list[Event]]:
        out, self._events = self._events, defaultdict(list)
        return dict(out)


def relay_name(dispatcher_id: str) -> str:
    return f"charforge-relay-{dispatcher_id}"


@dataclass(frozen=True)
class StageContext:
    """What every stage task needs besides its own inputs (all plain, picklable values)."""

    run_id: str
    storage_url: str
    s3_endpoint_url: str | None
    git_base_url: str
    num_threads: int
    use_accelerator: bool


def _storage(ctx: StageContext) -> Any:
    from workers.storage import open_storage

    return open_storage(ctx.storage_url, endpoint_url=ctx.s3_endpoint_url)


def _call_stage(stage: Stage, ctx: StageContext, inputs: dict[str, Any], reporter: EventReporter) -> Any:
    storage = _storage(ctx)
    if stage is Stage.FETCH:
        from workers.corpus import run_fetch_stage

        return run_fetch_stage(
            storage, inputs["repos"], inputs["corpus"], git_base_url=ctx.git_base_url, reporter=reporter
        )
    if stage is Stage.CORPUS:
        from workers.corpus import run_corpus_stage

        # As many builder processes as the CPUs this task asked Ray for (1: in-process).
        return run_corpus_stage(
            storage, inputs["fetch"], inputs["corpus"], git_base_url=ctx.git_base_url, reporter=reporter,
            jobs=ctx.num_threads,
        )
    device = None if ctx.use_accelerator else "cpu"
    if stage is Stage.TRAIN:
        from workers.train import run_train_stage

        return run_train_stage(
            storage, ctx.run_id, inputs["corpus_result"], inputs["model"], inputs["train"], reporter,
            init_from=inputs.get("init_from"), device=device, num_threads=ctx.num_threads,
        )
    from workers.sample import run_sample_stage

    return run_sample_stage(
        storage, ctx.run_id, inputs["sample"], reporter,
        checkpoint_key=inputs["checkpoint_key"], corpus=inputs.get("corpus_result"), device=device,
    )


@ray.remote(max_retries=0)
def run_stage(stage: Stage, ctx: StageContext, inputs: dict[str, Any], relay: Any) -> Any:
    if stage in (Stage.TRAIN, Stage.SAMPLE):
        # Only these need torch: importing it costs a fresh worker a second or two of CPU,
        # which fetch and corpus workers (often on other nodes) should not pay.
        import torch

        torch.set_num_threads(max(1, ctx.num_threads))

    def sink(batch: list[Event]) -> None:
        relay.push.remote(ctx.run_id, batch)

    reporter = EventReporter(stage.value, sink)
    reporter.node(node_id=ray.get_runtime_context().get_node_id(), pid=os.getpid())
    try:
        return _call_stage(stage, ctx, inputs, reporter)
    finally:
        reporter.flush()
        # Pushes are fire-and-forget, and Ray orders a caller's calls to an actor: waiting for
        # one more (empty) push means every batch above is in the relay before the dispatcher
        # sees this task's result (a sample batch's artifact must not arrive after the finish).
        ray.get(relay.push.remote(ctx.run_id, []))


def stage_options(
    stage: Stage, *, num_cpus: float, accelerator: str | None, run_id: str = "", prefer_node: str | None = None,
) -> dict[str, Any]:
    """Ray options for one stage.

    Training and sampling take one unit of the accelerator when there is one; fetch and corpus
    prefer `prefer_node` (a node without it), falling back to any node.
    """
    options: dict[str, Any] = {"num_cpus": num_cpus, "name": f"charforge-{stage.value}-{run_id}".rstrip("-")}
    if accelerator and stage in (Stage.TRAIN, Stage.SAMPLE):
        if accelerator == "GPU":
            options["num_gpus"] = 1
        else:  # a custom resource standing for a GPU node (tests, heterogeneous clusters)
            options["resources"] = {accelerator: 1}
    elif prefer_node:
        # soft: if that node dies or cannot fit the task, Ray places it elsewhere.
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(prefer_node, soft=True)
    return options
