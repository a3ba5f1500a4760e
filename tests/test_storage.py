"""Storage: the local directory and S3 (a real SeaweedFS) through the same tests."""

from __future__ import annotations

import hashlib
import os
import tempfile
import tracemalloc
import urllib.request
from pathlib import Path

import pytest

from schemas.errors import ArtifactNotFound, StorageError, StorageUnavailable
from tests.seaweedfs import SeaweedFS, use_s3_env
from workers.s3 import S3Storage
from workers.storage import LocalStorage, ObjectInfo, Storage, check_key, open_storage

MiB = 1024 * 1024


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "file":
        return open_storage((tmp_path / "store").as_uri())
    return request.getfixturevalue("s3_storage")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_round_trip(storage: Storage, tmp_path: Path) -> None:
    data = b"line one\nline two\n" + bytes(range(256))
    info = storage.put_bytes("runs/abc123/samples/0001.jsonl", data)

    assert info == ObjectInfo("runs/abc123/samples/0001.jsonl", len(data), sha(data))
    assert storage.get_bytes(info.key) == data
    assert storage.exists(info.key) and storage.size(info.key) == len(data)
    with storage.open(info.key) as fh:  # file-like the same way on both backends
        assert fh.readline() == b"line one\n"
        assert fh.read(4) == b"line"
        assert fh.read() == data[13:]
    with storage.local_path(info.key) as path:
        assert path.read_bytes() == data
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "copy").write_bytes(b"stale")
    assert storage.download(info.key, tmp_path / "out" / "copy").read_bytes() == data
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["copy"]  # no temp file left


def test_overwrite_replaces_the_whole_object(storage: Storage) -> None:
    storage.put_bytes("a/key", b"first version, longer")
    storage.put_bytes("a/key", b"second")
    assert storage.get_bytes("a/key") == b"second"


def test_writer_and_put_file_report_size_and_sha256(storage: Storage, tmp_path: Path) -> None:
    chunks = [os.urandom(1000), b"", os.urandom(70_000)]
    with storage.writer("corpora/ab12cd/corpus.txt") as out:
        for chunk in chunks:
            out.write(chunk)
    whole = b"".join(chunks)
    assert (out.size, out.sha256) == (len(whole), sha(whole))
    assert storage.get_bytes("corpora/ab12cd/corpus.txt") == whole

    src = tmp_path / "checkpoint.pt"
    src.write_bytes(os.urandom(5000))
    info = storage.put_file("runs/abc123/checkpoints/step-10.pt", src)
    assert info == ObjectInfo("runs/abc123/checkpoints/step-10.pt", 5000, sha(src.read_bytes()))
    assert storage.get_bytes(info.key) == src.read_bytes()


def _leftovers(storage: Storage, spool: Path) -> list[str]:
    """Files a failed write could leave: spooled copies (S3) or temp files beside the key (disk)."""
    found = [p.name for p in spool.iterdir()]
    if isinstance(storage, LocalStorage):
        found += [str(p.relative_to(storage.root)) for p in storage.root.rglob("*") if p.is_file()]
    return found


def test_failed_write_leaves_nothing(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    storage.put_bytes("keep/old", b"old")

    with pytest.raises(RuntimeError, match="disk full in the middle"), storage.writer("keep/new") as out:
        out.write(b"half an object")
        assert not storage.exists("keep/new")  # readers never see a write in progress
        assert list(storage.list("keep/")) == ["keep/old"]
        raise RuntimeError("disk full in the middle")
    with pytest.raises(ValueError), storage.writer("keep/old") as out:
        out.write(b"would replace old")
        raise ValueError("abort")

    assert list(storage.list()) == ["keep/old"]
    assert storage.get_bytes("keep/old") == b"old"
    assert _leftovers(storage, spool) == (["keep/old"] if isinstance(storage, LocalStorage) else [])


def test_list_by_prefix(storage: Storage) -> None:
    for key in ["b/1", "a/2", "ab/x", "a/1", "a/deep/er"]:
        storage.put_bytes(key, b"x")
    assert list(storage.list()) == ["a/1", "a/2", "a/deep/er", "ab/x", "b/1"]
    assert list(storage.list("a/")) == ["a/1", "a/2", "a/deep/er"]
    assert list(storage.list("a")) == ["a/1", "a/2", "a/deep/er", "ab/x"]
    assert list(storage.list("a/deep/")) == ["a/deep/er"]
    assert list(storage.list("c/")) == []


def test_delete(storage: Storage) -> None:
    storage.put_bytes("x/1", b"1")
    storage.put_bytes("x/2", b"2")
    storage.delete("x/1")
    storage.delete("x/1")  # deleting what is gone is fine
    storage.delete("x")  # a "directory" is not an object
    assert not storage.exists("x/1")
    assert list(storage.list("x/")) == ["x/2"]


@pytest.mark.parametrize("call", ["get_bytes", "open", "local_path", "size", "download"])
def test_missing_key_is_artifact_not_found(storage: Storage, call: str, tmp_path: Path) -> None:
    storage.put_bytes("there/now", b"1")
    actions = {
        "get_bytes": lambda k: storage.get_bytes(k),
        "open": lambda k: storage.open(k).__enter__(),
        "local_path": lambda k: storage.local_path(k).__enter__(),
        "size": lambda k: storage.size(k),
        "download": lambda k: storage.download(k, tmp_path / "dl"),
    }
    for key in ("there/not", "there", "there/now/below"):
        with pytest.raises(ArtifactNotFound, match="no object"):
            actions[call](key)
    assert not storage.exists("there/not")
    assert not (tmp_path / "dl").exists()


BAD_KEYS = [
    "../x",
    "a/../../x",
    "/abs",
    "a//b",
    "",
    ".",
    "a/.tmp-1",
    "x/",
    "a\\b",
    "a b",
    "é",
    "a" * 1025,
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_are_refused_everywhere(storage: Storage, key: str, tmp_path: Path) -> None:
    calls = [
        lambda: storage.put_bytes(key, b"x"),
        lambda: storage.writer(key).__enter__(),
        lambda: storage.get_bytes(key),
        lambda: storage.exists(key),
        lambda: storage.size(key),
        lambda: storage.delete(key),
        lambda: storage.presign(key),
        lambda: storage.local_path(key).__enter__(),
    ]
    for call in calls:
        with pytest.raises(StorageError, match="invalid storage key"):
            call()
    if key not in ("", "x/"):  # both are fine as listing prefixes
        with pytest.raises(StorageError, match="invalid storage key"):
            list(storage.list(key))
    # Nothing was written anywhere, inside the store or beside it.
    assert [p.name for p in tmp_path.iterdir()] in ([], ["store"])
    assert list(storage.list()) == []


def test_check_key_accepts_the_layout_keys() -> None:
    for key in [
        "corpora/0a1b/corpus.txt",
        "runs/abc123/checkpoints/step-5.pt",
        "exports/ff00.tar.gz",
        "a.b-c_d",
    ]:
        assert check_key(key) == key


def test_large_object_streams_in_parts(storage: Storage) -> None:
    """150 MiB in and out without holding it in memory; on S3 as a multipart upload."""
    key, block = "corpora/big/corpus.txt", os.urandom(MiB)
    tracemalloc.start()
    try:
        with storage.writer(key) as out:
            for _ in range(150):
                out.write(block)
        write_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        digest = hashlib.sha256()
        with storage.open(key) as fh:
            while chunk := fh.read(MiB):
                digest.update(chunk)
        read_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert out.size == 150 * MiB == storage.size(key)
    assert digest.hexdigest() == out.sha256
    assert write_peak < 32 * MiB and read_peak < 32 * MiB, (write_peak, read_peak)
    if isinstance(storage, S3Storage):
        head = storage._client.head_object(Bucket=storage.bucket, Key=storage.prefix + key)
        assert head["ETag"].strip('"').endswith("-3")  # three 64 MiB parts: multipart happened
        assert head["Metadata"]["sha256"] == out.sha256


def test_presigned_url_is_fetchable(storage: Storage) -> None:
    storage.put_bytes("exports/abc123.jsonl", b'{"sample": 1}\n')
    with urllib.request.urlopen(storage.presign("exports/abc123.jsonl", expires=60)) as resp:
        assert resp.read() == b'{"sample": 1}\n'


# --- S3 failures a user has to fix, or wait out ----------------------------------------------

S3_CALLS = {
    "put_bytes": lambda s: s.put_bytes("k/obj", b"data"),
    "get_bytes": lambda s: s.get_bytes("k/obj"),
    "exists": lambda s: s.exists("k/obj"),
    "list": lambda s: list(s.list("k/")),
    "local_path": lambda s: s.local_path("k/obj").__enter__(),
}


@pytest.mark.parametrize("call", sorted(S3_CALLS))
def test_wrong_secret_names_the_credentials(
    seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    use_s3_env(monkeypatch, seaweedfs)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    storage = open_storage(seaweedfs.storage_url(), endpoint_url=seaweedfs.endpoint_url)
    with pytest.raises(
        StorageError, match="check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    ) as err:
        S3_CALLS[call](storage)
    assert not isinstance(err.value, StorageUnavailable)  # retrying cannot fix a wrong key


def test_no_credentials_at_all(
    seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    use_s3_env(monkeypatch, seaweedfs)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    storage = open_storage(seaweedfs.storage_url(), endpoint_url=seaweedfs.endpoint_url)
    with pytest.raises(StorageError, match=r"no usable S3 credentials .* set AWS_ACCESS_KEY_ID"):
        storage.put_bytes("k/obj", b"data")


@pytest.mark.parametrize("call", sorted(S3_CALLS))
def test_missing_bucket_says_so(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch, call: str):
    use_s3_env(monkeypatch, seaweedfs)
    storage = open_storage("s3://no-such-bucket/p", endpoint_url=seaweedfs.endpoint_url)
    with pytest.raises(StorageError, match="S3 bucket 'no-such-bucket' does not exist at http://"):
        S3_CALLS[call](storage)


@pytest.mark.timeout(90)  # a hang guard: the point is an answer in seconds, not after minutes
def test_stopped_endpoint_is_unavailable_then_recovers(
    seaweedfs_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = seaweedfs_factory()
    use_s3_env(monkeypatch, server)
    storage = open_storage(server.storage_url(), endpoint_url=server.endpoint_url)
    storage.put_bytes("k/obj", b"kept")

    server.stop()
    for call in S3_CALLS.values():
        with pytest.raises(
            StorageUnavailable, match=f"cannot reach S3 at {server.endpoint_url}"
        ) as err:
            call(storage)
        assert err.value.retryable

    server.start()  # same ports, same data directory
    assert storage.get_bytes("k/obj") == b"kept"


# --- URLs ------------------------------------------------------------------------------------


def test_open_storage_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(open_storage(tmp_path.as_uri()), LocalStorage)
    assert open_storage(str(tmp_path / "bare")).root == tmp_path / "bare"
    s3 = open_storage("s3://charforge/team/a", endpoint_url="http://127.0.0.1:1")
    assert (s3.bucket, s3.prefix, s3.url) == ("charforge", "team/a/", "s3://charforge/team/a")
    assert open_storage("s3://charforge").prefix == ""

    for url, message in [
        ("ftp://host/x", "unsupported storage URL"),
        ("file://data/x", "names a host"),
        ("s3:///prefix", "needs a bucket"),
        ("s3://Bad_Bucket/x", "invalid S3 bucket name"),
        ("s3://charforge/../x", "invalid storage key"),
    ]:
        with pytest.raises(StorageError, match=message):
            open_storage(url)


def test_bad_retry_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "many")
    with pytest.raises(StorageError, match="AWS_MAX_ATTEMPTS must be a positive integer"):
        open_storage("s3://charforge/x", endpoint_url="http://127.0.0.1:1")
