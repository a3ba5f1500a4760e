"""The fetch stage against a real `git daemon`: resolving without cloning, safe shallow checkouts,
and bad input refused with a clear message (issue 2 item 6, issue 3 item 1)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from schemas.errors import InvalidSpec, RepoError
from schemas.repo import RepoKind, RepoSpec, parse_repo_spec
from schemas.results import ResolvedRepo
from tests.gitserver import Symlink, make_repo, source_files
from workers.fetch import GitUnavailable, checkout, resolve_repos


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def widgets(git_server):
    files = {**source_files(), "link": Symlink("/etc/passwd")}
    return git_server.publish(git_server.unique("acme/widgets"), files, tags=("v1",),
                              branches=("other",))


def _resolve(spec: str, base: str) -> ResolvedRepo:
    (repo,) = resolve_repos([parse_repo_spec(spec)], git_base_url=base)
    return repo


def test_resolve_default_branch_names_the_commit_and_branch(git_server, widgets):
    repo = _resolve(widgets.name, git_server.base_url)
    assert repo == ResolvedRepo(spec=widgets.name, url=widgets.url, ref="main", commit=widgets.commit)


def test_resolve_tag_and_branch(git_server, widgets):
    assert _resolve(f"{widgets.name}@v1", git_server.base_url).commit == widgets.commit
    assert _resolve(f"{widgets.name}@main", git_server.base_url).ref == "main"
    assert _resolve(f"{widgets.name}@other", git_server.base_url).commit == widgets.commit


def test_unknown_repo_is_one_clear_line(git_server):
    with pytest.raises(RepoError) as err:
        _resolve("acme/nope", git_server.base_url)
    assert str(err.value) == f"repository not found (or not public): acme/nope ({git_server.base_url}acme/nope)"
    assert not err.value.retryable


def test_unknown_ref_names_the_spec(git_server, widgets):
    with pytest.raises(RepoError, match=rf"unknown ref 'nope' \(no such branch or tag\) in {widgets.name}@nope"):
        _resolve(f"{widgets.name}@nope", git_server.base_url)


def test_empty_repo_is_refused(git_server):
    name = git_server.unique("acme/empty")
    git_server.publish_empty(name)
    with pytest.raises(RepoError, match=f"repository is empty .*: {name}"):
        _resolve(name, git_server.base_url)


def test_unreachable_server_is_transient():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    with pytest.raises(GitUnavailable, match="cannot reach the git server for acme/widgets") as err:
        _resolve("acme/widgets", f"git://127.0.0.1:{port}/")
    assert err.value.retryable


def test_silent_server_times_out_instead_of_hanging():
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    try:
        spec = parse_repo_spec("acme/widgets")
        with pytest.raises(GitUnavailable, match="git timed out after 1s"):
            resolve_repos([spec], git_base_url=f"git://127.0.0.1:{listener.getsockname()[1]}/", timeout=1)
    finally:
        for conn in accepted:
            conn.close()
        listener.close()


@pytest.fixture
def git_log(tmp_path, monkeypatch):
    """A `git` on PATH that records its argv, then runs the real git."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "git.log"
    real = subprocess.run(["which", "git"], capture_output=True, text=True, check=True).stdout.strip()
    (bin_dir / "git").write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {real} "$@"\n')
    (bin_dir / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_specs_built_by_hand_are_checked_again(git_log, tmp_path, git_server, widgets):
    marker = tmp_path / "pwned"
    for location in (f"ext::sh -c 'touch {marker}'", "-uhack", f"--upload-pack=touch {marker}"):
        spec = RepoSpec(spec=location, kind=RepoKind.URL, location=location)
        with pytest.raises(InvalidSpec, match="refusing repo address"):
            resolve_repos([spec], git_base_url=git_server.base_url)
    assert not git_log.exists() and not marker.exists()
    _resolve(widgets.name, git_server.base_url)  # the recording git is the one that runs
    assert "ls-remote" in git_log.read_text()


def test_checkout_is_shallow_single_branch_without_links_or_hooks(git_server, widgets, tmp_path):
    repo = _resolve(widgets.name, git_server.base_url)
    root = checkout(repo, tmp_path / "co")
    assert root == tmp_path / "co"
    assert _git(root, "rev-parse", "HEAD") == widgets.commit
    assert _git(root, "rev-parse", "--is-shallow-repository") == "true"
    remotes = _git(root, "for-each-ref", "--format=%(refname)", "refs/remotes").split()
    assert remotes == ["refs/remotes/origin/HEAD", "refs/remotes/origin/main"]  # not "other"
    assert _git(root, "tag", "--list") == ""
    link = root / "link"
    assert not link.is_symlink() and link.read_text() == "/etc/passwd"  # core.symlinks=false
    assert not (root / ".git" / "hooks").exists()  # no templates, so no sample hooks
    assert (root / "src" / "util.c").read_bytes() == source_files()["src/util.c"]


def test_checkout_gets_the_resolved_commit_when_the_branch_moved(git_server, tmp_path):
    published = git_server.publish(git_server.unique("acme/moving"), source_files())
    repo = _resolve(published.name, git_server.base_url)
    newer = git_server.commit(published.name, {"NEW.md": b"new\n"})
    assert newer != published.commit
    root = checkout(repo, tmp_path / "co")
    assert _git(root, "rev-parse", "HEAD") == published.commit
    assert not (root / "NEW.md").exists()


def test_commit_id_as_ref(git_server, widgets, tmp_path):
    repo = _resolve(f"{widgets.name}@{widgets.commit}", git_server.base_url)
    assert repo.commit == widgets.commit
    assert _git(checkout(repo, tmp_path / "co"), "rev-parse", "HEAD") == widgets.commit


def test_local_work_tree_gives_committed_files_only(tmp_path):
    work = tmp_path / "work"
    commit = make_repo(work, {**source_files(), ".gitignore": b"*.log\n"})
    (work / "debug.log").write_text("ignored\n")
    (work / "scratch.py").write_text("untracked\n")
    (work / "src" / "main.py").write_text("uncommitted edit\n")
    repo = _resolve(str(work), "git://unused/")
    assert (repo.url, repo.commit, repo.ref) == (str(work), commit, "main")
    root = checkout(repo, tmp_path / "co")
    assert sorted(p.name for p in root.iterdir()) == [".git", ".gitignore", "README.md", "lib", "src"]
    assert (root / "src" / "main.py").read_bytes() == source_files()["src/main.py"]


def test_local_subdirectory_reads_that_subdirectory(tmp_path):
    work = tmp_path / "work"
    make_repo(work, source_files())
    repo = _resolve(str(work / "src"), "git://unused/")
    root = checkout(repo, tmp_path / "co")
    assert root == tmp_path / "co" / "src"
    assert sorted(p.name for p in root.iterdir()) == ["main.py", "util.c", "util.h"]


def test_plain_folder_has_no_commit_and_is_read_in_place(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    repo = _resolve(str(tmp_path), "git://unused/")
    assert repo.commit is None
    assert checkout(repo, tmp_path / "unused") == tmp_path


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a repo to another user")
def test_local_repo_of_another_user_is_refused_not_read_as_a_folder(tmp_path):
    work = tmp_path / "theirs"
    make_repo(work, source_files())
    subprocess.run(["chown", "-R", "nobody", str(work)], check=True)
    with pytest.raises(RepoError, match=r"belongs to another user .*safe\.directory"):
        _resolve(str(work), "git://unused/")


def _processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains `text` (zombies have none)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass  # exited meanwhile
    return pids


def test_timeout_kills_git_helpers_too():
    """Over http git runs a helper (git-remote-http); a timeout must not leave it behind."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])  # never answered
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    base = f"http://127.0.0.1:{listener.getsockname()[1]}/"
    try:
        with pytest.raises(GitUnavailable, match="git timed out after 1s"):
            resolve_repos([parse_repo_spec("acme/tarpit")], git_base_url=base, timeout=1)
        # SIGKILL is delivered asynchronously: wait for the helpers to go, a bounded while.
        for _ in range(100):
            if not _processes_naming(base + "acme/tarpit"):
                break
            time.sleep(0.05)
        assert _processes_naming(base + "acme/tarpit") == []
    finally:
        listener.close()
        for conn in accepted:
            conn.close()


@pytest.mark.parametrize("rewrite", ["count", "parameters"])
def test_git_variables_in_the_environment_cannot_let_ext_through(rewrite, monkeypatch, tmp_path,
                                                                 git_server, widgets):
    """GIT_CONFIG_* can rewrite a URL into ext:: and GIT_ALLOW_PROTOCOL can allow it: both dropped."""
    marker = tmp_path / "pwned"
    key = f"url.ext::sh -c touch% {marker}.insteadOf"
    if rewrite == "count":
        monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
        monkeypatch.setenv("GIT_CONFIG_KEY_0", key)
        monkeypatch.setenv("GIT_CONFIG_VALUE_0", git_server.base_url)
    else:
        monkeypatch.setenv("GIT_CONFIG_PARAMETERS", f"'{key}'='{git_server.base_url}'")
    monkeypatch.setenv("GIT_ALLOW_PROTOCOL", "ext:git:file")
    repo = _resolve(widgets.name, git_server.base_url)
    assert repo.commit == widgets.commit and not marker.exists()
    checkout(repo, tmp_path / "co")
    assert not marker.exists()


def test_git_dir_in_the_environment_does_not_redirect_a_checkout(monkeypatch, tmp_path, git_server, widgets):
    decoy = tmp_path / "decoy"
    decoy_commit = make_repo(decoy, {"decoy.txt": b"decoy\n"})
    before = sorted((decoy / ".git").rglob("*"))
    monkeypatch.setenv("GIT_DIR", str(decoy / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(decoy))
    monkeypatch.setenv("GIT_INDEX_FILE", str(decoy / ".git" / "index"))
    repo = _resolve(widgets.name, git_server.base_url)
    root = checkout(repo, tmp_path / "co")
    monkeypatch.delenv("GIT_DIR")
    monkeypatch.delenv("GIT_WORK_TREE")
    monkeypatch.delenv("GIT_INDEX_FILE")
    assert _git(root, "rev-parse", "HEAD") == widgets.commit
    assert (root / "src" / "util.c").read_bytes() == source_files()["src/util.c"]
    assert _git(decoy, "rev-parse", "HEAD") == decoy_commit and sorted((decoy / ".git").rglob("*")) == before


def test_checkout_checks_a_hand_built_address_like_resolving_does(git_log, tmp_path):
    for url in ("file:///etc", "ext::sh -c id", "--upload-pack=id", "relative/path"):
        repo = ResolvedRepo(spec=url, url=url, ref="main", commit="0" * 40)
        with pytest.raises(InvalidSpec, match="refusing repo address"):
            checkout(repo, tmp_path / "co")
    assert not git_log.exists()
