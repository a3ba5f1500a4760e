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
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from schemas.corpus import CorpusConfig
from schemas.repo import RepoSpec, parse_repo_spec
from schemas.results import CorpusResult, FetchResult, ResolvedRepo
from workers import keys
from workers.corpus import paths as P
from workers.corpus.builder import BuildStats, CorpusBuilder, SourceTree
from workers.corpus.manifest import FORMAT_VERSION, ManifestWriter, read_manifest
from workers.corpus.sources import GitView
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


@contextmanager
def _scratch(parent: Path | None) -> Iterator[Path]:
    """A private scratch directory, removed afterwards whatever happens."""
    path = Path(tempfile.mkdtemp(prefix="charforge-corpus-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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


def _build(
    repos: Sequence[ResolvedRepo], config: CorpusConfig, sink: IO[bytes], scratch: Path,
    reporter: Reporter, jobs: int | None, outputs: Sequence[Path] = (),
) -> tuple[BuildStats, ManifestWriter]:
    trees = prepare_trees(repos, scratch, reporter, outputs)
    manifest = ManifestWriter(scratch / "manifest-parts")
    try:
        stats = CorpusBuilder(config, sink, manifest, reporter, jobs=jobs).build(trees)
    except BaseException:
        manifest.close()
        raise
    return stats, manifest


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
    """Build (or reuse) the corpus of `fetch.repos` and store corpus.txt + manifest.json."""
    del git_base_url  # the resolved repos carry their URLs
    if fetch.corpus_hash and storage.exists(keys.corpus_manifest(fetch.corpus_hash)):
        return _cached(storage, fetch, reporter)
    with _scratch(scratch_dir) as scratch:
        text_path = scratch / "corpus.txt"
        with open(text_path, "wb") as sink:
            stats, manifest = _build(fetch.repos, config, sink, scratch, reporter, jobs)
        try:
            key = fetch.corpus_hash or corpus_hash(fetch.repos, config, text_sha256=stats.text_sha256)
            assert key is not None
            text = storage.put_file(keys.corpus_text(key), text_path)
            reporter.artifact("corpus", text.key, text.size, text.sha256, files=stats.files,
                              vocab_size=len(stats.vocab()))
            manifest_path = scratch / "manifest.json"
            with open(manifest_path, "wb") as out:
                manifest.write(out, _head(key, fetch.repos, config, stats, text.key))
        finally:
            manifest.close()
        info = storage.put_file(keys.corpus_manifest(key), manifest_path)  # last: marks it complete
        reporter.artifact("manifest", info.key, info.size, info.sha256)
    return CorpusResult(
        hash=key, text_key=text.key, manifest_key=info.key, bytes=stats.bytes, files=stats.files,
        skipped=stats.skipped, vocab_size=len(stats.vocab()), repos=fetch.repos, cached=False,
        main_language=stats.main_language(),
    )


class _Discard:
    """A sink for `inspect`: the corpus is counted and hashed, not kept."""

    def write(self, data: bytes) -> int:
        return len(data)


def _specs(repos: Sequence[RepoSpec | str]) -> list[RepoSpec]:
    return [r if isinstance(r, RepoSpec) else parse_repo_spec(r) for r in repos]


def build_corpus_file(
    repos: Sequence[RepoSpec | str], config: CorpusConfig, out: Path, *, git_base_url: str,
    reporter: Reporter = NULL_REPORTER, manifest_out: Path | None = None, jobs: int | None = None,
    scratch_dir: Path | None = None,
) -> dict[str, Any]:
    """Build a corpus to a local file (and its manifest beside it); returns the summary.

    Both files appear only when the build succeeds (written to temporary names, then renamed).
    """
    resolved = resolve_repos(_specs(repos), git_base_url=git_base_url)
    manifest_out = manifest_out or out.with_name(out.name + ".manifest.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _scratch(scratch_dir) as scratch:
        tmp_text = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            with open(tmp_text, "wb") as sink:
                stats, manifest = _build(resolved, config, sink, scratch, reporter, jobs,
                                         outputs=(tmp_text, out, manifest_out))
            key = corpus_hash(resolved, config, text_sha256=stats.text_sha256)
            head = _head(key, resolved, config, stats, None)
            try:
                with open(scratch / "manifest.json", "wb") as fh:
                    manifest.write(fh, head)
            finally:
                manifest.close()
            os.replace(tmp_text, out)
            shutil.move(scratch / "manifest.json", manifest_out)
        finally:
            tmp_text.unlink(missing_ok=True)
    return head


def inspect_corpus(
    repos: Sequence[RepoSpec | str], config: CorpusConfig, *, git_base_url: str,
    reporter: Reporter = NULL_REPORTER, jobs: int | None = None, scratch_dir: Path | None = None,
) -> dict[str, Any]:
    """The summary a build would produce (files kept/skipped, languages, vocabulary), nothing written."""
    resolved = resolve_repos(_specs(repos), git_base_url=git_base_url)
    with _scratch(scratch_dir) as scratch:
        stats, manifest = _build(resolved, config, _Discard(), scratch, reporter, jobs)  # type: ignore[arg-type]
        manifest.close()
    key = corpus_hash(resolved, config, text_sha256=stats.text_sha256)
    return _head(key, resolved, config, stats, None)


def load_manifest(storage: Storage, corpus_key: str) -> dict[str, Any]:
    with storage.open(keys.corpus_manifest(corpus_key)) as fh:
        return read_manifest(fh)


