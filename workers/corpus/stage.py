"""The fetch and corpus stages of the pipeline, and the same build for `charforge corpus`.

Cache key (docs/corpus.md): sha256 of the format version, the whole CorpusConfig and each repo's
(url, commit). It is known right after `ls-remote`, so an identical spec finds its corpus in
storage without cloning anything. A plain local folder has no commit: its key also covers the
corpus text's sha256, so it can only be known after building (and is never reused blindly).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from schemas.corpus import CorpusConfig
from schemas.errors import StorageError
from schemas.repo import RepoSpec, parse_repo_spec
from schemas.results import CorpusResult, FetchResult, ResolvedRepo
from workers import keys
from workers.corpus import paths as P
from workers.corpus.builder import CorpusBuilder, SourceTree
from workers.corpus.manifest import FORMAT_VERSION, ManifestWriter
from workers.corpus.scratch import open_output, publish, temp_outputs
from workers.corpus.scratch import scratch_dir as _scratch_dir
from workers.corpus.sources import GitView
from workers.corpus.stats import BuildStats
from workers.fetch import checkout, resolve_repos
from workers.progress import NULL_REPORTER, Reporter
from workers.storage import Storage


def corpus_hash(
    repos: Sequence[ResolvedRepo], config: CorpusConfig, *, text_sha256: str | None = None
) -> str | None:
    """The corpus cache key; None when a repo has no commit and the text is not built yet."""
    if text_sha256 is None and any(r.commit is None for r in repos):
        return None
    payload = {
        "format": FORMAT_VERSION,
        "config": config.model_dump(mode="json"),
        "repos": [[r.url, r.commit] for r in repos],
        "text": text_sha256 if any(r.commit is None for r in repos) else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def repo_label(url: str) -> str:
    """A short name for header paths of combined corpora: owner/name, or a folder's name."""
    path = re.sub(r"^[a-z+]+://[^/]*/|^[^/@]+@[^:]+:", "", url).rstrip("/")
    path = path.removesuffix(".git")
    parts = [p for p in path.split("/") if p]
    if os.path.isabs(url):
        return parts[-1] if parts else "repo"
    return "/".join(parts[-2:]) or "repo"


def _labels(repos: Sequence[ResolvedRepo]) -> list[str]:
    if len(repos) < 2:
        return [""]
    labels: list[str] = []
    for repo in repos:
        label = repo_label(repo.url)
        labels.append(label if label not in labels else f"{label}-{len(labels) + 1}")
    return labels


def _outputs_under(root: Path, outputs: Sequence[Path]) -> dict[str, str]:
    """Our own output files inside a plain folder, marked so the build never reads them."""
    marks = {}
    for path in outputs:
        try:
            marks[path.resolve().relative_to(root.resolve()).as_posix()] = P.OUTPUT
        except ValueError:
            pass
    return marks


def prepare_trees(
    repos: Sequence[ResolvedRepo], scratch: Path, reporter: Reporter, outputs: Sequence[Path] = ()
) -> list[SourceTree]:
    """Check each repo out under `scratch` (plain folders are read in place)."""
    trees = []
    for index, (repo, label) in enumerate(zip(repos, _labels(repos), strict=True)):
        if repo.commit is None:
            root = Path(repo.url)
            git = GitView(root, plain_git_dir=scratch / f"plain-{index}.git")
            trees.append(SourceTree(root, label, git, marks=_outputs_under(root, outputs)))
            continue
        reporter.log(f"fetching {repo.spec} at {repo.commit[:12]}")
        dest = scratch / f"repo-{index}"
        root = checkout(repo, dest)
        git = GitView(root)
        trees.append(SourceTree(root, label, git, marks=git.marks(), attrs_above=root != dest))
    return trees


def _head(
    corpus_key: str | None, repos: Sequence[ResolvedRepo], config: CorpusConfig, stats: BuildStats,
    text_key: str | None,
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "hash": corpus_key,
        "repos": [
            {**r.model_dump(), "label": label, "files": stats.repo_files[i], "bytes": stats.repo_bytes[i]}
            for i, (r, label) in enumerate(zip(repos, _labels(repos), strict=True))
        ],
        "config": config.model_dump(mode="json"),
        "totals": stats.totals(),
        "text": {"key": text_key, "bytes": stats.bytes, "sha256": stats.text_sha256},
        "vocab": stats.vocab(),
    }


@contextmanager
def _build(
    repos: Sequence[ResolvedRepo], config: CorpusConfig, text_path: Path | None, scratch: Path,
    reporter: Reporter, jobs: int | None, outputs: Sequence[Path] = (),
) -> Iterator[tuple[BuildStats, ManifestWriter]]:
    """Build the corpus into `text_path` (closed when this yields; None: count it only).

    The manifest's records stay readable inside the `with` block and are closed when it ends:
    this context manager is their only owner.
    """
    trees = prepare_trees(repos, scratch, reporter, outputs)
    with ManifestWriter(scratch / "manifest-parts") as manifest:
        with open_output(text_path) if text_path else nullcontext(None) as sink:
            stats = CorpusBuilder(config, sink, manifest, reporter, jobs=jobs,
                                  parts=scratch / "text-parts").build(trees)  # type: ignore[arg-type]
        yield stats, manifest


def run_fetch_stage(
    storage: Storage, repos: Sequence[RepoSpec], config: CorpusConfig, *, git_base_url: str,
    reporter: Reporter,
) -> FetchResult:
    """Resolve every repo to a commit (no clone) and look the corpus up in storage."""
    resolved = resolve_repos(repos, git_base_url=git_base_url)
    for repo in resolved:
        reporter.log(f"{repo.spec}: {repo.commit or 'plain folder (no commit)'}"
                     + (f" ({repo.ref})" if repo.ref else ""))
    key = corpus_hash(resolved, config)
    cached = key is not None and storage.exists(keys.corpus_manifest(key))
    return FetchResult(repos=resolved, corpus_hash=key, cached=cached)


def _cached(storage: Storage, fetch: FetchResult, reporter: Reporter) -> CorpusResult:
    assert fetch.corpus_hash is not None
    text_key, manifest_key = keys.corpus_text(fetch.corpus_hash), keys.corpus_manifest(fetch.corpus_hash)
    raw = storage.get_bytes(manifest_key)
    manifest = json.loads(raw)
    text, totals = manifest["text"], manifest["totals"]
    reporter.log(f"corpus {fetch.corpus_hash[:12]} is already stored: reusing it")
    reporter.artifact("corpus", text_key, text["bytes"], text["sha256"], cached=True)
    reporter.artifact("manifest", manifest_key, len(raw), hashlib.sha256(raw).hexdigest(), cached=True)
    return CorpusResult(
        hash=fetch.corpus_hash, text_key=text_key, manifest_key=manifest_key, bytes=text["bytes"],
        files=totals["files"], skipped=totals["skipped"], vocab_size=totals["vocab_size"],
        repos=fetch.repos, cached=True, main_language=totals["main_language"],
    )


def run_corpus_stage(
    storage: Storage, fetch: FetchResult, config: CorpusConfig, *, git_base_url: str,
    reporter: Reporter, scratch_dir: Path | None = None, jobs: int | None = None,
) -> CorpusResult:
    """Build (or reuse) the corpus of `fetch.repos` and store corpus.txt + manifest.json.

    `git_base_url` is part of the stage contract (the dispatcher hands every stage the same
    context) but unused here: the fetch stage already joined it into each resolved repo's URL.
    """
    del git_base_url
    if fetch.corpus_hash and storage.exists(keys.corpus_manifest(fetch.corpus_hash)):
        return _cached(storage, fetch, reporter)
    with _scratch_dir(scratch_dir) as scratch:
        text_path, manifest_path = scratch / "corpus.txt", scratch / "manifest.json"
        with _build(fetch.repos, config, text_path, scratch, reporter, jobs) as (stats, manifest):
            key = fetch.corpus_hash or corpus_hash(fetch.repos, config, text_sha256=stats.text_sha256)
            assert key is not None
            text = storage.put_file(keys.corpus_text(key), text_path)
            reporter.artifact("corpus", text.key, text.size, text.sha256, files=stats.files,
                              vocab_size=len(stats.vocab()))
            with open_output(manifest_path) as out:
                manifest.write(out, _head(key, fetch.repos, config, stats, text.key))
        info = storage.put_file(keys.corpus_manifest(key), manifest_path)  # last: marks it complete
        reporter.artifact("manifest", info.key, info.size, info.sha256)
    return CorpusResult(
        hash=key, text_key=text.key, manifest_key=info.key, bytes=stats.bytes, files=stats.files,
        skipped=stats.skipped, vocab_size=len(stats.vocab()), repos=fetch.repos, cached=False,
        main_language=stats.main_language(),
    )


def _specs(repos: Sequence[RepoSpec | str]) -> list[RepoSpec]:
    return [r if isinstance(r, RepoSpec) else parse_repo_spec(r) for r in repos]


def build_corpus_file(
    repos: Sequence[RepoSpec | str], config: CorpusConfig, out: Path, *, git_base_url: str,
    reporter: Reporter = NULL_REPORTER, manifest_out: Path | None = None, jobs: int | None = None,
    scratch_dir: Path | None = None,
) -> dict[str, Any]:
    """Build a corpus to a local file (and its manifest beside it); returns the summary.

    Both destinations are checked before anything is built (a directory, or a place that cannot
    be written, is refused with `InvalidSpec`); both files are written under temporary names
    beside them and renamed into place only when the build succeeded. A write that fails on the
    way raises `StorageError`.
    """
    resolved = resolve_repos(_specs(repos), git_base_url=git_base_url)
    manifest_out = manifest_out or out.with_name(out.name + ".manifest.json")
    with temp_outputs(out, manifest_out) as (tmp_text, tmp_manifest), _scratch_dir(scratch_dir) as scratch:
        try:
            outputs = (tmp_text, tmp_manifest, out, manifest_out)
            with _build(resolved, config, tmp_text, scratch, reporter, jobs, outputs) as (stats, manifest):
                key = corpus_hash(resolved, config, text_sha256=stats.text_sha256)
                head = _head(key, resolved, config, stats, None)
                with open_output(tmp_manifest) as fh:
                    manifest.write(fh, head)
        except OSError as exc:  # the disk filled up, a directory went away meanwhile, ...
            raise StorageError(f"corpus build failed: {exc.strerror or exc} ({exc.filename or out})") from None
        publish(tmp_text, out)
        publish(tmp_manifest, manifest_out)
    return head


def inspect_corpus(
    repos: Sequence[RepoSpec | str], config: CorpusConfig, *, git_base_url: str,
    reporter: Reporter = NULL_REPORTER, jobs: int | None = None, scratch_dir: Path | None = None,
) -> dict[str, Any]:
    """The summary a build would produce (files kept/skipped, languages, vocabulary), nothing written."""
    resolved = resolve_repos(_specs(repos), git_base_url=git_base_url)
    with _scratch_dir(scratch_dir) as scratch, _build(resolved, config, None, scratch, reporter, jobs) as (stats, _):
        key = corpus_hash(resolved, config, text_sha256=stats.text_sha256)
        return _head(key, resolved, config, stats, None)
