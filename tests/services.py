"""Real services for the tests: PostgreSQL databases and clusters here, a SeaweedFS S3 server in
`tests/seaweedfs.py`, and what both share (a missing service, free ports, markers).

Pytest plugins (listed in `tests/conftest.py`'s `pytest_plugins`). Fixtures:

- `postgres_url` (session): `postgresql+psycopg://...` of a database created for this test
  session on the machine's server and dropped (FORCE) at the end.
- `fresh_postgres_url` (function): a factory; each call creates another empty database and
  returns its URL; all are dropped when the test ends.
- `throwaway_postgres` (function): a factory; each call starts a private PostgreSQL cluster
  (`initdb` + `pg_ctl`, its own port and directory) and returns a `PostgresCluster` with `.url`,
  `.stop()`, `.start()`; all are stopped and removed when the test ends. For tests that take the
  database away mid-run without touching the machine's server.
- `seaweedfs`, `seaweedfs_factory`, `s3_storage`: see `tests/seaweedfs.py`.

A missing service (no PostgreSQL server, no `initdb`, no `weed`) skips the test with the reason,
unless `CHARFORGE_REQUIRE_SERVICES=1` (CI sets it): then the test fails with that reason.
Tests using these fixtures get the `postgres` or `s3` marker automatically.

Where the machine's server lives: `CHARFORGE_TEST_POSTGRES_URL` (default
`postgresql://postgres@127.0.0.1:5432/test`), any database the role can connect to and that it
may create databases from.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ADMIN_POSTGRES_URL = os.environ.get(
    "CHARFORGE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def service_missing(reason: str) -> None:
    """Skip the test, or fail it when CI said the real services must be there."""
    if os.environ.get("CHARFORGE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"required service unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (the caller binds it soon after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- PostgreSQL on the machine's server ----------------------------------------------------


def _sqlalchemy_url(libpq_url: str, dbname: str) -> str:
    base = libpq_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{dbname}"


def _admin_connect():  # -> psycopg.Connection
    try:
        import psycopg
    except ImportError:
        service_missing("psycopg is not installed")
    try:
        return psycopg.connect(ADMIN_POSTGRES_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        service_missing(f"PostgreSQL at {ADMIN_POSTGRES_URL} unreachable: {first}")


class PostgresDatabases:
    """Creates uniquely named databases on the machine's server and drops them all at close."""

    def __init__(self) -> None:
        self._names: list[str] = []

    def create(self) -> str:
        name = f"charforge_test_{uuid.uuid4().hex[:12]}"
        with _admin_connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self._names.append(name)
        return _sqlalchemy_url(ADMIN_POSTGRES_URL, name)

    def close(self) -> None:
        if not self._names:
            return
        with _admin_connect() as conn:
            for name in self._names:
                # FORCE: a dispatcher or pool a test left behind must not keep the database alive.
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._names.clear()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of an empty database on the machine's PostgreSQL, shared by the whole test session."""
    databases = PostgresDatabases()
    try:
        yield databases.create()
    finally:
        databases.close()


@pytest.fixture
def fresh_postgres_url() -> Iterator[Callable[[], str]]:
    """A factory: `fresh_postgres_url()` returns the URL of a new empty database (test-scoped)."""
    databases = PostgresDatabases()
    try:
        yield databases.create
    finally:
        databases.close()


# --- Throwaway PostgreSQL clusters ---------------------------------------------------------


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    return str(candidates[0]) if candidates else None


def _as_postgres_user() -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the `postgres` OS user then."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        service_missing("running as root and `runuser` is missing: cannot start PostgreSQL")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        service_missing("running as root and there is no `postgres` OS user to run PostgreSQL")
    return [runuser, "-u", "postgres", "--"]


class PostgresCluster:
    """A private PostgreSQL cluster on its own port; `stop()`/`start()` keep its data."""

    def __init__(self, pg_ctl: str, root: Path, data_dir: Path, port: int, prefix: list[str]):
        self._pg_ctl, self._prefix = pg_ctl, prefix
        self.root, self.data_dir, self.port = root, data_dir, port
        self.log = root / "postgres.log"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        self.running = False

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root}"
            " -c fsync=off -c full_page_writes=off"
        )
        self._ctl("start", "-w", "-t", "30", "-l", str(self.log), "-o", options)
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; `mode="immediate"` is the closest thing to pulling the plug."""
        self._ctl("stop", "-w", "-t", "30", "-m", mode)
        self.running = False

    def _ctl(self, *args: str) -> None:
        cmd = [*self._prefix, self._pg_ctl, "-D", str(self.data_dir), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"pg_ctl {args[0]} failed: {proc.stderr.strip()}\n{_log_tail(self.log)}"
            )


def _new_cluster() -> PostgresCluster:
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        service_missing("PostgreSQL server binaries (initdb, pg_ctl) not found")
    prefix = _as_postgres_user()
    # Not under pytest's tmp_path: that is private to root, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="charforge-pg-"))
    if prefix:
        shutil.chown(root, "postgres", "postgres")
    data_dir = root / "data"
    cmd = [
        *prefix,
        initdb,
        "-D",
        str(data_dir),
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
        "--no-sync",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {proc.stderr.strip()}")
    for attempt in range(3):
        cluster = PostgresCluster(pg_ctl, root, data_dir, free_port(), prefix)
        try:
            cluster.start()
            return cluster
        except RuntimeError:
            if attempt == 2:  # not a port taken between choosing and binding, then
                shutil.rmtree(root, ignore_errors=True)
                raise
    raise AssertionError("unreachable")


@pytest.fixture
def throwaway_postgres() -> Iterator[Callable[[], PostgresCluster]]:
    """A factory: `throwaway_postgres()` starts a private cluster (about a second)."""
    clusters: list[PostgresCluster] = []

    def start() -> PostgresCluster:
        cluster = _new_cluster()
        clusters.append(cluster)
        return cluster

    try:
        yield start
    finally:
        for cluster in clusters:
            if cluster.running:
                cluster.stop("immediate")
            shutil.rmtree(cluster.root, ignore_errors=True)


_MARKERS = {
    "postgres": {"postgres_url", "fresh_postgres_url", "throwaway_postgres"},
    "s3": {"seaweedfs", "seaweedfs_factory", "s3_storage"},
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the services they use, so `-m "not s3"` deselects them."""
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for marker, fixtures in _MARKERS.items():
            if used & fixtures:
                item.add_marker(marker)
