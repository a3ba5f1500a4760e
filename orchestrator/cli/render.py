"""How runs look on a terminal: the status page, the list table, the end-of-run summary."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from rich.markup import escape
from rich.table import Table

from orchestrator.cli import context
from schemas.units import human_size, plural
from schemas.views import RunSummary, RunView

STATUS_STYLE = {
    "queued": "yellow", "running": "cyan", "succeeded": "green", "failed": "red", "cancelled": "magenta",
}


def bits(nats: float | None) -> str:
    if nats is None:
        return "-"
    return f"{nats:.3f} nats/char ({nats / math.log(2):.3f} bits/char)"


def when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def print_json(value: Any) -> None:
    context.out.print_json(json.dumps(value), highlight=False)


def status_word(run: RunSummary, stale_after: float) -> str:
    """The status as shown: a running run whose heartbeat stopped never reads as plain running."""
    style = STATUS_STYLE.get(run.status.value, "")
    silent = run.silent_for(datetime.now(UTC))
    if silent is not None and silent > stale_after:
        return f"[yellow]running, no heartbeat for {silent:.0f}s[/yellow]"
    return f"[{style}]{run.status.value}[/{style}]"


def status_json(view: RunView, stale_after: float) -> dict[str, Any]:
    """`jobs status --json`: the documented object, plus how long a running run has been silent."""
    return {**view.to_status_json(), "repos": repos_of(view), **_silence(view, stale_after)}


def status_lines(view: RunView, stale_after: float) -> list[tuple[str, str]]:
    status = status_word(view, stale_after)
    if view.stage:
        status += f" (stage {view.stage.value})"
    rows = [("status", status)]
    if "no heartbeat" in status:
        rows.append(("note", f"its dispatcher may be gone; a running `charforge serve` recovers it, or "
                             f"`charforge jobs resume {view.id}` does (it resumes from its last checkpoint)"))
    if view.error:
        rows.append(("error", f"[red]{escape(view.error)}[/red]"))
    for repo in repos_of(view):
        commit = (repo.get("commit") or "")[:12] or "-"
        rows.append(("repo", f"{escape(str(repo.get('spec')))} @ {commit}"))
    if view.corpus:
        c = view.corpus
        rows.append(("corpus", f"{plural(c.get('files'), 'files')}, {human_size(c.get('bytes'))}, "
                               f"{c.get('vocab_size')} distinct chars ({c.get('key')})"))
    if view.total_steps:
        rows.append(("progress", f"step {view.step or 0}/{view.total_steps}"))
    m = view.metrics
    if m:
        speed = f", {m['chars_per_sec']:,.0f} chars/s" if m.get("chars_per_sec") else ""
        train = f"{m['train_loss']:.3f}" if m.get("train_loss") is not None else "-"
        rows.append(("loss", f"train {train}, val {bits(m.get('val_loss'))}{speed}"))
        rows.append(("best val", bits(view.best_val_loss)))
    for ckpt in view.checkpoints:
        val = ckpt.meta.get("val_loss")
        rows.append(("checkpoint", f"step {ckpt.meta.get('step')}" + (f" val {val:.3f}" if val is not None else "")
                     + f"  {ckpt.key}"))
    for batch in view.sample_batches:
        rows.append(("samples", f"{batch.meta.get('n')} from step {batch.meta.get('checkpoint_step')}  {batch.key}"))
    for a in view.attempts:
        node = (a.node_id or "-")[:12]
        rows.append(("attempt", f"{a.stage.value} #{a.attempt} on node {node}: {a.outcome or 'running'}"
                     + (f" ({escape(a.error)})" if a.error else "")))
    rows += [("created", when(view.created_at)), ("started", when(view.started_at)),
             ("finished", when(view.finished_at))]
    return rows


def print_status(view: RunView, stale_after: float) -> None:
    context.out.print(f"[bold]run {view.id}[/bold]  {escape(view.name)}")
    lines = status_lines(view, stale_after)
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        context.out.print(f"  {key:<{width}}  {value}")


def print_list(runs: Sequence[RunSummary], stale_after: float) -> None:
    if not runs:
        context.out.print("no runs")
        return
    table = Table(box=None, header_style="bold")
    for column in ("id", "name", "status", "stage", "step", "best val (nats)", "created"):
        table.add_column(column, no_wrap=True)
    for r in runs:
        step = f"{r.step}/{r.total_steps}" if r.total_steps else "-"
        best = f"{r.best_val_loss:.3f}" if r.best_val_loss is not None else "-"
        table.add_row(r.id, escape(r.name), status_word(r, stale_after),
                      r.stage.value if r.stage else "-", step, best, when(r.created_at))
    context.out.print(table)


def repos_of(view: RunView) -> list[dict[str, Any]]:
    """The run's repos with their commits once fetched; before that, as submitted."""
    if view.repos:
        return view.repos
    return [{"spec": r.get("spec"), "url": None, "commit": None} for r in view.spec.get("repos", [])]


def _silence(run: RunSummary, stale_after: float) -> dict[str, Any]:
    silent = run.silent_for(datetime.now(UTC))
    return {"heartbeat_age_s": None if silent is None else round(silent, 1),
            "stale": silent is not None and silent > stale_after}


def summary_json(run: RunSummary, stale_after: float) -> dict[str, Any]:
    """One run in `jobs list --json`."""
    fields = json.loads(run.model_dump_json(include={
        "id", "name", "status", "stage", "created_at", "started_at", "finished_at", "error",
        "step", "total_steps", "best_val_loss", "heartbeat_at",
    }))
    return {**fields, **_silence(run, stale_after)}
