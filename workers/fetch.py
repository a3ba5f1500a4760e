"""The fetch stage: resolve repo specs to commits, and check them out shallowly.

Resolving never clones: `git ls-remote` answers for remote repos, `git rev-parse` for a local
work tree, and a plain folder has no commit. Checking out is a shallow, single-branch clone into a
scratch directory with every door git could open shut (see docs/corpus.md, "Safety"):

- argv lists only, `--` before the URL, and the spec is checked again here (never `-...`, never a
  remote helper), so a hostile string cannot become an option or run a command;
- `protocol.allow=never` plus an allow for the one protocol the URL uses (ext/fd never);
- `core.symlinks=false` (links become small text files, which the corpus builder drops by their
  git mode), no submodules, no templates (no hooks), no tags;
- no prompts (`GIT_TERMINAL_PROMPT=0`, ssh `BatchMode`) and a timeout on every call, which
  kills git's whole process group (remote helpers, index-pack, ssh), not just git;
- no inherited `GIT_*` variables (they can allow protocols, point at another repository or
  rewrite the configuration), except the few `git_env` keeps on purpose.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from schemas.errors import InvalidSpec, RepoError, TransientError
from schemas.repo import RepoKind, RepoSpec
from schemas.results import ResolvedRepo

LS_REMOTE_TIMEOUT = 60.0  # seconds; ls-remote moves a few KB
CLONE_TIMEOUT = 1800.0  # seconds; a shallow clone of the Linux kernel is ~250 MB
LOCAL_TIMEOUT = 30.0  # seconds; local rev-parse / ls-files
_COMMIT = re.compile(r"^[0-9a-f]{40}$|^[0-9a-f]{64}$")

# Substrings of git's stderr that mean "try again later" rather than "this repo is wrong".
_TRANSIENT = (
    "connection refused", "connection timed out", "operation timed out", "timed out",
    "could not resolve host", "temporary failure in name resolution", "network is unreachable",
    "no route to host", "connection reset", "early eof", "rpc failed",
    "the remote end hung up unexpectedly", "returned error: 50", "couldn't connect to server",
    "unable to connect",
)
_NOT_FOUND = (
    "not found", "no such repository", "does not appear to be a git repository",
    "could not read username", "authentication failed", "permission denied",
    "access denied", "could not read from remote repository", "returned error: 40",
)


class GitUnavailable(TransientError):
    """The git server could not be reached (refused, timed out, DNS): worth retrying."""


# GIT_* variables kept from the environment: where to find CA certificates changes nothing of
# what git may do. Every other GIT_* is dropped: GIT_ALLOW_PROTOCOL overrides protocol.allow,
# GIT_DIR / GIT_WORK_TREE / GIT_INDEX_FILE point git at another repository, GIT_CONFIG_* and
# GIT_CONFIG_PARAMETERS rewrite its configuration (url.*.insteadOf can turn a URL into ext::).
_KEPT_GIT_VARS = frozenset({"GIT_SSL_CAINFO", "GIT_SSL_CAPATH"})


def git_env() -> dict[str, str]:
    """The environment every git call runs with: English messages, no prompts of any kind, and
    no inherited `GIT_*` variable but the ones set here (and `_KEPT_GIT_VARS`)."""
    env = {
        k: v for k, v in os.environ.items()
        if k not in ("GIT_ASKPASS", "SSH_ASKPASS") and (not k.startswith("GIT_") or k in _KEPT_GIT_VARS)
    }
    env.update(
        LC_ALL="C",
        LANGUAGE="C",
        GIT_TERMINAL_PROMPT="0",
        # Keep a user's own ssh command (keys, proxies); never let it ask for a passphrase.
        GIT_SSH_COMMAND=(os.environ.get("GIT_SSH_COMMAND") or "ssh")
        + " -o BatchMode=yes -o ConnectTimeout=20",
        GIT_ATTR_NOSYSTEM="1",
    )
    return env


def run_git_process(
    argv: Sequence[str], *, timeout: float, cwd: Path | None = None, data: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run a git command line in a session of its own, with `git_env()`.

    On a timeout (or any interruption) the whole process group is killed: `subprocess.run`
    would kill git alone and leave its helpers (git-remote-https, index-pack, ssh) running.
    Raises `subprocess.TimeoutExpired`; callers turn it into their own error.
    """
    with subprocess.Popen(
        list(argv), cwd=cwd, env=git_env(), start_new_session=True,
        stdin=subprocess.DEVNULL if data is None else subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as proc:
        try:
            out, err = proc.communicate(data, timeout=timeout)
        except BaseException:
            _kill_group(proc)
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # git is not reaped yet, so its group still exists
    except ProcessLookupError:
        pass
    proc.wait()


def _protocol_args(url: str) -> list[str]:
    """`-c` options allowing exactly the protocol `url` needs; everything else stays `never`."""
    if url.startswith("file://"):
        allowed = "file"
    elif url.startswith(("https://", "http://")):
        allowed = url.split("://", 1)[0]
    elif url.startswith("git://"):
        allowed = "git"
    else:  # ssh:// and scp-style user@host:path
        allowed = "ssh"
    return ["-c", "protocol.allow=never", "-c", f"protocol.{allowed}.allow=always"]


# Options for every git call that touches a repository we do not control.
_SAFE = [
    "-c", "core.symlinks=false", "-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null",
    "-c", "http.lowSpeedLimit=1024", "-c", "http.lowSpeedTime=60", "-c", "submodule.recurse=false",
]


def _run_git(
    args: Sequence[str], *, what: str, timeout: float, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run git with our safe options; a timeout becomes `GitUnavailable` naming `what`."""
    try:
        proc = run_git_process(["git", *_SAFE, *args], timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise GitUnavailable(f"git timed out after {timeout:.0f}s on {what}") from None
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
    )


def _last_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    fatal = [ln for ln in lines if ln.lower().startswith(("fatal:", "error:"))]
    return (fatal or lines or ["git failed"])[-1]


def _raise_for(proc: subprocess.CompletedProcess[str], spec: str, url: str) -> None:
    """Map a failed remote git call to `GitUnavailable` or `RepoError`, one line each."""
    err = proc.stderr.lower()
    if any(s in err for s in _TRANSIENT):
        # The line that says why (e.g. "errno=Connection refused"), not just "unable to connect".
        lines = [ln.strip() for ln in proc.stderr.splitlines() if any(s in ln.lower() for s in _TRANSIENT)]
        raise GitUnavailable(f"cannot reach the git server for {spec} ({url}): {lines[-1]}")
    if any(s in err for s in _NOT_FOUND):
        raise RepoError(f"repository not found (or not public): {spec} ({url})")
    raise RepoError(f"git failed for {spec} ({url}): {_last_error(proc.stderr)}")


_SCP_URL = re.compile(r"^[A-Za-z0-9_.-]+@[A-Za-z0-9_.-]+:[A-Za-z0-9_./~-]+$")


def checked_url(url: str, spec: str) -> str:
    """`url` if git may be given it: an https/http/ssh/git URL or `user@host:path`, never an
    option or a remote helper. Checked here again because specs (and resolved repos) may arrive
    without `parse_repo_spec`; the one check for every remote address git is handed."""
    allowed = ("https://", "http://", "ssh://", "git://")
    if url.startswith("-") or "::" in url or not (url.startswith(allowed) or _SCP_URL.match(url)):
        raise InvalidSpec(f"refusing repo address {url!r} for spec {spec!r}")
    return url


def _pick_commit(listing: str, ref: str | None) -> tuple[str | None, str | None]:
    """(commit, branch) from `ls-remote --symref URL HEAD` or `ls-remote URL REF REF^{}` output."""
    refs: dict[str, str] = {}
    branch = None
    for line in listing.splitlines():
        left, _, name = line.partition("\t")
        if left.startswith("ref: ") and name == "HEAD":
            branch = left[5:].removeprefix("refs/heads/")
        elif _COMMIT.match(left):
            refs[name] = left
    if ref is None:
        return refs.get("HEAD"), branch
    for name in (f"refs/heads/{ref}", f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}"):
        if name in refs:
            return refs[name], ref
    return None, ref


def _resolve_remote(repo: RepoSpec, git_base_url: str, timeout: float) -> ResolvedRepo:
    url = checked_url(repo.url(git_base_url), repo.spec)
    if repo.ref is None:
        args = ["ls-remote", "--symref", "--", url, "HEAD"]
    else:
        args = ["ls-remote", "--", url, repo.ref, f"{repo.ref}^{{}}"]
    proc = _run_git(args, what=f"{repo.spec} ({url})", timeout=timeout)
    if proc.returncode != 0:
        _raise_for(proc, repo.spec, url)
    commit, ref = _pick_commit(proc.stdout, repo.ref)
    if commit is None and repo.ref is not None and _COMMIT.match(repo.ref):
        commit = repo.ref  # a commit id: checkout fetches it by id
    if commit is None:
        if repo.ref is None:
            raise RepoError(f"repository is empty (no commits on its default branch): {repo.spec} ({url})")
        raise RepoError(f"unknown ref {repo.ref!r} (no such branch or tag) in {repo.spec} ({url})")
    return ResolvedRepo(spec=repo.spec, url=url, ref=ref, commit=commit)


def _local_git(path: Path, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return _run_git(["-C", str(path), *args], what=str(path), timeout=LOCAL_TIMEOUT)


def local_work_tree(path: Path) -> tuple[Path, str] | None:
    """(top level, prefix) when `path` holds files tracked by a git repository, else None.

    A folder inside a repository that git does not track (e.g. an ignored data directory) is
    read as a plain folder: cloning the repository would give an empty corpus.
    """
    top = _local_git(path, ["rev-parse", "--show-toplevel", "--show-prefix"])
    if top.returncode != 0:
        if "dubious ownership" in top.stderr:  # reading it as a plain folder would surprise
            raise RepoError(f"git refuses {path}: it belongs to another user "
                            f"(allow it with: git config --global --add safe.directory {path})")
        return None
    lines = top.stdout.splitlines()
    if len(lines) < 1:
        return None
    tracked = _local_git(path, ["ls-files", "-z", "--", "."])
    if tracked.returncode != 0 or not tracked.stdout:
        head = _local_git(path, ["rev-parse", "--verify", "-q", "HEAD"])
        if head.returncode != 0 and path.resolve() == Path(lines[0]).resolve():
            raise RepoError(f"local git repository has no commits: {path}")
        return None
    prefix = lines[1] if len(lines) > 1 else ""
    return Path(lines[0]), prefix.rstrip("/")


def _resolve_local(repo: RepoSpec) -> ResolvedRepo:
    path = Path(repo.location)
    if not path.is_dir():
        raise RepoError(f"local repo is not a directory: {repo.spec} ({path})")
    if local_work_tree(path) is None:
        return ResolvedRepo(spec=repo.spec, url=str(path), ref=None, commit=None)
    head = _local_git(path, ["rev-parse", "--verify", "HEAD"])
    if head.returncode != 0:
        raise RepoError(f"local git repository has no commits: {repo.spec} ({path})")
    branch = _local_git(path, ["symbolic-ref", "-q", "--short", "HEAD"]).stdout.strip() or None
    return ResolvedRepo(spec=repo.spec, url=str(path), ref=branch, commit=head.stdout.strip())


def resolve_repos(
    repos: Sequence[RepoSpec], *, git_base_url: str, timeout: float = LS_REMOTE_TIMEOUT
) -> tuple[ResolvedRepo, ...]:
    """Each spec's commit, without cloning. Raises `RepoError`, `InvalidSpec` or `GitUnavailable`."""
    out = []
    for repo in repos:
        if repo.kind is RepoKind.LOCAL:
            out.append(_resolve_local(repo))
        else:
            out.append(_resolve_remote(repo, git_base_url, timeout))
    return tuple(out)


def _clone_args(url: str, ref: str | None, dest: Path) -> list[str]:
    branch = ["--branch", ref] if ref and not _COMMIT.match(ref) else []
    return [
        *_protocol_args(url), "clone", "--quiet", "--depth", "1", "--single-branch", "--no-tags",
        "--template=", "--no-recurse-submodules", "--config", "core.symlinks=false",
        *branch, "--", url, str(dest),
    ]


def _fetch_commit(url: str, commit: str, dest: Path, spec: str, timeout: float) -> None:
    """Fetch one commit by id into `dest` and check it out (protocol v2 servers allow this)."""
    what = f"{spec} ({url})"
    if not (dest / ".git").exists():
        init = _run_git(["init", "--quiet", "--template=", str(dest)], what=what, timeout=LOCAL_TIMEOUT)
        if init.returncode != 0:
            raise RepoError(f"git init failed for {spec}: {_last_error(init.stderr)}")
    fetch = _run_git(
        ["-C", str(dest), *_protocol_args(url), "fetch", "--quiet", "--depth", "1", "--no-tags",
         "--", url, commit],
        what=what, timeout=timeout,
    )
    if fetch.returncode != 0:
        if any(s in fetch.stderr.lower() for s in _TRANSIENT):
            _raise_for(fetch, spec, url)
        raise RepoError(
            f"commit {commit[:12]} of {spec} cannot be fetched ({_last_error(fetch.stderr)}); "
            "the branch may have moved: submit again"
        )
    co = _run_git(["-C", str(dest), "checkout", "--quiet", "--detach", "FETCH_HEAD"], what=what,
                  timeout=LOCAL_TIMEOUT)
    if co.returncode != 0:
        raise RepoError(f"checkout of {commit[:12]} failed for {spec}: {_last_error(co.stderr)}")


def _head(dest: Path) -> str:
    proc = _run_git(["-C", str(dest), "rev-parse", "HEAD"], what=str(dest), timeout=LOCAL_TIMEOUT)
    return proc.stdout.strip()


def checkout(repo: ResolvedRepo, dest: Path, *, timeout: float = CLONE_TIMEOUT) -> Path:
    """Check `repo` out at its resolved commit into `dest` (which must not exist yet).

    Returns the directory to read: `dest` itself, or the subdirectory a local spec named. A plain
    local folder (no commit) is not copied: its own path is returned. If the branch moved since
    it was resolved, the resolved commit is fetched by id, so the corpus always matches the
    commit its cache key names; a server that refuses that fails with `RepoError`.
    """
    if repo.commit is None:
        return Path(repo.url)
    url, prefix = repo.url, ""
    if os.path.isabs(url):  # a local work tree (specs store local paths absolute)
        work = local_work_tree(Path(url))
        if work is None:
            raise RepoError(f"local repository no longer tracks any files: {repo.spec} ({url})")
        top, prefix = work
        url = top.as_uri()  # file:// so that --depth is honoured
    else:
        checked_url(url, repo.spec)
    if repo.ref is not None and _COMMIT.match(repo.ref):
        _fetch_commit(url, repo.commit, dest, repo.spec, timeout)
    else:
        proc = _run_git(_clone_args(url, repo.ref, dest), what=f"{repo.spec} ({url})", timeout=timeout)
        if proc.returncode != 0:
            _raise_for(proc, repo.spec, url)
        if _head(dest) != repo.commit:
            _fetch_commit(url, repo.commit, dest, repo.spec, timeout)
    if _head(dest) != repo.commit:
        raise RepoError(f"checked out {_head(dest)[:12]} instead of {repo.commit[:12]} for {repo.spec}")
    return dest / prefix if prefix else dest
