"""The corpus stage as the pipeline runs it: combining repos, the cache, and the ways a build
stops (empty after filters, over the total cap, a repo gone) without leaving anything behind."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from schemas.corpus import CorpusConfig
from schemas.errors import CorpusError, RepoError
from schemas.events import EventKind
from schemas.repo import parse_repo_spec
from tests.gitserver import Symlink, make_repo, source_files, tiny_png
from workers.corpus import build_corpus_file, builder, run_corpus_stage, run_fetch_stage
from workers.corpus.builder import CorpusBuilder, SourceTree
from workers.corpus.manifest import ManifestWriter
from workers.corpus.scratch import scratch_dir, scratch_root
from workers.corpus.sources import GitView
from workers.progress import NULL_REPORTER, ListReporter
from workers.storage import LocalStorage


def _stages(storage, git_server, specs, config=None, scratch=None, reporter=None):
    config = config or CorpusConfig()
    reporter = reporter or ListReporter("corpus")
    fetch = run_fetch_stage(storage, [parse_repo_spec(s) for s in specs], config,
                            git_base_url=git_server.base_url, reporter=reporter)
    result = run_corpus_stage(storage, fetch, config, git_base_url=git_server.base_url,
                              reporter=reporter, scratch_dir=scratch)
    return fetch, result


@pytest.fixture
def storage(tmp_path):
    return LocalStorage(tmp_path / "store")


@pytest.fixture
def scratch(tmp_path):
    path = tmp_path / "scratch"
    path.mkdir()
    return path


def test_combine_makes_one_corpus_naming_both_commits(git_server, storage):
    a = git_server.publish(git_server.unique("acme/left"), {"a.py": b"x = 1\n"})
    b = git_server.publish(git_server.unique("acme/right"), {"b.lua": b"local y = 2\n"})
    fetch, result = _stages(storage, git_server, [a.name, b.name])
    assert [r.commit for r in fetch.repos] == [a.commit, b.commit]
    assert storage.get_bytes(result.text_key) == (
        f"# {a.name}/a.py\nx = 1\n-- {b.name}/b.lua\nlocal y = 2\n".encode()
    )
    manifest = json.loads(storage.get_bytes(result.manifest_key))
    assert [(r["spec"], r["commit"], r["files"]) for r in manifest["repos"]] == [
        (a.name, a.commit, 1), (b.name, b.commit, 1)
    ]
    assert [(f["repo"], f["path"]) for f in manifest["files"]] == [(0, "a.py"), (1, "b.lua")]
    # Without --combine the dispatcher runs each repo on its own: two corpora, two keys.
    _, alone_a = _stages(storage, git_server, [a.name])
    _, alone_b = _stages(storage, git_server, [b.name])
    assert len({result.hash, alone_a.hash, alone_b.hash}) == 3
    assert storage.get_bytes(alone_a.text_key) == b"# a.py\nx = 1\n"


def test_same_spec_twice_builds_once(git_server, storage, tmp_path):
    repo = git_server.publish(git_server.unique("acme/once"), source_files())
    first_fetch, first = _stages(storage, git_server, [repo.name])
    assert not first_fetch.cached and not first.cached
    reporter = ListReporter("corpus")
    second_fetch = run_fetch_stage(storage, [parse_repo_spec(repo.name)], CorpusConfig(),
                                   git_base_url=git_server.base_url, reporter=reporter)
    assert second_fetch.cached and second_fetch.corpus_hash == first.hash
    git_server.remove(repo.name)  # from here on, any clone would fail
    second = run_corpus_stage(storage, second_fetch, CorpusConfig(), git_base_url=git_server.base_url,
                              reporter=reporter, scratch_dir=tmp_path)
    assert second.cached
    assert second.model_dump(exclude={"cached"}) == first.model_dump(exclude={"cached"})
    assert [a["kind"] for a in reporter.of(EventKind.ARTIFACT)] == ["corpus", "manifest"]
    assert all(a["meta"] == {"cached": True} for a in reporter.of(EventKind.ARTIFACT))
    # A fetch that did not know (another run built it meanwhile) is reused too.
    assert run_corpus_stage(storage, first_fetch, CorpusConfig(), git_base_url=git_server.base_url,
                            reporter=NULL_REPORTER).cached


def test_different_filters_make_a_different_corpus(git_server, storage):
    repo = git_server.publish(git_server.unique("acme/filters"), source_files())
    _, everything = _stages(storage, git_server, [repo.name])
    fetch, only_lua = _stages(storage, git_server, [repo.name], CorpusConfig(langs=("lua",)))
    assert not fetch.cached and only_lua.hash != everything.hash
    assert only_lua.files == 1 and only_lua.main_language == "lua"


def test_all_files_filtered_out_fails_with_counts(git_server, storage, scratch):
    repo = git_server.publish(git_server.unique("acme/blobs"), {
        "logo.png": tiny_png(), "data.bin": b"\0\1\2" * 100, "link": Symlink("/etc/passwd"),
    })
    with pytest.raises(CorpusError) as err:
        _stages(storage, git_server, [repo.name], scratch=scratch)
    assert str(err.value) == ("corpus is empty after filters: 3 files and 1 directory skipped "
                              "(binary: 2, symlink: 1, vcs: 1)")
    assert list(storage.list()) == [] and list(scratch_root(scratch).iterdir()) == []


def test_total_cap_stops_the_build_with_a_clear_message(git_server, storage, scratch):
    files = {f"src/m{i:03}.py": f"# module {i}\n".encode() + b"x = 1\n" * 200 for i in range(100)}
    repo = git_server.publish(git_server.unique("acme/big"), files)
    with pytest.raises(CorpusError) as err:
        _stages(storage, git_server, [repo.name], CorpusConfig(max_total_bytes=10_000), scratch=scratch)
    assert str(err.value) == (
        "corpus is larger than the total size cap of 9.8 KiB: stopped after 8 files (9.6 KiB); "
        "narrow it with --include/--exclude/--lang or raise the cap (--max-total-size, "
        "corpus.max_total_bytes)"
    )
    assert list(storage.list()) == [] and list(scratch_root(scratch).iterdir()) == []


def test_scratch_is_removed_when_the_fetch_fails(git_server, storage, scratch):
    repo = git_server.publish(git_server.unique("acme/gone"), source_files())
    fetch = run_fetch_stage(storage, [parse_repo_spec(repo.name)], CorpusConfig(),
                            git_base_url=git_server.base_url, reporter=NULL_REPORTER)
    git_server.remove(repo.name)
    with pytest.raises(RepoError, match=f"repository not found .*: {repo.name}"):
        run_corpus_stage(storage, fetch, CorpusConfig(), git_base_url=git_server.base_url,
                         reporter=NULL_REPORTER, scratch_dir=scratch)
    assert list(scratch_root(scratch).iterdir()) == []


def test_submodule_contents_are_never_fetched(git_server, storage, tmp_path):
    work = tmp_path / "with-submodule"
    make_repo(work, source_files())
    # A gitlink (mode 160000) as `git submodule add` records it, pointing at some commit.
    commit = subprocess.run(["git", "-C", str(work), "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    subprocess.run(["git", "-C", str(work), "update-index", "--add", "--cacheinfo", f"160000,{commit},deps/lib"],
                   check=True)
    subprocess.run(["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "sub"],
                   check=True)
    _, result = _stages(storage, git_server, [str(work)])
    manifest = json.loads(storage.get_bytes(result.manifest_key))
    assert {"path": "deps/lib/", "reason": "submodule", "repo": 0, "bytes": 0} in manifest["skipped"]


def _build_plain(folder, tmp_path, *, jobs, inline_files):
    tmp_path.mkdir(exist_ok=True)
    out = tmp_path / f"corpus-{jobs}.txt"
    tree = SourceTree(folder, "", GitView(folder, plain_git_dir=tmp_path / f"git-{jobs}"))
    with ManifestWriter(tmp_path / f"parts-{jobs}") as manifest:
        with open(out, "wb") as sink:
            stats = CorpusBuilder(CorpusConfig(), sink, manifest, NULL_REPORTER, jobs=jobs,
                                  inline_files=inline_files).build([tree])
        with open(tmp_path / f"manifest-{jobs}.json", "wb") as fh:
            manifest.write(fh, {"totals": stats.totals()})
    return out.read_bytes(), (tmp_path / f"manifest-{jobs}.json").read_bytes()


@pytest.mark.parametrize("inline_files", [0, 150], ids=["all-pooled", "in-process-first"])
def test_process_pool_gives_the_same_corpus_as_one_process(tmp_path, inline_files):
    """With `inline_files`, the first files are judged in-process (duplicates skipped as they
    are judged) and the rest by the pool (duplicates found as batches come back): the same
    duplicates either way, also across that boundary."""
    folder = tmp_path / "tree"
    for d in range(6):
        for f in range(60):
            path = folder / f"d{d}" / f"f{f:02}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            body = f"def f{d}_{f}():\n    return {d * f}\n" * (1 + f % 7)
            path.write_text(body if f % 13 else "x = 1\n")  # some duplicates too
    (folder / "d3" / "blob.bin").write_bytes(b"\0" * 10)
    assert builder.BATCH_FILES < 360  # several batches, so order across workers matters
    one = _build_plain(folder, tmp_path, jobs=1, inline_files=0)
    main = sys.modules["__main__"]
    # Two pool builds on two threads at once: each swaps `__main__` while starting workers.
    with ThreadPoolExecutor(2) as threads:
        pools = [threads.submit(_build_plain, folder, tmp_path / name, jobs=2, inline_files=inline_files)
                 for name in ("p1", "p2")]
        assert [f.result() for f in pools] == [one, one]
    assert sys.modules["__main__"] is main
    assert b"# d5/f59.py\n" in one[0]


def test_builds_raise_the_gc_threshold_while_they_run_and_put_it_back():
    """Overlapping builds (on threads of one process) share the raised threshold; the last one to
    end restores the threshold from before the first, not the raised one it found."""
    import gc

    before = gc.get_threshold()
    first, second = builder.fewer_collections(), builder.fewer_collections()
    first.__enter__()
    assert gc.get_threshold()[0] == builder.GC_THRESHOLD
    second.__enter__()
    first.__exit__(None, None, None)  # not nested: the first ends while the second runs
    assert gc.get_threshold()[0] == builder.GC_THRESHOLD
    second.__exit__(None, None, None)
    assert gc.get_threshold() == before
    with pytest.raises(CorpusError), builder.fewer_collections():
        raise CorpusError("a failed build")
    assert gc.get_threshold() == before
    try:
        gc.set_threshold(0)  # collection turned off: a build leaves it off
        with builder.fewer_collections():
            assert gc.get_threshold()[0] == 0
        gc.set_threshold(700)
        with builder.fewer_collections():
            gc.set_threshold(5000)  # someone else's setting, made during the build, stands
        assert gc.get_threshold()[0] == 5000
    finally:
        gc.set_threshold(*before)


def test_corpus_stage_on_s3_stores_and_reuses(git_server, s3_storage):
    repo = git_server.publish(git_server.unique("acme/s3"), source_files())
    fetch, built = _stages(s3_storage, git_server, [repo.name])
    assert not fetch.cached and s3_storage.exists(built.text_key)
    text = s3_storage.get_bytes(built.text_key)
    assert len(text) == built.bytes and text.startswith(b"<!-- README.md -->\n")
    again, reused = _stages(s3_storage, git_server, [repo.name])
    assert again.cached and reused.cached and reused.hash == built.hash


_HOLD_SCRATCH = """
import sys, time
from pathlib import Path
from workers.corpus.scratch import scratch_dir, temp_outputs
parent, out = Path(sys.argv[1]), Path(sys.argv[2])
with temp_outputs(out, out.with_name(out.name + ".manifest.json")) as temps, scratch_dir(parent) as s:
    (s / "repo-0").mkdir()
    print(s, *temps, flush=True)
    time.sleep(600)
"""


def test_a_killed_build_leaves_nothing_after_the_next_build(tmp_path):
    """`ray.cancel(force=True)` kills the worker (SIGKILL): no `finally` runs. The next build
    removes what the dead process left; a live process's scratch stays."""
    folder, out, parent = tmp_path / "src", tmp_path / "out" / "c.txt", tmp_path / "scratch"
    folder.mkdir()
    (folder / "a.py").write_text("a = 1\n")
    child = subprocess.Popen([sys.executable, "-c", _HOLD_SCRATCH, str(parent), str(out)],
                             stdout=subprocess.PIPE, text=True, cwd=Path(builder.__file__).parents[2])
    left = [Path(p) for p in child.stdout.readline().split()]
    child.kill()
    child.wait()
    child.stdout.close()
    assert len(left) == 3 and all(p.exists() for p in left)
    with scratch_dir(parent) as live:
        build_corpus_file([str(folder)], CorpusConfig(), out, git_base_url="git://unused/",
                          scratch_dir=parent)
        assert [p for p in left if p.exists()] == []
        assert list(scratch_root(parent).iterdir()) == [live]
    assert out.read_text() == "# a.py\na = 1\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["c.txt", "c.txt.manifest.json"]
