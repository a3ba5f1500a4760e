"""`charforge jobs report` and `compare` (issue 5): a real PNG, an HTML page, a ranking table."""

from __future__ import annotations

import math
import struct

import pytest
from matplotlib.image import imread
from rich.console import Console

from orchestrator.report import PNG_SIZE, compare_rows, compare_table, write_report
from schemas.views import ArtifactView, MetricPoint
from tests.test_export import make_run, one_thread  # noqa: F401 (autouse fixture)
from workers.storage import LocalStorage

POINTS = [MetricPoint(step=s, train_loss=3.0 / (1 + s / 10)) for s in range(0, 41, 5)] + [
    MetricPoint(step=20, val_loss=1.4), MetricPoint(step=40, val_loss=1.2)
]


@pytest.fixture(scope="module")
def store_and_runs(tmp_path_factory):
    storage = LocalStorage(tmp_path_factory.mktemp("store"))
    hostile = make_run(storage, "x", batches=1)
    hostile = hostile.model_copy(update={"name": "<script>alert(1)</script> $x^2$ [red]"})
    return storage, [make_run(storage, "widgets", batches=2), hostile]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_writes_a_real_png_and_an_html_page_naming_the_run(tmp_path, store_and_runs):
    storage, (run, _) = store_and_runs
    paths = write_report(run, POINTS, storage, tmp_path / "report")
    assert png_size(paths.png.read_bytes()) == PNG_SIZE
    pixels = imread(paths.png)  # decodes the whole image, not just the header
    assert pixels.shape[:2] == (PNG_SIZE[1], PNG_SIZE[0])
    assert pixels.std() > 0.05  # curves and axes were drawn, not a blank canvas

    assert {oct(p.stat().st_mode & 0o777) for p in (paths.png, paths.html)} == {"0o644"}  # to serve or share
    page = paths.html.read_text()
    assert f"<h1>Run widgets <small>{run.id}</small></h1>" in page
    assert "<img src='loss.png'" in page
    assert "best validation bits/char</td><td>" + f"{1.2 / math.log(2):.4f}" in page
    assert page.count("<div class='sample'>") == 3  # the newest batch's samples
    assert "class=\"hl\"" in page  # highlighted by Pygments
    assert "acme/widgets" in page and "ab" * 20 in page
    assert "bracket balance</td><td>" in page


def test_report_escapes_what_runs_and_samples_hold(tmp_path, store_and_runs):
    storage, (_, hostile) = store_and_runs
    paths = write_report(hostile, [], storage, tmp_path)
    page = paths.html.read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; $x^2$ [red]" in page
    assert png_size(paths.png.read_bytes()) == PNG_SIZE  # "no loss recorded yet", still an image


def test_compare_rows_rank_runs_and_carry_the_figures(store_and_runs):
    storage, (widgets, hostile) = store_and_runs
    better = hostile.model_copy(update={"best_val_loss": 0.9})
    unknown = widgets.model_copy(update={"id": "feedfacecafe", "best_val_loss": None, "metrics": {}})
    rows = compare_rows([widgets, unknown, better], storage)
    assert [r["run"] for r in rows] == [better.id, widgets.id, "feedfacecafe"]
    top = rows[0]
    assert top["val_loss"] == 0.9 and top["bits_per_char"] == pytest.approx(0.9 / math.log(2))
    assert top["model"] == "lstm 1x32" and top["size"] == widgets.corpus["bytes"]
    assert top["corpus"] == "acme/x" and top["language"] == "python"
    assert 0.0 <= top["bracket_balance"] <= 1.0 and top["lexer_error_rate"] is not None
    assert rows[2]["val_loss"] is None and rows[2]["bits_per_char"] is None


def test_compare_recomputes_metrics_of_a_batch_recorded_without_them(store_and_runs):
    storage, (widgets, _) = store_and_runs
    batch = widgets.sample_batches[-1]
    bare = ArtifactView(kind="samples", key=batch.key, size=batch.size, sha256=batch.sha256, meta={})
    old = widgets.model_copy(update={"artifacts": [bare]})
    [row] = compare_rows([old], storage)
    assert row["bracket_balance"] == pytest.approx(batch.meta["metrics"]["bracket_balance"], abs=1e-4)


def test_compare_table_renders_every_row_as_plain_text(store_and_runs):
    storage, runs = store_and_runs
    console = Console(width=200, record=True, color_system=None)
    console.print(compare_table(compare_rows(runs, storage)))
    out = console.export_text()
    assert "Which codebase is most predictable?" in out
    assert "widgets" in out and "[red]" in out  # markup in a name is shown, not interpreted
    assert "1.7312" in out  # 1.2 nats = 1.7312 bits/char
