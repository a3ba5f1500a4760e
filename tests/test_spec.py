"""Repo specs and run specs as a user types them, and where settings come from."""

from __future__ import annotations

import re

import pytest

from orchestrator.settings import load_settings
from schemas.errors import InvalidSpec
from schemas.repo import RepoKind, parse_repo_spec
from schemas.run import build_run_spec
from schemas.units import plural


@pytest.mark.parametrize("spec, kind, location, ref", [
    ("torvalds/linux", RepoKind.SHORTHAND, "torvalds/linux", None),
    ("torch/torch7@v1.0", RepoKind.SHORTHAND, "torch/torch7", "v1.0"),
    ("https://example.com/a/b.git", RepoKind.URL, "https://example.com/a/b.git", None),
    ("https://example.com/a/b.git@release/2", RepoKind.URL, "https://example.com/a/b.git", "release/2"),
    ("git://127.0.0.1:9418/acme/widgets", RepoKind.URL, "git://127.0.0.1:9418/acme/widgets", None),
    ("ssh://git@example.com/a/b.git", RepoKind.URL, "ssh://git@example.com/a/b.git", None),
    ("git@example.com:a/b.git", RepoKind.URL, "git@example.com:a/b.git", None),
])
def test_specs_users_type(spec, kind, location, ref):
    parsed = parse_repo_spec(spec)
    assert (parsed.kind, parsed.location, parsed.ref) == (kind, location, ref)


def test_shorthand_resolves_against_the_base_url():
    assert parse_repo_spec("acme/widgets").url("git://127.0.0.1:1234/") == "git://127.0.0.1:1234/acme/widgets"
    assert parse_repo_spec("acme/widgets").url("https://ghe.example.com") == "https://ghe.example.com/acme/widgets"


def test_local_paths_become_absolute(tmp_path):
    (tmp_path / "proj").mkdir()
    parsed = parse_repo_spec("./proj", cwd=tmp_path)
    assert parsed.kind is RepoKind.LOCAL and parsed.location == str(tmp_path / "proj")
    with pytest.raises(InvalidSpec, match="not a directory"):
        parse_repo_spec(str(tmp_path / "missing"))


def test_local_paths_that_cannot_be_what_was_meant_say_why(tmp_path):
    (tmp_path / "proj" / ".git" / "objects").mkdir(parents=True)
    for spec in ("./proj/.git", "proj/.git/objects"):
        with pytest.raises(InvalidSpec, match=rf"is inside a .git directory: give the work tree, {tmp_path}/proj$"):
            parse_repo_spec(spec, cwd=tmp_path)
    with pytest.raises(InvalidSpec, match="a local path takes no @ref"):
        parse_repo_spec("./proj@v1", cwd=tmp_path)
    with pytest.raises(InvalidSpec, match="File name too long"):
        parse_repo_spec("./" + "x" * 300, cwd=tmp_path)
    assert parse_repo_spec("acme/" + "x" * 300, cwd=tmp_path).kind is RepoKind.SHORTHAND  # not a folder here


def test_a_folder_under_home_may_hold_a_space(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "My Projects" / "x").mkdir(parents=True)
    assert parse_repo_spec("~/My Projects/x").location == str(tmp_path / "My Projects" / "x")


def test_an_owner_name_that_exists_under_cwd_is_that_folder(tmp_path):
    """Relative to `cwd` (the submitter's directory), not to this process's own."""
    assert parse_repo_spec("acme/widgets", cwd=tmp_path).kind is RepoKind.SHORTHAND
    (tmp_path / "acme" / "widgets").mkdir(parents=True)
    parsed = parse_repo_spec("acme/widgets", cwd=tmp_path)
    assert parsed.kind is RepoKind.LOCAL and parsed.location == str(tmp_path / "acme" / "widgets")
    (tmp_path / "my proj").mkdir()  # a space is fine in a folder that exists there
    assert parse_repo_spec("my proj", cwd=tmp_path).location == str(tmp_path / "my proj")


@pytest.mark.parametrize("spec, reason", [
    ("--upload-pack=touch /tmp/x", "starts with '-'"),
    ("-c", "starts with '-'"),
    ("ext::sh -c touch% /tmp/x", "remote helper"),
    ("fd::3", "remote helper"),
    ("transport::thing", "remote helper"),
    ("file:///etc", "local path instead"),
    ("acme/widgets@../../x", "invalid ref"),
    ("acme/widgets@-x", "invalid ref"),
    ("https://ghp_secret@github.com/a/b.git", "carries credentials"),
    ("https://user:pw@github.com/a/b.git", "carries credentials"),
    ("ssh://git:pw@github.com/a/b.git", "carries credentials"),
    ("not a spec at all", "whitespace"),
    ("just-a-name", "cannot read repo spec"),
    ("", "empty repo spec"),
])
def test_hostile_or_unreadable_specs_are_refused(spec, reason):
    with pytest.raises(InvalidSpec, match=reason) as info:
        parse_repo_spec(spec)
    assert "secret" not in str(info.value) and "pw" not in str(info.value).replace("pw@", "")


def test_run_spec_applies_preset_then_sets():
    spec = build_run_spec(["acme/widgets"], preset="tiny", sets=["rnn_size=64", "train.seed=7", "langs=c,lua"])
    assert spec.model.rnn_size == 64 and spec.model.num_layers == 1  # tiny's layers kept
    assert spec.train.seed == 7 and spec.corpus.langs == ("c", "lua")
    assert spec.name == "widgets"


def test_run_spec_refuses_what_it_cannot_run():
    with pytest.raises(InvalidSpec, match=re.escape("unknown setting 'warp'; valid keys: model.model, ")):
        build_run_spec(["a/b"], sets=["warp=9"])
    with pytest.raises(InvalidSpec, match=r"model\.rnn_size: .*got 'big'"):
        build_run_spec(["a/b"], sets=["rnn_size=big"])
    with pytest.raises(InvalidSpec, match="--set expects key=value"):
        build_run_spec(["a/b"], sets=["rnn_size"])
    with pytest.raises(InvalidSpec, match="choose one of: tiny, small, medium, large"):
        build_run_spec(["a/b"], preset="xl")
    with pytest.raises(InvalidSpec, match="no repo given"):
        build_run_spec([])


def test_settings_precedence_flag_then_env_then_env_file_then_default(tmp_path, monkeypatch):
    env_file = tmp_path / "dotenv"
    env_file.write_text("CHARFORGE_GIT_BASE_URL=git://from-file/\nCHARFORGE_MAX_ATTEMPTS=5\n")
    monkeypatch.setenv("CHARFORGE_ENV_FILE", str(env_file))
    monkeypatch.setenv("CHARFORGE_HOME", str(tmp_path / "home"))
    assert load_settings().git_base_url == "git://from-file/"
    assert load_settings().max_attempts == 5
    monkeypatch.setenv("CHARFORGE_GIT_BASE_URL", "git://from-env/")
    assert load_settings().git_base_url == "git://from-env/"
    assert load_settings(git_base_url="git://from-flag/").git_base_url == "git://from-flag/"
    defaults = load_settings()
    assert defaults.database_url == f"sqlite:///{tmp_path / 'home' / 'charforge.db'}"
    assert defaults.storage_url == (tmp_path / "home" / "store").as_uri()
    assert defaults.heartbeat_timeout == 60.0 and defaults.ray_address is None
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert load_settings().ray_address == "127.0.0.1:6379" and not load_settings().embedded


def test_counts_read_as_english():
    assert [plural(n, "files") for n in (0, 1, 2, None)] == ["0 files", "1 file", "2 files", "0 files"]
    assert [plural(1, w) for w in ("samples", "batches", "runs")] == ["1 sample", "1 batch", "1 run"]


def test_corpus_sizes_set_at_submit_read_like_the_cli_flags():
    spec = build_run_spec(["acme/x"], sets=["corpus.max_file_bytes=2M", "corpus.max_total_bytes=1.5G"])
    assert (spec.corpus.max_file_bytes, spec.corpus.max_total_bytes) == (2 * 2**20, int(1.5 * 2**30))
    with pytest.raises(InvalidSpec) as err:
        build_run_spec(["acme/x"], sets=["corpus.max_file_bytes=lots"])
    assert str(err.value) == ("bad setting: corpus.max_file_bytes: cannot read size 'lots': use bytes or a K/M/G "
                              "suffix, e.g. 1M (got 'lots')")
