"""`charforge jobs report` and `charforge jobs compare`: what a run learned, and runs side by side.

`write_report` writes `loss.png` (train and validation loss vs step; matplotlib's Agg backend,
no display needed) and `index.html` (config, corpus, metrics, highlighted samples; every value
from a run or a sample is escaped). `compare_rows` answers "which codebase is most predictable?":
one row per run, most predictable (lowest validation bits/char) first; `compare_table` renders
the rows with Rich. See docs/sampling.md.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from rich.table import Table

from schemas.units import human_size
from schemas.views import ArtifactView, MetricPoint, RunView
from workers import codemetrics
from workers.sample import read_samples
from workers.storage import Storage

LN2 = math.log(2)
PNG_SIZE = (1000, 500)  # pixels: 10 x 5 inches at 100 dpi
SAMPLES_SHOWN = 8  # per report, from the newest batch
METRIC_LABELS = {
    "bits_per_char": "bits/char (model)",
    "bracket_balance": "bracket balance",
    "quote_balance": "quote balance",
    "lexer_error_rate": "lexer error rate",
    "mean_line_length": "mean line length",
    "indent_consistency": "indent consistency",
}


@dataclass(frozen=True)
class ReportPaths:
    html: Path
    png: Path


def _bits(nats: Any) -> Any:
    return nats / LN2


def _nats(bits: Any) -> Any:
    return bits * LN2


def write_report(
    run: RunView, metrics: Sequence[MetricPoint], storage: Storage, out_dir: Path
) -> ReportPaths:
    """Write `loss.png` and `index.html` for `run` into `out_dir` (created if missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "loss.png"
    page = out_dir / "index.html"
    _atomic_write(png, plot_losses(run, metrics))
    _atomic_write(page, render_html(run, metrics, storage, png.name).encode())
    return ReportPaths(html=page, png=png)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # a page to serve or share, not mkstemp's private 0600
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_losses(run: RunView, metrics: Sequence[MetricPoint]) -> bytes:
    """PNG bytes: train and validation loss (nats/char, bits/char on the right) vs step."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A Figure of its own, not pyplot: no global state, safe in a server or a thread.
    fig = Figure(figsize=(PNG_SIZE[0] / 100, PNG_SIZE[1] / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for field, style, label in (("train_loss", "-", "train"), ("val_loss", "o-", "validation")):
        points = sorted((m.step, getattr(m, field)) for m in metrics if getattr(m, field) is not None)
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label, markersize=4)
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no loss recorded yet", ha="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    ax.secondary_yaxis("right", functions=(_bits, _nats)).set_ylabel(
        "bits/char"
    )
    ax.grid(alpha=0.3)
    # parse_math=False: a run name with `$` must not be read as LaTeX.
    ax.set_title(f"{run.name} ({run.id})", parse_math=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


# --- HTML ------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
pre.config { background: #f6f6f6; padding: 1em; overflow-x: auto; }
.sample { margin: 1em 0; } .sample h3 { font-size: 1em; margin-bottom: 0.2em; }
.hl pre { padding: 0.8em; overflow-x: auto; }
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _table(rows: Iterable[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "n/a" if value is None else str(value)


def newest_batch(run: RunView) -> ArtifactView | None:
    """The most recently created sample batch (the last recorded one when times are unknown)."""
    batches = list(enumerate(run.sample_batches))
    if not batches:
        return None

    def when(pair: tuple[int, ArtifactView]) -> tuple[float, int]:
        created = pair[1].created_at
        return (created.timestamp() if created else 0.0, pair[0])

    return max(batches, key=when)[1]


def render_html(run: RunView, metrics: Sequence[MetricPoint], storage: Storage, png: str) -> str:
    from pygments.formatters import HtmlFormatter

    formatter = HtmlFormatter(cssclass="hl")
    parts = [
        (f"<!doctype html><html><head><meta charset='utf-8'><title>charforge run {_e(run.name)}"
         f"</title><style>{_CSS}{formatter.get_style_defs('.hl')}</style></head><body>"),
        f"<h1>Run {_e(run.name)} <small>{_e(run.id)}</small></h1>",
        _table([("status", run.status.value), ("created", run.created_at),
                ("finished", run.finished_at), ("steps", run.step)]),
        (f"<h2>Loss</h2><img src='{_e(png)}' width='{PNG_SIZE[0]}' height='{PNG_SIZE[1]}' "
         "alt='train and validation loss vs step'>"),
        _losses_table(run, metrics),
        "<h2>Corpus</h2>",
        _table([(r.get("spec"), r.get("url"), r.get("commit")) for r in run.repos],
               ["repo", "url", "commit"]),
        _table(sorted((k, v) for k, v in (run.corpus or {}).items() if not isinstance(v, dict | list))),
    ]
    batch = newest_batch(run)
    parts += _samples_section(batch, storage, formatter) if batch else ["<p>No samples yet.</p>"]
    spec = json.dumps(run.spec, indent=2, ensure_ascii=False)
    parts += [f"<h2>Configuration</h2><pre class='config'>{_e(spec)}</pre>", "</body></html>"]
    return "\n".join(parts)


def _losses_table(run: RunView, metrics: Sequence[MetricPoint]) -> str:
    best = best_val_loss(run)
    rows = [
        ("final train loss", run.metrics.get("train_loss")),
        ("final validation loss", run.metrics.get("val_loss")),
        ("best validation loss", best),
        ("best validation bits/char", best / LN2 if best is not None else None),
        ("points recorded", len(metrics)),
    ]
    return _table([(name, _fmt(v)) for name, v in rows])


def _samples_section(batch: ArtifactView, storage: Storage, formatter: Any) -> list[str]:
    from pygments import highlight
    from pygments.lexers import TextLexer

    meta = batch.meta
    sample_m, corpus_m = meta.get("metrics") or {}, meta.get("corpus_metrics") or {}
    parts = [
        (f"<h2>Samples</h2><p>Batch {_e(meta.get('batch_id'))}: {_e(meta.get('n'))} samples from "
         f"checkpoint step {_e(meta.get('checkpoint_step'))}, seed {_e(meta.get('seed'))}, "
         f"options {_e(json.dumps(meta.get('options'), ensure_ascii=False))}</p>"),
        _table([(label, _fmt(sample_m.get(k)), _fmt(corpus_m.get(k)))
                for k, label in METRIC_LABELS.items()], ["metric", "samples", "corpus"]),
    ]
    lexer = codemetrics.lexer_for(meta.get("language")) or TextLexer()
    for record in islice(read_samples(storage, batch.key), SAMPLES_SHOWN):
        figures = ", ".join(f"{k} {_fmt(v)}" for k, v in (record.get("metrics") or {}).items())
        parts.append(
            f"<div class='sample'><h3>Sample {_e(record.get('index'))}</h3>"
            f"<small>{_e(figures)}</small>{highlight(record.get('text', ''), lexer, formatter)}</div>"
        )
    return parts


# --- comparison ------------------------------------------------------------------------------


def best_val_loss(run: RunView) -> float | None:
    if run.best_val_loss is not None:
        return run.best_val_loss
    return run.metrics.get("best_val_loss") or run.metrics.get("val_loss")


def _batch_figures(batch: ArtifactView | None, storage: Storage) -> dict[str, Any]:
    """The newest batch's metrics: as recorded, or recomputed from its texts if not recorded."""
    if batch is None:
        return {}
    if batch.meta.get("metrics"):
        return batch.meta["metrics"]
    total = codemetrics.TextCounts()
    for record in read_samples(storage, batch.key):
        total = total + codemetrics.measure(record.get("text", ""), record.get("language"))
    return total.ratios()


def compare_rows(runs: Sequence[RunView], storage: Storage) -> list[dict[str, Any]]:
    """One row per run, lowest validation loss (most predictable corpus) first, unknown last."""
    rows = []
    for run in runs:
        model = (run.spec or {}).get("model") or {}
        corpus = run.corpus or {}
        loss = best_val_loss(run)
        figures = _batch_figures(newest_batch(run), storage)
        rows.append({
            "run": run.id,
            "name": run.name,
            "corpus": ", ".join(str(r.get("spec")) for r in run.repos) or None,
            "language": corpus.get("main_language"),
            "size": corpus.get("bytes"),
            "model": f"{model.get('model', '?')} {model.get('num_layers', '?')}x"
                     f"{model.get('rnn_size', '?')}" if model else None,
            "val_loss": loss,
            "bits_per_char": loss / LN2 if loss is not None else None,
            "bracket_balance": figures.get("bracket_balance"),
            "lexer_error_rate": figures.get("lexer_error_rate"),
            "batches": len(run.sample_batches),
        })
    return sorted(rows, key=lambda r: (r["val_loss"] is None, r["val_loss"] or 0.0))


def compare_table(rows: Sequence[dict[str, Any]]) -> Table:
    table = Table(title="Which codebase is most predictable? (lower bits/char = more predictable)")
    columns = (("run", "left"), ("name", "left"), ("corpus", "left"), ("size", "right"),
               ("model", "left"), ("val nats", "right"), ("bits/char", "right"),
               ("brackets", "right"), ("lexer errors", "right"))
    for name, justify in columns:
        # Ids, sizes and figures never wrap; names and corpora fold when the terminal is narrow.
        folds = name in ("name", "corpus")
        table.add_column(name, justify=justify, no_wrap=not folds,  # type: ignore[arg-type]
                         overflow="fold" if folds else "ellipsis", min_width=8 if folds else None)
    for r in rows:
        # Cells are plain text: a run name like "[red]" must not be read as Rich markup.
        table.add_row(*(_plain(c) for c in (
            r["run"], r["name"], r["corpus"] or "n/a", human_size(r["size"]), r["model"] or "n/a",
            _fmt(r["val_loss"]), _fmt(r["bits_per_char"]), _fmt(r["bracket_balance"]),
            _fmt(r["lexer_error_rate"]),
        )))
    return table


def _plain(value: str):  # -> rich.text.Text
    from rich.text import Text

    return Text(str(value))
