"""The test services themselves: what other tests rely on them for must hold."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import psutil
import pytest

from orchestrator.settings import load_settings
from tests.seaweedfs import SeaweedFS
from tests.services import PostgresDatabases, service_missing
from workers.s3 import S3Storage

# What weed would listen on if a flag were forgotten (weed mini -h).
WEED_DEFAULT_PORTS = {
    9333,
    19333,
    8080,
    18080,
    9340,
    19340,
    8888,
    18888,
    8333,
    18333,
    23646,
    33646,
    7333,
    6060,
    8181,
    9101,
    9327,
}


def test_seaweedfs_listens_on_loopback_only_on_its_own_ports(seaweedfs: SeaweedFS) -> None:
    assert seaweedfs.pid is not None
    listening = {
        (conn.laddr.ip, conn.laddr.port)
        for conn in psutil.Process(seaweedfs.pid).net_connections("inet")
        if conn.status == psutil.CONN_LISTEN or conn.type == socket.SOCK_DGRAM
    }
    assert listening, "weed should listen somewhere"
    assert {ip for ip, _ in listening} == {"127.0.0.1"}
    assert {port for _, port in listening} <= set(seaweedfs.ports.values())
    assert not {port for _, port in listening} & WEED_DEFAULT_PORTS


def test_seaweedfs_env_is_what_settings_reads(seaweedfs: SeaweedFS, monkeypatch) -> None:
    env = seaweedfs.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    storage = load_settings().storage()
    assert isinstance(storage, S3Storage)
    assert (storage.url, storage.endpoint_url) == (
        env["CHARFORGE_STORAGE_URL"],
        seaweedfs.endpoint_url,
    )
    storage.put_bytes("probe", b"ok")
    assert storage.get_bytes("probe") == b"ok"
    assert seaweedfs.storage_url() != seaweedfs.storage_url()


def test_throwaway_postgres_stops_and_starts_with_its_data(throwaway_postgres) -> None:
    import psycopg

    cluster = throwaway_postgres()
    dsn = cluster.url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (42)")
    if os.geteuid() == 0:  # PostgreSQL refuses root: the fixture runs it as `postgres`
        assert Path(cluster.data_dir).owner() == "postgres"

    cluster.stop()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2)
    cluster.start()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(42,)]


def test_postgres_databases_are_fresh_and_dropped(postgres_url: str, fresh_postgres_url) -> None:
    import psycopg

    first, second = fresh_postgres_url(), fresh_postgres_url()
    assert len({first, second, postgres_url}) == 3
    with psycopg.connect(first.replace("+psycopg", "")) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        assert tables == (0,)

    databases = PostgresDatabases()
    url = databases.create().replace("+psycopg", "")
    open_conn = psycopg.connect(url)  # a pool or dispatcher a test left behind
    databases.close()  # DROP ... WITH (FORCE): the open connection does not keep it alive
    assert _dead(open_conn)
    with psycopg.connect(first.replace("+psycopg", "")) as conn:
        names = [row[0] for row in conn.execute("SELECT datname FROM pg_database")]
    assert url.rsplit("/", 1)[1] not in names


def _dead(conn) -> bool:
    import psycopg

    try:
        conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return True
    return False


def test_missing_service_skips_unless_required(monkeypatch) -> None:
    monkeypatch.delenv("CHARFORGE_REQUIRE_SERVICES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no server here"):
        service_missing("no server here")
    monkeypatch.setenv("CHARFORGE_REQUIRE_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception, match="required service unavailable: no server here"):
        service_missing("no server here")
