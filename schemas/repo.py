"""Repository specs: what a user may name as a source, checked before git ever runs.

A spec is `owner/name`, `owner/name@ref`, an `https://`, `http://`, `ssh://` or `git://` URL, a
`git@host:path` scp-style address, or a local path (a git work tree or a plain folder). Anything
git would read as an option (`-...`) or a remote helper (`ext::`, `fd::`, `transport::...`) is
refused here, so a hostile string never reaches git's argv.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path

from schemas.base import Frozen
from schemas.errors import InvalidSpec

_OWNER_NAME = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
_REF = re.compile(r"^[A-Za-z0-9_./+-]+$")
_SCP = re.compile(r"^[A-Za-z0-9_.-]+@[A-Za-z0-9_.-]+:[A-Za-z0-9_./~-]+$")
_URL_SCHEMES = ("https://", "http://", "ssh://", "git://")


class RepoKind(StrEnum):
    SHORTHAND = "shorthand"  # owner/name, resolved against CHARFORGE_GIT_BASE_URL
    URL = "url"
    LOCAL = "local"


class RepoSpec(Frozen):
    spec: str  # what the user typed, kept for display
    kind: RepoKind
    location: str  # owner/name, the URL, or the absolute local path
    ref: str | None = None  # branch or tag; None = the default branch

    def url(self, git_base_url: str) -> str:
        """The address git is given: shorthand joined to the base URL, else the location."""
        if self.kind is RepoKind.SHORTHAND:
            return git_base_url.rstrip("/") + "/" + self.location
        return self.location


def _check_ref(ref: str, spec: str) -> str:
    if not ref or ref.startswith("-") or ".." in ref or not _REF.match(ref):
        raise InvalidSpec(f"invalid ref {ref!r} in repo spec {spec!r}")
    return ref


def parse_repo_spec(spec: str, *, cwd: Path | None = None) -> RepoSpec:
    """Parse and validate one spec. Raises `InvalidSpec` with a reason a user can act on."""
    raw = spec.strip()
    if not raw:
        raise InvalidSpec("empty repo spec")
    if raw.startswith("-"):
        raise InvalidSpec(f"repo spec {raw!r} starts with '-': refused (git would read it as an option)")
    if "::" in raw or raw.lower().startswith(("ext:", "fd:")):
        raise InvalidSpec(f"repo spec {raw!r} names a git remote helper (ext::, fd::): refused")
    where = _Here(cwd or Path.cwd())
    if any(ch in raw for ch in "\0\n\r\t ") and not where.exists(Path(raw)):
        raise InvalidSpec(f"repo spec {raw!r} contains whitespace or control characters")

    if raw.startswith(_URL_SCHEMES):
        return _url_spec(raw)
    if raw.startswith("file:"):
        raise InvalidSpec(f"repo spec {raw!r}: give a local path instead of a file: URL")
    if _SCP.match(raw.split("#", 1)[0]):
        return RepoSpec(spec=raw, kind=RepoKind.URL, location=raw)
    # A path that exists is a local directory, even one named like owner/name (write the owner/name
    # of a remote from elsewhere, or its URL, to fetch it instead).
    if raw.startswith((".", "/", "~")) or where.exists(Path(raw)):
        return _local_spec(raw, where)

    name, _, ref_part = raw.partition("@")
    if _OWNER_NAME.match(name) and not name.startswith("."):
        ref = _check_ref(ref_part, raw) if ref_part else None
        return RepoSpec(spec=raw, kind=RepoKind.SHORTHAND, location=name, ref=ref)
    raise InvalidSpec(
        f"cannot read repo spec {raw!r}: expected owner/name[@ref], a git URL "
        "(https://, http://, ssh://, git://, git@host:path) or a local directory"
    )


class _Here:
    """Paths as the submitter means them: `~` expanded, a relative one under `cwd` (the
    submitter's directory, not this process's)."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd

    def path(self, path: Path) -> Path:
        path = path.expanduser()
        return path if path.is_absolute() else self.cwd / path

    def exists(self, path: Path) -> bool:
        try:
            return "\0" not in str(path) and self.path(path).exists()
        except OSError:  # a name too long for the file system, say: not a local folder
            return False


def _url_spec(raw: str) -> RepoSpec:
    location, ref = raw, None
    scheme, _, rest = raw.partition("://")
    netloc = rest.split("/", 1)[0]
    userinfo, _, host = netloc.rpartition("@")
    if userinfo and (scheme != "ssh" or ":" in userinfo):  # ssh://git@host is a user, not a secret
        # Specs are stored on the run and shown in status, logs and manifests: a token in
        # the URL would be too. Git's credential helpers keep it out of sight.
        raise InvalidSpec(
            f"repo URL {scheme}://...@{host}/... carries credentials: use a git credential helper "
            "or an SSH key instead (charforge stores and shows repo URLs)"
        )
    # `https://host/repo.git@v1` — an @ after the path part names a ref.
    if "@" in rest.split("/", 1)[-1]:
        path_part, _, ref = rest.rpartition("@")
        location = f"{scheme}://{path_part}"
        ref = _check_ref(ref, raw)
    return RepoSpec(spec=raw, kind=RepoKind.URL, location=location, ref=ref)


def _local_spec(raw: str, where: _Here) -> RepoSpec:
    local = where.path(Path(raw)).resolve()
    try:
        is_dir = local.is_dir()
    except OSError as exc:  # a name too long, say
        raise InvalidSpec(f"local repo {raw[:80]!r}: {exc.strerror}") from None
    if not is_dir:
        path, at, _ = raw.rpartition("@")
        if at and where.exists(Path(path)) and where.path(Path(path)).is_dir():
            raise InvalidSpec(f"local repo {raw!r}: a local path takes no @ref (its committed HEAD is read); "
                              "check out the ref there, or give the repo's URL with @ref")
        raise InvalidSpec(f"local repo {raw!r} is not a directory")
    if ".git" in local.parts:
        work_tree = Path(*local.parts[:local.parts.index(".git")])
        raise InvalidSpec(f"local repo {raw!r} is inside a .git directory: give the work tree, {work_tree}")
    return RepoSpec(spec=raw, kind=RepoKind.LOCAL, location=str(local))
