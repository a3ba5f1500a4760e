"""The whole path on the production pieces: PostgreSQL for the run store, SeaweedFS over S3.

The environment is set before the module's Ray starts, as a user's would be: Ray workers inherit
the storage credentials from it (workers never get database credentials).
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from orchestrator import ray_runtime
from orchestrator.settings import load_settings
from tests.gitserver import source_files
from tests.services import PostgresDatabases
from tests.settings import use_embedded
from tests.test_pipeline import _check_succeeded_run, invoke, submit_json

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.s3]


@pytest.fixture(scope="module")
def services_env(seaweedfs, git_server, tmp_path_factory):
    databases = PostgresDatabases()
    patch = pytest.MonkeyPatch()
    for key, value in seaweedfs.env(seaweedfs.storage_url("pipeline")).items():
        patch.setenv(key, value)
    patch.setenv("CHARFORGE_DATABASE_URL", databases.create())
    use_embedded(patch, tmp_path_factory.mktemp("home"), git_server.base_url)
    started = ray_runtime.connect(None, num_cpus=2)
    yield
    if started:
        ray_runtime.shutdown()
    patch.undo()
    databases.close()


def test_submit_on_postgresql_and_seaweedfs(services_env, git_server, tmp_path):
    upgraded = invoke("db", "upgrade")
    assert upgraded.exit_code == 0 and "is up to date" in upgraded.stdout
    git_server.publish("acme/gadgets", source_files())
    result, runs = submit_json("--repo", "acme/gadgets", "--preset", "tiny")
    assert result.exit_code == 0, result.output
    cfg = load_settings()
    assert cfg.storage_url.startswith("s3://") and cfg.database_url.startswith("postgresql")
    _check_succeeded_run(runs[0], cfg.storage())

    bucket_key = cfg.storage_url.removeprefix("s3://").split("/", 1)
    out = f"s3://{bucket_key[0]}/{bucket_key[1]}/exports-test/all.zip"
    exported = invoke("jobs", "export", "--all", "--out", out, "--json")
    assert exported.exit_code == 0, exported.output
    info = json.loads(exported.stdout)
    assert info["destination"] == out and info["runs"] == 1 and info["samples"] == 16
    with urllib.request.urlopen(info["url"], timeout=10) as response:  # the presigned URL works
        assert response.read(2) == b"PK"


def test_a_database_never_upgraded_is_one_line(fresh_postgres_url, monkeypatch, tmp_path):
    monkeypatch.setenv("CHARFORGE_HOME", str(tmp_path))
    monkeypatch.setenv("CHARFORGE_DATABASE_URL", fresh_postgres_url())
    result = invoke("jobs", "list")
    assert result.exit_code == 1
    assert "does not have charforge's current schema: run `charforge db upgrade`" in result.stderr
    assert result.stderr.count("\n") == 1
    assert invoke("db", "upgrade").exit_code == 0
    assert invoke("jobs", "list").exit_code == 0
