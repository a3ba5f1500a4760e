"""`charforge corpus build|inspect` through Typer's runner: exact outputs and exit codes."""

from __future__ import annotations

import json
import os
import stat

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from schemas.errors import InvalidSpec
from schemas.units import parse_size
from tests.gitserver import hostile_files, source_files
from workers.corpus import scratch

runner = CliRunner()


@pytest.fixture(scope="module")
def hostile(git_server):
    return git_server.publish(git_server.unique("acme/cli"), hostile_files())


def test_build_writes_corpus_and_manifest(git_server, hostile, tmp_path):
    out = tmp_path / "corpus.txt"
    result = runner.invoke(app, ["corpus", "build", hostile.name, "--out", str(out),
                                        "--git-base-url", git_server.base_url])
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"wrote {out}: 6 files, {out.stat().st_size} bytes, vocabulary 65; skipped 13\n"
        f"manifest: {out}.manifest.json\n"
    )
    manifest = json.loads((tmp_path / "corpus.txt.manifest.json").read_text())
    assert manifest["repos"][0]["commit"] == hostile.commit
    assert out.read_bytes().startswith(b"# .gitattributes\n")


def test_inspect_prints_the_summary_without_writing(git_server, hostile, monkeypatch, tmp_path):
    monkeypatch.setenv("CHARFORGE_GIT_BASE_URL", git_server.base_url)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["corpus", "inspect", hostile.name, "--lang", "c,lua", "--top", "3"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:4] == ["repos:", f"  {hostile.name}  {hostile.commit[:12]} (main)  3 files, 2.9 KiB",
                         "kept: 3 files, 3.0 KiB of corpus text (3063 characters, vocabulary 52)",
                         "skipped: 16"]
    assert "  language       6" in lines and "  symlink        3" in lines
    assert lines[-3:] == ["  c                 1.8 KiB   62.1%  2 files",
                          "  lua               1.1 KiB   37.9%  1 files",
                          'top characters: " " 16.8%  "n" 8.5%  "\\n" 7.9%']
    assert list(tmp_path.iterdir()) == []


def test_inspect_json(git_server, hostile):
    result = runner.invoke(app, ["corpus", "inspect", hostile.name, "--json", "--no-header",
                                        "--git-base-url", git_server.base_url])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["totals"]["files"] == 6 and summary["config"]["file_header"] is False
    assert summary["totals"]["bytes"] == sum(len(source_files()[p]) for p in source_files()) + len(
        hostile_files()[".gitattributes"])
    assert "files" not in summary


@pytest.mark.parametrize(("args", "message"), [
    (["inspect", "acme/nope"], "error: repository not found (or not public): acme/nope ({base}acme/nope)\n"),
    (["inspect", "ext::sh -c id"],
     "error: repo spec 'ext::sh -c id' names a git remote helper (ext::, fd::): refused\n"),
    (["inspect", "x/y", "--lang", "pyhton"],
     "error: bad corpus option langs: unknown language pyhton "
     "(use identify tags such as c, lua, python)\n"),
    (["build", "x/y", "--out", "c.txt", "--max-file-size", "lots"],
     "error: cannot read size 'lots': use bytes or a K/M/G suffix, e.g. 1M\n"),
])
def test_user_errors_are_one_line_and_exit_1(git_server, args, message):
    result = runner.invoke(app, ["corpus", *args, "--git-base-url", git_server.base_url])
    assert result.exit_code == 1
    assert result.stderr == message.format(base=git_server.base_url)


def test_empty_corpus_error_through_the_cli(tmp_path):
    (tmp_path / "only.bin").write_bytes(b"\0\0")
    (tmp_path / "node_modules" / "dep").mkdir(parents=True)
    for name in ("a.js", "b.js", "c.js"):  # a skipped directory counts once, as a directory
        (tmp_path / "node_modules" / "dep" / name).write_text("var x;\n")
    result = runner.invoke(app, ["corpus", "build", str(tmp_path), "--out", str(tmp_path / "c.txt")])
    assert result.exit_code == 1
    assert result.stderr == ("error: corpus is empty after filters: 1 file and 1 directory skipped "
                             "(binary: 1, vendored: 1)\n")
    assert not (tmp_path / "c.txt").exists()


def test_sizes():
    assert [parse_size(s) for s in ("1000", "512K", "1M", "1.5GiB", "2g")] == [
        1000, 512 * 1024, 1024 ** 2, int(1.5 * 1024 ** 3), 2 * 1024 ** 3]
    with pytest.raises(InvalidSpec):
        parse_size("-1M")


def test_output_inside_the_folder_is_never_read(tmp_path):
    (tmp_path / "a.py").write_text("a = 1\n")
    out = tmp_path / "corpus.txt"
    for _ in range(2):  # the second build must not swallow the first one's corpus or manifest
        result = runner.invoke(app, ["corpus", "build", str(tmp_path), "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert out.read_text() == "# a.py\na = 1\n"
    manifest = json.loads((tmp_path / "corpus.txt.manifest.json").read_text())
    assert [f["path"] for f in manifest["files"]] == ["a.py"] and manifest["skipped"] == []


def _plain(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "a.py").write_text("a = 1\n")
    return folder


def _build(*args):
    return runner.invoke(app, ["corpus", "build", *map(str, args)])


def test_output_errors_are_one_line_and_leave_the_old_files(tmp_path):
    folder, out = _plain(tmp_path), tmp_path / "c.txt"
    out.write_text("old corpus\n")
    (tmp_path / "afile").write_text("")
    for args, message in [
        (["--out", tmp_path], f"cannot write {tmp_path}: it is a directory; give a new path or a regular "
                              "file to replace"),
        (["--out", "/proc/x/o.txt"], "cannot write /proc/x/o.txt: No such file or directory"),
        (["--out", out, "--manifest", "/proc/x/m.json"], "cannot write /proc/x/m.json: No such file or directory"),
        (["--out", out, "--manifest", tmp_path / "afile" / "m.json"],
         f"cannot write {tmp_path}/afile/m.json: {tmp_path}/afile is not a directory"),
        (["--out", out, "--manifest", out], f"the outputs must be different files: {out}, {out}"),
    ]:
        result = _build(folder, *args)
        assert (result.exit_code, result.stderr) == (1, f"error: {message}\n")
    assert out.read_text() == "old corpus\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "c.txt", "src"]  # no temporaries


def test_an_output_that_is_a_device_fifo_or_link_is_refused_and_left_alone(tmp_path):
    """Written beside and renamed onto its destination, a corpus would replace the node itself
    (and delete it): as root, --out /dev/full did."""
    folder = _plain(tmp_path)
    fifo, link, device = tmp_path / "fifo", tmp_path / "link", tmp_path / "null"
    os.mkfifo(fifo)
    (tmp_path / "target.txt").write_text("kept\n")
    link.symlink_to(tmp_path / "target.txt")
    outs = [(fifo, "a FIFO", stat.S_ISFIFO), (link, "a symbolic link", stat.S_ISLNK)]
    if os.geteuid() == 0:  # mknod needs root
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        outs.append((device, "a character device", stat.S_ISCHR))
    for out, kind, still in outs:
        for args in (["--out", out], ["--out", tmp_path / "c.txt", "--manifest", out]):
            result = _build(folder, *args)
            assert (result.exit_code, result.stderr) == (
                1, f"error: cannot write {out}: it is {kind}; give a new path or a regular file to replace\n")
            assert still(os.lstat(out).st_mode)
    assert (tmp_path / "target.txt").read_text() == "kept\n"
    assert not (tmp_path / "c.txt").exists()


def test_manifest_in_a_new_directory(tmp_path):
    folder, out, manifest = _plain(tmp_path), tmp_path / "c.txt", tmp_path / "new" / "dir" / "m.json"
    result = _build(folder, "--out", out, "--manifest", manifest)
    assert result.exit_code == 0, result.output
    assert out.read_text() == "# a.py\na = 1\n"
    assert json.loads(manifest.read_text())["files"][0]["path"] == "a.py"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "os-replace"])
def test_a_rebuild_replaces_the_old_outputs_and_leaves_no_temporaries(tmp_path, monkeypatch, exchange):
    """Over existing outputs the new files are exchanged with the old ones, which are then
    deleted (ext4 flushes a file renamed over another at once); without renameat2, os.replace."""
    calls = []
    if exchange:
        real = scratch._exchange
        monkeypatch.setattr(scratch, "_exchange", lambda a, b: calls.append(real(a, b)) or calls[-1])
    else:
        monkeypatch.setattr(scratch, "_renameat2", lambda: None)
    folder, out, manifest = _plain(tmp_path), tmp_path / "c.txt", tmp_path / "c.txt.manifest.json"
    out.write_text("old corpus\n")
    manifest.write_text("{}")
    old_inode = out.stat().st_ino
    result = _build(folder, "--out", out)
    assert result.exit_code == 0, result.output
    assert out.read_text() == "# a.py\na = 1\n" and out.stat().st_ino != old_inode
    assert json.loads(manifest.read_text())["files"][0]["path"] == "a.py"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "c.txt.manifest.json", "src"]
    assert calls == ([True, True] if exchange else [])


def test_exchange_gives_way_to_a_plain_rename_where_it_cannot_be_done(tmp_path):
    (tmp_path / "new").write_text("new")
    assert not scratch._exchange(tmp_path / "new", tmp_path / "gone")  # the old output went away
    with pytest.raises(OSError):
        scratch._exchange(tmp_path / "missing", tmp_path / "new")


@pytest.mark.parametrize("argv, shown", [
    (["corpus", "build", "--help"], ["owner/name[@ref], a git URL", "[default: OUT.manifest.json]", "[default: 1M]",
                                     "[default: 4G]", "[default: 1000]", "[default: skip]",
                                     "[default: cores - 1, at most 8; 1 on two cores]",
                                     "[env: CHARFORGE_GIT_BASE_URL]"]),
    (["corpus", "inspect", "--help"], ["owner/name[@ref], a git URL", "[default: 1M]"]),
    (["jobs", "submit", "--help"], ["owner/name[@ref], a git URL or a local path"]),
], ids=["build", "inspect", "submit"])
def test_help_shows_bracketed_text(argv, shown):
    """Typer renders help as Rich markup, where `[default: 1M]` or `[@ref]` is a style tag that
    vanishes unless escaped (or, for defaults, given to the option as `show_default`)."""
    result = runner.invoke(app, argv, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    missing = [text for text in shown if text not in result.output]
    assert not missing, result.output
