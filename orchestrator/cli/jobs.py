"""`charforge jobs ...`: submit runs, see them, follow them, cancel and resume them."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.markup import escape

from orchestrator.cli import context, render
from orchestrator.cli.corpus import Exclude, Include
from orchestrator.cli.follow import follow
from orchestrator.settings import Settings
from orchestrator.store import RunStore
from schemas.errors import IllegalTransition, UserError
from schemas.run import RunSpec, build_run_spec
from schemas.status import TERMINAL, RunStatus
from schemas.training import ModelConfig
from schemas.views import RunView

jobs_app = typer.Typer(help="Submit, follow and manage training runs.", no_args_is_help=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of text.")]
RunArg = Annotated[str, typer.Argument(metavar="RUN", help="Run id (or a unique prefix of 4 or more characters).")]


class RunsFailed(UserError):
    pass


@jobs_app.command()
def submit(
    repo: Annotated[list[str], typer.Option(
        "--repo", "-r", metavar="SPEC",
        help=escape("owner/name[@ref], a git URL or a local path; repeat for several runs."))],
    combine: Annotated[bool, typer.Option(help="Build one corpus from all --repo (one run).")] = False,
    name: Annotated[str | None, typer.Option(metavar="NAME", help="Run name (default: the repo names).")] = None,
    include: Include = None,
    exclude: Exclude = None,
    lang: Annotated[str | None, typer.Option(metavar="LANGS", help="Only these languages, e.g. c,lua,python.")] = None,
    preset: Annotated[str | None, typer.Option(
        metavar="NAME", help="Model/training preset: tiny, small, medium, large.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE",
        help="Override a setting, e.g. --set rnn_size=256 --set train.max_iters=5000.")] = None,
    init_from: Annotated[str | None, typer.Option(
        metavar="RUN", help="Start from this run's weights (fine-tuning).")] = None,
    detach: Annotated[bool, typer.Option(help="Queue and return; `charforge serve` runs them.")] = False,
    json_: JsonFlag = False,
) -> None:
    """Queue one run per --repo (or one with --combine) and, by default, run them here to the end.

    With no RAY_ADDRESS configured, submit starts a local Ray, runs the stages (fetch, corpus,
    train, sample) with progress bars and prints a sample; Ctrl-C cancels. With RAY_ADDRESS (or
    --detach) it only queues the runs and prints their ids.
    """
    cfg = context.settings()
    store = context.store(cfg)
    cfg.storage().check()
    overrides: dict[str, object] = {}
    if include:
        overrides["include"] = tuple(include)
    if exclude:
        overrides["exclude"] = tuple(exclude)
    if lang:
        overrides["langs"] = tuple(x.strip() for x in lang.split(",") if x.strip())
    groups = [repo] if combine else [[r] for r in repo]
    init_key, init_model = None, None
    if init_from:
        init_from, init_key, init_model = _init_from(cfg, store, init_from)
    specs: list[RunSpec] = []
    for group in groups:
        spec = build_run_spec(group, name=name, preset=preset, sets=set_ or (), corpus_overrides=overrides,
                              init_from=init_from, init_model=init_model)
        specs.append(spec.model_copy(update={"init_from_checkpoint": init_key}))
    runs = [store.create_run(spec) for spec in specs]
    ids = [r.id for r in runs]
    if detach or not cfg.embedded:
        if json_:
            render.print_json([render.status_json(r, cfg.heartbeat_timeout) for r in runs])
        else:
            for r in runs:
                context.out.print(f"queued run {r.id} ({escape(r.name)})")
        return
    from orchestrator.cli.follow import run_embedded

    views = run_embedded(cfg, store, ids, bars=context.is_tty() and not json_)
    _report(views, cfg.heartbeat_timeout, json_=json_)


def _init_from(cfg: Settings, store: RunStore, run: str) -> tuple[str, str, ModelConfig]:
    """The run `--init-from` names: its id, its best checkpoint's key, and the network in it (the
    one that will train: the source's spec may say another, as specs of runs fine-tuned before
    they recorded it said their preset's)."""
    from workers.checkpoint import find_checkpoint, load_checkpoint  # torch: only when fine-tuning

    run_id, storage = store.resolve_id(run), cfg.storage()
    key = find_checkpoint(storage, run_id, "best")
    return run_id, key, load_checkpoint(storage, key).model_config


def _report(views: list[RunView], stale_after: float, *, json_: bool) -> None:
    """End of a followed submit/resume: results, a sample, and exit 1 if any run did not succeed."""
    if json_:
        render.print_json([render.status_json(v, stale_after) for v in views])
    else:
        for view in views:
            _print_outcome(view)
    bad = [v for v in views if v.status is not RunStatus.SUCCEEDED]
    if bad:
        detail = "; ".join(f"{v.id} {v.status.value}" + (f": {v.error}" if v.error else "") for v in bad)
        raise RunsFailed(f"{len(bad)} of {len(views)} runs did not succeed ({detail})")


def _print_outcome(view: RunView) -> None:
    style = render.STATUS_STYLE.get(view.status.value, "")
    context.out.print(f"run {view.id} ({escape(view.name)}): [{style}]{view.status.value}[/{style}]"
                      + (f", best val {render.bits(view.best_val_loss)}" if view.best_val_loss else ""))
    if view.status is RunStatus.SUCCEEDED and view.sample_batches:
        text = _first_sample(view.sample_batches[-1].key)
        if text is not None:
            context.out.rule(f"sample from {escape(view.name)}")
            context.out.print(text, markup=False)
            context.out.rule()


def _first_sample(key: str) -> str | None:
    storage = context.settings().storage()
    with storage.open(key) as fh:
        line = fh.readline()
    return json.loads(line).get("text") if line else None


@jobs_app.command()
def status(run: RunArg, json_: JsonFlag = False) -> None:
    """Show a run: status, stage, corpus, progress, losses, checkpoints, samples, attempts."""
    cfg = context.settings()
    view = context.store(cfg).get_run(run)
    if json_:
        render.print_json(render.status_json(view, cfg.heartbeat_timeout))
    else:
        render.print_status(view, cfg.heartbeat_timeout)


@jobs_app.command("list")
def list_(
    status_: Annotated[RunStatus | None, typer.Option("--status", help="Only runs with this status.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many runs, newest first.")] = 50,
    json_: JsonFlag = False,
) -> None:
    """List runs, newest first."""
    cfg = context.settings()
    runs = context.store(cfg).list_runs(status=status_, limit=limit)
    if json_:
        render.print_json([render.summary_json(r, cfg.heartbeat_timeout) for r in runs])
    else:
        render.print_list(runs, cfg.heartbeat_timeout)


@jobs_app.command()
def watch(runs: Annotated[list[str] | None, typer.Argument(help="Run ids; default: every active run.")] = None) -> None:
    """Follow runs with live progress until they finish (reads the store; Ctrl-C stops watching).

    Ends like a followed submit: each run's outcome, and exit code 1 if any did not succeed.
    """
    cfg = context.settings()
    store = context.store(cfg)
    if runs:
        ids = [store.resolve_id(r) for r in runs]
    else:
        ids = [r.id for r in store.list_runs() if r.status not in TERMINAL]
    if not ids:
        context.out.print("no active runs")
        return
    try:
        views = follow(store, ids, bars=context.is_tty(), stale_after=cfg.heartbeat_timeout)
    except KeyboardInterrupt:
        return
    _report(views, cfg.heartbeat_timeout, json_=False)


@jobs_app.command()
def logs(
    run: RunArg,
    follow_: Annotated[bool, typer.Option(
        "--follow", "-f", help="Keep printing new lines until the run ends.")] = False,
) -> None:
    """Print a run's log: stage events, training progress, retries and tracebacks; for a run that
    has ended, a last line with how it ended."""
    store = context.store(context.settings())
    run_id, last = store.resolve_id(run), 0
    while True:
        for line in store.logs(run_id, after=last):
            stage = f"[{line.stage}] " if line.stage else ""
            context.out.print(f"{render.when(line.at)} {stage}{line.message}", markup=False)
            last = line.id
        view = store.get_run(run_id)
        if view.status in TERMINAL:
            error = f": {view.error}" if view.error else ""
            context.out.print(f"{render.when(view.finished_at)} run {view.status.value}{error}", markup=False)
            return
        if not follow_:
            return
        time.sleep(1.0)


@jobs_app.command()
def cancel(runs: Annotated[list[str], typer.Argument(help="Run ids to cancel.")]) -> None:
    """Cancel runs: queued ones never start, running ones have their Ray tasks killed. Idempotent."""
    store = context.store(context.settings())
    refused = []
    for run in runs:  # each run on its own: one that cannot be cancelled does not stop the rest
        try:
            view = store.cancel(run)
        except (UserError, IllegalTransition) as exc:
            refused.append(exc.message)
            continue
        context.out.print(f"run {view.id}: {view.status.value}")
    if refused:
        raise UserError("; ".join(refused))


@jobs_app.command()
def resume(
    run: Annotated[str, typer.Argument(
        help="A failed or cancelled run, or a running one whose heartbeat stopped (its dispatcher died).")],
    detach: Annotated[bool, typer.Option(help="Queue it and return; `charforge serve` continues it.")] = False,
    json_: JsonFlag = False,
) -> None:
    """Continue a failed or cancelled run from its last checkpoint (finished stages are kept).

    A run shown as "running, no heartbeat for Ns" past CHARFORGE_HEARTBEAT_TIMEOUT lost its
    dispatcher (a submit killed, a machine gone): a `charforge serve` recovers such runs by itself,
    and this does it by hand.
    """
    cfg = context.settings()
    store = context.store(cfg)
    view = store.resume(run, stale_after=cfg.heartbeat_timeout)
    if detach or not cfg.embedded:
        if json_:
            render.print_json([render.status_json(view, cfg.heartbeat_timeout)])
        else:
            context.out.print(f"queued run {view.id} again")
        return
    from orchestrator.cli.follow import run_embedded

    views = run_embedded(cfg, store, [view.id], bars=context.is_tty() and not json_)
    _report(views, cfg.heartbeat_timeout, json_=json_)


