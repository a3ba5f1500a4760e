"""Batch export (issue 5): complete, verifiable, streaming and atomic archives of runs' samples."""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import stat
import tarfile
import tracemalloc
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from orchestrator.export import export_runs
from schemas.errors import ArtifactNotFound, StorageError, UserError
from schemas.events import EventKind
from schemas.results import CorpusResult
from schemas.run import build_run_spec
from schemas.sampling import SampleConfig
from schemas.status import RunStatus
from schemas.training import ModelConfig, TrainConfig
from schemas.views import ArtifactView, RunView
from workers import keys
from workers.checkpoint import Checkpoint, save_checkpoint
from workers.model import CharRNN
from workers.progress import ListReporter
from workers.sample import run_sample_stage
from workers.storage import LocalStorage
from workers.vocab import Vocab

CODE = "def add(a, b):\n    return (a + b)\n\nitems = [add(1, 2), {'k': \"v\"}]\n" * 8


def make_run(storage: LocalStorage, name: str, *, batches: int = 2, n: int = 3) -> RunView:
    """A finished run as the store would show it: two checkpoints, `batches` sample batches."""
    run_id = secrets.token_hex(6)
    vocab = Vocab.from_text(CODE)
    torch.manual_seed(len(name))
    model = CharRNN(len(vocab), ModelConfig(rnn_size=16, num_layers=1))
    artifacts = []
    for step, val_loss in ((20, 1.2), (40, 1.3)):  # the earlier one is the best
        ckpt = Checkpoint(model.config, TrainConfig(), vocab, model.state_dict(), step=step,
                          val_loss=val_loss, best_val_loss=1.2)
        info = save_checkpoint(storage, keys.checkpoint(run_id, step), ckpt)
        artifacts.append(ArtifactView(kind="checkpoint", key=info.key, size=info.size,
                                      sha256=info.sha256, meta={"step": step, "val_loss": val_loss}))
    corpus_hash = hashlib.sha256(name.encode()).hexdigest()
    text_key = keys.corpus_text(corpus_hash)
    storage.put_bytes(text_key, CODE.encode())
    corpus = CorpusResult(hash=corpus_hash, text_key=text_key,
                          manifest_key=keys.corpus_manifest(corpus_hash), bytes=len(CODE), files=1,
                          skipped=0, vocab_size=len(vocab), repos=(), main_language="python")
    for _ in range(batches):
        reporter = ListReporter("sample")
        run_sample_stage(storage, run_id, SampleConfig(num_samples=n, length=40, prime="def"),
                         reporter, checkpoint_key=keys.checkpoint(run_id, 40), corpus=corpus)
        [event] = reporter.of(EventKind.ARTIFACT)
        artifacts.append(ArtifactView(**event))
    spec = build_run_spec(["acme/" + name], name=name, preset="tiny")
    return RunView(
        id=run_id, name=name, status=RunStatus.SUCCEEDED, created_at=datetime.now(UTC),
        finished_at=datetime.now(UTC), best_val_loss=1.2, step=40, total_steps=40,
        spec=spec.model_dump(mode="json"),
        repos=[{"spec": "acme/" + name, "url": f"git://127.0.0.1/acme/{name}", "commit": "ab" * 20}],
        corpus={"key": text_key, "bytes": len(CODE), "files": 1, "vocab_size": len(vocab),
                "main_language": "python"},
        metrics={"train_loss": 1.1, "val_loss": 1.3, "best_val_loss": 1.2},
        artifacts=artifacts,
        # The loss history the report plots is read from the store; RunView does not carry it.
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and spinning OpenMP threads on a shared 2-core
    machine slow every op by ~100x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[LocalStorage, list[RunView]]:
    storage = LocalStorage(tmp_path_factory.mktemp("store"))
    return storage, [make_run(storage, "widgets", batches=2), make_run(storage, "gadgets", batches=1),
                     make_run(storage, "unselected", batches=1)]


def read_members(path: Path, fmt: str) -> dict[str, bytes]:
    """Archive members by name relative to the archive's top folder."""
    if fmt == "tar.gz":
        with tarfile.open(path) as tar:
            tops = {m.name.split("/", 1)[0] for m in tar.getmembers()}
            assert len(tops) == 1
            return {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()}
    with zipfile.ZipFile(path) as zf:
        return {n.split("/", 1)[1]: zf.read(n) for n in zf.namelist()}


def expected_batches(storage: LocalStorage, runs: list[RunView]) -> dict[str, bytes]:
    return {a.key: storage.get_bytes(a.key) for r in runs for a in r.sample_batches}


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_archive_holds_exactly_the_selected_batches_and_manifest_hashes_match(tmp_path, world, fmt):
    storage, runs = world
    selected = runs[:2]
    out = tmp_path / f"x.{fmt}"
    result = export_runs(selected, storage, str(out), fmt=fmt)

    members = read_members(out, fmt)
    manifest = json.loads(members.pop("manifest.json"))
    assert members.pop("README.txt").decode().startswith("charforge export")
    assert members == expected_batches(storage, selected)  # member name == storage key layout
    listed = {m["name"]: m for m in manifest["members"]}
    assert set(listed) == set(members) | {"README.txt"}
    for name, data in members.items():
        assert listed[name]["sha256"] == hashlib.sha256(data).hexdigest()
        assert listed[name]["size"] == len(data)

    assert [r["id"] for r in manifest["runs"]] == [r.id for r in selected]
    first = manifest["runs"][0]
    assert first["name"] == "widgets" and first["repos"][0]["commit"] == "ab" * 20
    assert first["model"]["rnn_size"] == 32 and first["best_val_loss"] == 1.2
    assert first["final_val_loss"] == 1.3 and first["checkpoint_step"] == 40
    assert first["corpus"]["bytes"] == len(CODE)
    batch = first["batches"][0]
    assert batch["n"] == 3 and batch["checkpoint_step"] == 40 and batch["options"]["prime"] == "def"
    assert set(batch["metrics"]) >= {"bits_per_char", "bracket_balance", "lexer_error_rate"}
    assert batch["corpus_metrics"]["bracket_balance"] == 1.0
    assert (result.runs, result.batches, result.samples, result.checkpoints) == (2, 3, 9, 0)
    assert result.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert result.destination == str(out) and result.url == out.as_uri()
    assert out.stat().st_mode & 0o777 == 0o644  # shareable, not mkstemp's private 0600


def test_jsonl_is_the_manifest_then_every_batch_verbatim(tmp_path, world):
    storage, runs = world
    out = tmp_path / "all.jsonl"
    result = export_runs(runs[:2], storage, str(out))  # format from the name
    assert result.format == "jsonl"
    head, _, rest = out.read_bytes().partition(b"\n")
    manifest = json.loads(head)
    assert manifest["type"] == "manifest" and manifest["totals"]["samples"] == 9
    batches = expected_batches(storage, runs[:2])
    assert rest == b"".join(batches.values())
    assert [m["sha256"] for m in manifest["members"]] == [
        hashlib.sha256(b).hexdigest() for b in batches.values()
    ]
    assert all(json.loads(line)["type"] == "sample" for line in rest.splitlines())


def test_include_checkpoints_adds_each_runs_best_checkpoint(tmp_path, world):
    storage, runs = world
    out = tmp_path / "with-ckpt.tar.gz"
    result = export_runs(runs[:1], storage, str(out), include_checkpoints=True)
    members = read_members(out, "tar.gz")
    best = keys.checkpoint(runs[0].id, 20)
    assert members[best] == storage.get_bytes(best)
    assert keys.checkpoint(runs[0].id, 40) not in members
    payload = torch.load(io.BytesIO(members[best]), weights_only=True)
    assert payload["format"] == "charforge-checkpoint"
    assert json.loads(members["manifest.json"])["runs"][0]["checkpoint"]["step"] == 20
    assert result.checkpoints == 1
    with pytest.raises(UserError, match="include-checkpoints needs"):
        export_runs(runs[:1], storage, str(tmp_path / "x.jsonl"), include_checkpoints=True)


def test_destination_errors_are_one_line(tmp_path, world):
    storage, runs = world
    with pytest.raises(UserError) as err:
        export_runs(runs, storage, str(tmp_path / "missing" / "x.tar.gz"))
    assert str(err.value) == (
        f"cannot write {tmp_path / 'missing' / 'x.tar.gz'}: directory {tmp_path / 'missing'} "
        "does not exist"
    )
    assert not (tmp_path / "missing").exists()
    errors = [err]
    for pattern, args, kwargs in [
        (r"ends in \.zip but --format is tar\.gz", (runs, storage, str(tmp_path / "x.zip")),
         {"fmt": "tar.gz"}),
        ("unknown export format 'rar'", (runs, storage, str(tmp_path / "x")), {"fmt": "rar"}),
        (r"ends in \.rar, which charforge does not write: name it \.tar\.gz or \.zip or \.jsonl",
         (runs, storage, str(tmp_path / "x.rar")), {}),
        ("no runs selected", ([], storage, str(tmp_path / "x.tar.gz")), {}),
    ]:
        with pytest.raises(UserError, match=pattern) as err:
            export_runs(*args, **kwargs)
        errors.append(err)
    for message in (str(e.value) for e in errors):
        assert "\n" not in message


def test_a_folder_named_like_another_archive_takes_the_export_inside(tmp_path, world):
    storage, runs = world
    (tmp_path / "old.tar").mkdir()
    result = export_runs(runs, storage, str(tmp_path / "old.tar"))
    assert Path(result.destination).parent == tmp_path / "old.tar" and result.destination.endswith(".tar.gz")


def test_a_destination_that_is_a_fifo_or_link_is_refused_and_left_alone(tmp_path, world):
    """The archive is renamed onto its destination: over a FIFO or device that would replace the node."""
    storage, runs = world
    fifo, link = tmp_path / "fifo.tar.gz", tmp_path / "link.tar.gz"
    os.mkfifo(fifo)
    link.symlink_to(tmp_path / "elsewhere.tar.gz")
    for out, kind in ((fifo, "a FIFO"), (link, "a symbolic link")):
        with pytest.raises(UserError) as err:
            export_runs(runs, storage, str(out))
        assert str(err.value) == f"cannot write {out}: it is {kind}; give a new path or a regular file to replace"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.tar.gz", "link.tar.gz"]


def test_existing_directory_gets_a_generated_name_and_no_out_uses_storage(tmp_path, world):
    storage, runs = world
    result = export_runs(runs[:1], storage, str(tmp_path), fmt="zip")
    assert Path(result.destination) == tmp_path / f"charforge-export-{result.export_id}.zip"
    assert zipfile.ZipFile(result.destination).testzip() is None
    stored = export_runs(runs[:1], storage, None)
    key = keys.export(stored.export_id, "tar.gz")
    assert storage.exists(key) and storage.size(key) == stored.size


def test_s3_style_destination_is_one_upload_with_a_url(tmp_path, world):
    storage, runs = world
    bucket = LocalStorage(tmp_path / "bucket")
    urls = []

    def factory(url: str) -> LocalStorage:
        urls.append(url)
        return bucket

    result = export_runs(runs[:2], storage, "s3://exports-bucket/team/a.zip", out_storage_factory=factory)
    assert urls == ["s3://exports-bucket"]
    assert result.destination == "s3://exports-bucket/team/a.zip" and result.format == "zip"
    assert result.url == (bucket.root / "team/a.zip").as_uri()
    assert bucket.list() and list(bucket.list()) == ["team/a.zip"]
    with pytest.raises(UserError, match="an S3 key may hold only"):
        export_runs(runs[:1], storage, "s3://b/has space.tar.gz", out_storage_factory=factory)


def test_s3_destination_on_seaweedfs(request, world):
    try:
        s3 = request.getfixturevalue("s3_storage")
    except pytest.FixtureLookupError:
        pytest.skip("the SeaweedFS fixtures (tests/seaweedfs.py) are not loaded in this suite")
    storage, runs = world
    dest = f"s3://{s3.bucket}/{s3.prefix}export.tar.gz"
    result = export_runs(runs[:1], storage, dest, out_storage_factory=lambda url: type(s3)(
        s3.bucket, endpoint_url=s3.endpoint_url))
    assert result.url.startswith("http") and "Signature" in result.url
    with s3.open("export.tar.gz") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == result.sha256


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("fmt", ["tar.gz", "zip", "jsonl"])
def test_a_batch_gone_midway_leaves_no_archive(tmp_path, fmt):
    store = LocalStorage(tmp_path / "store")
    victim = make_run(store, "victim", batches=2)
    store.delete(victim.sample_batches[1].key)  # the run's second batch vanished
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / f"keep.{fmt}").write_bytes(b"an older archive")
    with pytest.raises(ArtifactNotFound):
        export_runs([victim], store, str(out_dir / f"keep.{fmt}"))
    assert leftovers(out_dir) == [f"keep.{fmt}"]
    assert (out_dir / f"keep.{fmt}").read_bytes() == b"an older archive"


@pytest.mark.parametrize("fmt", ["tar.gz", "zip", "jsonl"])
def test_a_batch_changed_since_recorded_aborts_the_export(tmp_path, fmt):
    store = LocalStorage(tmp_path / "store")
    run = make_run(store, "tampered", batches=2)
    key = run.sample_batches[1].key
    store.put_bytes(key, store.get_bytes(key).replace(b"def", b"DEF", 1))  # same size, other bytes
    with pytest.raises(StorageError, match="size or sha256 differs"):
        export_runs([run], store, str(tmp_path / f"x.{fmt}"))
    assert leftovers(tmp_path) == ["store"]


class DyingStorage(LocalStorage):
    """A storage whose reads fail after `budget` bytes, like a network that drops mid-download."""

    budget = 200

    def open(self, key):  # type: ignore[override]
        storage = self

        class Reader:
            def __init__(self, inner):
                self.inner = inner

            def read(self, size=-1):
                data = self.inner.read(size)
                storage.budget -= len(data)
                if storage.budget < 0:
                    raise StorageError("connection reset while reading")
                return data

        parent = super().open(key)

        class Ctx:
            def __enter__(self):
                return Reader(parent.__enter__())

            def __exit__(self, *exc):
                return parent.__exit__(*exc)

        return Ctx()


def test_a_read_failing_mid_member_leaves_no_archive(tmp_path, world):
    storage, runs = world
    dying = DyingStorage(storage.root)
    with pytest.raises(StorageError, match="connection reset"):
        export_runs(runs[:2], dying, str(tmp_path / "x.tar.gz"))
    assert leftovers(tmp_path) == []


def test_export_streams_a_large_batch(tmp_path):
    """A batch of several MB goes through in chunks: peak Python memory stays far below it."""
    store = LocalStorage(tmp_path / "store")
    run = make_run(store, "big", batches=0)
    run_id = run.id
    line = json.dumps({"type": "sample", "text": "x = (1 + 2)\n" * 40}).encode() + b"\n"
    key = keys.samples(run_id, "f" * 16)
    with store.writer(key) as out:
        for _ in range(8 * 1024 * 1024 // len(line)):
            out.write(line)
    run.artifacts.append(ArtifactView(kind="samples", key=key, size=out.size, sha256=out.sha256,
                                      meta={"n": 1}))
    tracemalloc.start()
    try:
        export_runs([run], store, str(tmp_path / "big.jsonl"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (tmp_path / "big.jsonl").stat().st_size > out.size
    assert peak < out.size / 2
