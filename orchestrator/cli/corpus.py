"""`charforge corpus build|inspect`: the corpus builder without training (docs/corpus.md).

Thin commands: options -> CorpusConfig -> `workers.corpus`. A progress bar goes to stderr when
it is a terminal; results go to stdout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Self

import typer
from pydantic import ValidationError
from rich.markup import escape

from schemas.base import error_message
from schemas.corpus import CorpusConfig
from schemas.errors import InvalidSpec
from schemas.repo import RepoSpec, parse_repo_spec
from schemas.units import parse_size, plural

corpus_app = typer.Typer(
    help="Build or inspect a corpus from repositories, without training.", no_args_is_help=True
)

Specs = Annotated[list[str], typer.Argument(
    help=escape("owner/name[@ref], a git URL (https://, http://, ssh://, git://, git@host:path) or a local directory."),
    show_default=False,
)]
Include = Annotated[list[str] | None, typer.Option(
    "--include", metavar="GLOB", help="Only paths matching this glob (repeatable).")]
Exclude = Annotated[list[str] | None, typer.Option(
    "--exclude", metavar="GLOB", help="Skip paths matching this glob (repeatable).")]
Lang = Annotated[list[str] | None, typer.Option(
    "--lang", metavar="LANGS", help="Only these languages (identify tags), e.g. c,lua,python.")]
MaxFile = Annotated[str | None, typer.Option(
    "--max-file-size", metavar="SIZE", help=escape("Skip files larger than this (e.g. 512K, 1M). [default: 1M]"))]
MaxTotal = Annotated[str | None, typer.Option(
    "--max-total-size", metavar="SIZE", help=escape("Stop if the corpus grows past this (e.g. 2G). [default: 4G]"))]
MaxLine = Annotated[int | None, typer.Option(
    "--max-line-length", metavar="BYTES", help=escape("Skip files with a longer line (minified). [default: 1000]"))]
NoHeader = Annotated[bool, typer.Option("--no-header", help="No comment line naming each file.")]
InvalidUtf8 = Annotated[str | None, typer.Option(
    "--invalid-utf8", metavar="skip|replace", help=escape("skip the file, or replace bad bytes. [default: skip]"))]
KeepDup = Annotated[bool, typer.Option("--keep-duplicates", help="Keep files whose bytes were already seen.")]
KeepVendored = Annotated[bool, typer.Option(
    "--keep-vendored", help="Keep vendored, generated, lock and minified-by-name files.")]
KeepCrlf = Annotated[bool, typer.Option("--keep-crlf", help="Keep CRLF line endings as they are.")]
Jobs = Annotated[int | None, typer.Option(
    "--jobs", "-j", min=1, metavar="N",
    help=escape("Worker processes; 1 = in-process. [default: cores - 1, at most 8; 1 on two cores]"))]
GitBase = Annotated[str | None, typer.Option(
    "--git-base-url", metavar="URL", help=escape("Where owner/name resolves. [env: CHARFORGE_GIT_BASE_URL]"))]


# The filter flags `build` and `inspect` share, by parameter name.
FILTER_FLAGS = ("include", "exclude", "lang", "max_file_size", "max_total_size", "max_line_length",
                "no_header", "invalid_utf8", "keep_duplicates", "keep_vendored", "keep_crlf")


def _prepare(specs: list[str], params: dict[str, Any]) -> tuple[CorpusConfig, list[RepoSpec]]:
    """The corpus config from a command's filter flags, and its parsed SPECs."""
    config = _config(**{name: params[name] for name in FILTER_FLAGS})
    return config, [parse_repo_spec(s) for s in specs]


def _config(**flags: Any) -> CorpusConfig:
    langs = tuple(p for value in flags.pop("lang") or () for p in value.split(","))
    values: dict[str, Any] = {
        "include": tuple(flags["include"] or ()),
        "exclude": tuple(flags["exclude"] or ()),
        "langs": langs,
        "file_header": not flags["no_header"],
        "dedupe": not flags["keep_duplicates"],
        "skip_vendored": not flags["keep_vendored"],
        "normalize_newlines": not flags["keep_crlf"],
    }
    if flags["max_file_size"] is not None:
        values["max_file_bytes"] = parse_size(flags["max_file_size"])
    if flags["max_total_size"] is not None:
        values["max_total_bytes"] = parse_size(flags["max_total_size"])
    if flags["max_line_length"] is not None:
        values["max_line_length"] = flags["max_line_length"]
    if flags["invalid_utf8"] is not None:
        values["invalid_utf8"] = flags["invalid_utf8"]
    try:
        return CorpusConfig(**values)
    except ValidationError as err:
        first = err.errors()[0]
        raise InvalidSpec(f"bad corpus option {first['loc'][0]}: {error_message(first)}") from None


class _ProgressReporter:
    """A `Reporter` that draws a Rich progress line on stderr (only when it is a terminal)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
            console=Console(stderr=True), transient=True,
        )
        self._task = self._progress.add_task("resolving", total=None)

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def progress(self, step: int, total: int | None = None, **info: Any) -> None:
        mib = info.get("bytes", 0) / (1024 * 1024)
        text = f"{plural(info.get('files'), 'files')} kept ({mib:.1f} MiB), {info.get('skipped', 0)} skipped"
        self._progress.update(self._task, description=text)

    def log(self, message: str) -> None:
        self._progress.update(self._task, description=message)

    def metric(self, step: int, **values: float) -> None:
        pass

    def artifact(self, kind: str, key: str, size: int, sha256: str, **meta: Any) -> None:
        pass

    def flush(self) -> None:
        pass


@contextmanager
def _reporter() -> Iterator[Any]:
    if sys.stderr.isatty():
        with _ProgressReporter() as reporter:
            yield reporter
    else:
        from workers.progress import NULL_REPORTER

        yield NULL_REPORTER


def _git_base_url(flag: str | None) -> str:
    from orchestrator.settings import load_settings

    return load_settings(git_base_url=flag).git_base_url


@corpus_app.command()
def build(
    specs: Specs,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the corpus text.")],
    manifest: Annotated[Path | None, typer.Option(
        help=escape("Where to write the manifest. [default: OUT.manifest.json]"))] = None,
    include: Include = None, exclude: Exclude = None, lang: Lang = None,
    max_file_size: MaxFile = None, max_total_size: MaxTotal = None, max_line_length: MaxLine = None,
    no_header: NoHeader = False, invalid_utf8: InvalidUtf8 = None, keep_duplicates: KeepDup = False,
    keep_vendored: KeepVendored = False, keep_crlf: KeepCrlf = False, jobs: Jobs = None,
    git_base_url: GitBase = None,
) -> None:
    """Build one corpus from all SPECs (combined, in order) into OUT, with a manifest beside it."""
    from workers.corpus import build_corpus_file

    config, repos = _prepare(specs, locals())
    manifest_path = manifest or out.with_name(out.name + ".manifest.json")
    with _reporter() as reporter:
        summary = build_corpus_file(
            repos, config, out, git_base_url=_git_base_url(git_base_url), reporter=reporter,
            manifest_out=manifest_path, jobs=jobs,
        )
    t = summary["totals"]
    typer.echo(f"wrote {out}: {plural(t['files'], 'files')}, {t['bytes']} bytes, vocabulary {t['vocab_size']}; "
               f"skipped {t['skipped']}")
    typer.echo(f"manifest: {manifest_path}")


@corpus_app.command()
def inspect(
    specs: Specs,
    json_: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    top: Annotated[int, typer.Option(min=1, help="How many of the most common characters to show.")] = 20,
    include: Include = None, exclude: Exclude = None, lang: Lang = None,
    max_file_size: MaxFile = None, max_total_size: MaxTotal = None, max_line_length: MaxLine = None,
    no_header: NoHeader = False, invalid_utf8: InvalidUtf8 = None, keep_duplicates: KeepDup = False,
    keep_vendored: KeepVendored = False, keep_crlf: KeepCrlf = False, jobs: Jobs = None,
    git_base_url: GitBase = None,
) -> None:
    """What a corpus of SPECs would hold: files kept, skipped by reason, languages, characters."""
    from workers.corpus import format_summary, inspect_corpus

    config, repos = _prepare(specs, locals())
    with _reporter() as reporter:
        summary = inspect_corpus(repos, config, git_base_url=_git_base_url(git_base_url),
                                 reporter=reporter, jobs=jobs)
    if json_:
        typer.echo(json.dumps(summary, ensure_ascii=False, indent=2))
    else:
        typer.echo(format_summary(summary, top=top))
