"""`charforge jobs sample|export|eval|report|compare`: what the networks write, and how well.

These commands read checkpoints and samples from storage; `sample` and `eval` run the model
(locally, or for `sample` through Ray when a cluster is configured), so they import torch lazily.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from orchestrator.cli import context, render
from orchestrator.cli.jobs import JsonFlag, RunArg, jobs_app
from schemas.base import describe_errors
from schemas.errors import UserError
from schemas.sampling import SampleConfig
from schemas.status import RunStatus
from schemas.units import human_size, plural
from schemas.views import RunView


def _sample_locally(storage: Any, run_id: str, config: SampleConfig, checkpoint_key: str,
                    corpus: Any) -> tuple[Any, list[Any]]:
    from workers.progress import ListReporter
    from workers.sample import run_sample_stage

    reporter = ListReporter("sample")
    result = run_sample_stage(storage, run_id, config, reporter, checkpoint_key=checkpoint_key, corpus=corpus)
    return result, reporter.events


def _sample_on_ray(cfg: Any, run_id: str, config: SampleConfig, checkpoint_key: str,
                   corpus: Any) -> tuple[Any, list[Any]]:
    import ray

    from orchestrator import pipeline, ray_runtime
    from schemas.status import Stage
    from workers.remote import ProgressRelay, run_stage, stage_options

    ray_runtime.connect(cfg.ray_address)
    accelerator = ray_runtime.accelerator_resource(cfg.accelerator)
    relay = ProgressRelay.remote()  # type: ignore[attr-defined]  # a Ray actor class
    ctx = pipeline.stage_context(cfg, run_id, num_threads=1, use_accelerator=accelerator is not None)
    inputs = {"sample": config, "checkpoint_key": checkpoint_key, "corpus_result": corpus}
    options = stage_options(Stage.SAMPLE, num_cpus=1, accelerator=accelerator)
    result = ray.get(run_stage.options(**options).remote(Stage.SAMPLE, ctx, inputs, relay))
    events = ray.get(relay.drain.remote()).get(run_id, [])
    return result, events


SAMPLE_COUNT = 4  # samples `jobs sample` asks for when -n is not given (the pipeline's stage: the run's)


@jobs_app.command()
def sample(
    run: RunArg,
    checkpoint: Annotated[str | None, typer.Option(
        help="best, latest, or a step number. Default: the run's (best unless set at submit).")] = None,
    num_samples: Annotated[int, typer.Option("-n", "--num-samples", help="Samples in the batch.")] = SAMPLE_COUNT,
    length: Annotated[int | None, typer.Option(
        help="Characters to generate per sample. Default: the run's (500 unless set at submit).")] = None,
    temperature: Annotated[float | None, typer.Option(
        help="Softmax temperature; 0 means argmax. Default: the run's (0.8 unless set at submit).")] = None,
    top_k: Annotated[int | None, typer.Option(
        min=0, help="Sample among the k likeliest characters only; 0: all of them. "
                    "Default: the run's (all unless set at submit).")] = None,
    prime: Annotated[str | None, typer.Option(help="Text every sample starts with. Default: the run's.")] = None,
    prime_file: Annotated[Path | None, typer.Option(help="Read the prime text from this file.")] = None,
    seed: Annotated[int | None, typer.Option(
        help="Random seed: the same seed gives the same text. Default: the run's, or a fresh one.")] = None,
    argmax: Annotated[bool | None, typer.Option(
        "--argmax/--no-argmax", help="Always take the likeliest character. Default: the run's.")] = None,
    json_: JsonFlag = False,
) -> None:
    """Generate a new batch of samples from a run's checkpoint, store it, and print it.

    Options not given take the run's sampling settings (`--set sample.KEY=V` at submit).
    """
    from workers.checkpoint import find_checkpoint
    from workers.sample import read_samples

    cfg = context.settings()
    store = context.store(cfg)
    storage = cfg.storage()
    view = store.get_run(run)
    if prime_file is not None:
        if prime is not None:
            raise UserError("give --prime or --prime-file, not both")
        try:
            prime = prime_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read --prime-file {prime_file}: {exc}") from None
    config = sample_options(view.spec.get("sample", {}), num_samples=num_samples, length=length,
                            temperature=temperature, top_k=top_k, prime=prime, seed=seed, argmax=argmax,
                            checkpoint=checkpoint)
    key = find_checkpoint(storage, view.id, config.checkpoint)
    corpus = _corpus_result(store, view.id)
    if cfg.embedded:
        result, events = _sample_locally(storage, view.id, config, key, corpus)
    else:
        result, events = _sample_on_ray(cfg, view.id, config, key, corpus)
    store.apply_events(view.id, events)
    records = list(read_samples(storage, result.key))
    if json_:
        render.print_json({"run": view.id, "key": result.key, "checkpoint_step": result.checkpoint_step,
                           "samples": records})
        return
    _print_samples(records, corpus.main_language if corpus else None)
    context.err.print(f"stored {plural(len(records), 'samples')} from step {result.checkpoint_step} at {result.key}")


def sample_options(stored: dict[str, Any], **given: Any) -> SampleConfig:
    """`jobs sample`'s options over the run's stored `spec.sample`: those given (not None) win;
    `top_k=0` lifts the run's top-k; a temperature given turns a stored argmax off."""
    if given.get("argmax") and given.get("temperature") is not None:
        raise UserError("give --argmax or --temperature, not both (--argmax always takes the likeliest character)")
    chosen = {k: v for k, v in given.items() if v is not None}
    if given.get("top_k") == 0:
        chosen["top_k"] = None  # all characters, whatever the run set
    if given.get("temperature") is not None:
        chosen["argmax"] = False  # a temperature asked for here beats a run's sample.argmax=true
    try:
        return SampleConfig.model_validate({**stored, **chosen})
    except ValidationError as err:
        raise UserError(f"invalid option: {describe_errors(err)}") from None


def _corpus_result(store: Any, run_id: str) -> Any:
    from orchestrator.pipeline import load_results
    from schemas.status import Stage

    return load_results(store.results(run_id)).get(Stage.CORPUS)


def _print_samples(records: list[dict[str, Any]], language: str | None) -> None:
    from rich.syntax import Syntax

    from workers.codemetrics import lexer_for

    lexer = lexer_for(language)
    for i, record in enumerate(records):
        metrics = record.get("metrics", {})
        title = f"sample {i + 1}/{len(records)}"
        if metrics.get("bracket_balance") is not None:
            title += f"  brackets {metrics['bracket_balance']:.2f}"
        context.out.rule(title)
        if lexer is not None:
            context.out.print(Syntax(record["text"], lexer, theme="ansi_dark", word_wrap=True))
        else:
            context.out.print(record["text"], markup=False)


def _select(store: Any, runs: list[str] | None, all_: bool, status: RunStatus | None,
            name: str | None, *, what: str, choices: str) -> list[RunView]:
    """The runs named, or those the filters select (`what`: the command's verb; `choices`: its
    selection options, for the error when there is none)."""
    if runs and (all_ or status or name):
        raise UserError(f"name runs to {what}, or use {choices}, not both")
    if runs:
        ids = list(dict.fromkeys(store.resolve_id(r) for r in runs))  # a run named twice counts once
    elif all_ or status or name:
        ids = [r.id for r in store.list_runs(status=status, name_glob=name)]
    else:
        raise UserError(f"name runs to {what}, or use {choices}")
    if not ids:
        raise UserError("no runs match the selection")
    return store.get_runs(ids)


@jobs_app.command()
def export(
    runs: Annotated[list[str] | None, typer.Argument(help="Run ids to export.")] = None,
    out: Annotated[str | None, typer.Option(
        help="Archive path (a file or an existing folder) or s3://bucket/key; default: exports/ in storage.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every run.")] = False,
    status: Annotated[RunStatus | None, typer.Option(help="Every run with this status.")] = None,
    name: Annotated[str | None, typer.Option(help="Every run whose name matches this glob.")] = None,
    format_: Annotated[str | None, typer.Option("--format", help="tar.gz, zip or jsonl.")] = None,
    include_checkpoints: Annotated[bool, typer.Option(help="Add each run's best checkpoint.")] = False,
    json_: JsonFlag = False,
) -> None:
    """Write the samples of many runs, with a manifest, into one archive."""
    from orchestrator.export import export_runs

    cfg = context.settings()
    store = context.store(cfg)
    views = _select(store, runs, all_, status, name, what="export", choices="--all, --status or --name")
    result = export_runs(views, cfg.storage(), out, fmt=format_, include_checkpoints=include_checkpoints)
    if json_:
        render.print_json(result.model_dump(mode="json"))
        return
    context.out.print(f"exported {plural(result.samples, 'samples')} in {plural(result.batches, 'batches')} "
                      f"of {plural(result.runs, 'runs')} "
                      f"to {result.destination} ({human_size(result.size)}, sha256 {result.sha256[:12]})")
    if result.url and result.destination.startswith("s3://"):
        context.out.print(f"download (presigned, 1 hour): {result.url}", markup=False)


@jobs_app.command("eval")
def eval_(
    run: RunArg,
    file: Annotated[Path | None, typer.Option(help="A text file to score.")] = None,
    repo: Annotated[list[str] | None, typer.Option(
        help="Build a corpus from this repo, with the run's corpus settings (filters, headers), and score it.",
    )] = None,
    checkpoint: Annotated[str, typer.Option(help="best, latest, or a step number.")] = "best",
    streams: Annotated[int, typer.Option(
        min=1, max=1024,
        help="Read the text as up to N contiguous streams side by side, each from a zero state: "
             "several times faster for big networks on a CPU, a little higher than the default "
             "one-stream reading (the text once, in order, state carried throughout).",
    )] = 1,
    json_: JsonFlag = False,
) -> None:
    """How well a run's model predicts other text: cross-entropy in nats/char and bits/char."""
    import tempfile

    from workers.checkpoint import find_checkpoint
    from workers.evaluate import evaluate_file

    if (file is None) == (not repo):
        raise UserError("give exactly one of --file PATH or --repo SPEC")
    cfg = context.settings()
    storage = cfg.storage()
    view = context.store(cfg).get_run(run)
    key = find_checkpoint(storage, view.id, checkpoint)
    with tempfile.TemporaryDirectory(prefix="charforge-eval-") as tmp:
        if repo:
            from schemas.corpus import CorpusConfig
            from workers.corpus import build_corpus_file

            file = Path(tmp) / "corpus.txt"
            # The run's own filters and layout (headers), so the text reads like what it trained on.
            corpus = CorpusConfig.model_validate(view.spec.get("corpus", {}))
            build_corpus_file(repo, corpus, file, git_base_url=cfg.git_base_url)
        assert file is not None  # --file, or the corpus just built from --repo
        result = evaluate_file(storage, key, file, streams=streams)
    payload = {"run": view.id, "chars": result.chars, "nats_per_char": result.nats_per_char,
               "bits_per_char": result.bits_per_char, "streams": streams}
    if json_:
        render.print_json(payload)
    else:
        context.out.print(f"{view.name} ({view.id}) on {file if not repo else ', '.join(repo)}: "
                          f"{result.nats_per_char:.4f} nats/char = {result.nats_per_char / math.log(2):.4f} "
                          f"bits/char over {result.chars:,} chars")


@jobs_app.command()
def report(
    run: RunArg,
    out: Annotated[Path, typer.Option(help="Folder to write loss.png and index.html into.")],
) -> None:
    """Write a run's loss curves (PNG) and an HTML page with its config, corpus, metrics and samples."""
    from orchestrator.report import write_report

    cfg = context.settings()
    store = context.store(cfg)
    view = store.get_run(run)
    paths = write_report(view, store.metrics(view.id), cfg.storage(), out)
    context.out.print(f"wrote {paths.html} and {paths.png}")


@jobs_app.command()
def compare(
    runs: Annotated[list[str] | None, typer.Argument(help="Run ids to compare.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every succeeded run.")] = False,
    json_: JsonFlag = False,
) -> None:
    """One table of runs: corpus, size, model, val loss, bracket balance, lexer errors."""
    from orchestrator.report import compare_rows, compare_table

    cfg = context.settings()
    store = context.store(cfg)
    views = _select(store, runs, all_, RunStatus.SUCCEEDED if all_ else None, None, what="compare", choices="--all")
    rows = compare_rows(views, cfg.storage())
    if json_:
        render.print_json(json.loads(json.dumps(rows, default=str)))
    else:
        context.out.print(compare_table(rows))
