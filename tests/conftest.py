"""Suite-wide setup. Service fixtures live in their own plugin modules listed below."""

import os
import secrets

import pytest

# Ray: no usage stats, loopback only (read once, when ray is imported), one auth token for every
# Ray this session starts and every `charforge` subprocess it runs (see orchestrator/ray_runtime.py).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
# Tests never read the developer's own ~/.charforge or .env.
os.environ.pop("CHARFORGE_HOME", None)
os.environ.pop("RAY_ADDRESS", None)
os.environ["CHARFORGE_ENV_FILE"] = os.devnull

pytest_plugins: list[str] = ["tests.services", "tests.seaweedfs", "tests.gitserver"]


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray (2 CPUs, loopback only) shared by one test module."""
    from orchestrator import ray_runtime

    started = ray_runtime.connect(None, num_cpus=2)
    yield
    if started:
        ray_runtime.shutdown()


@pytest.fixture(scope="module")
def ray_cluster():
    """A real three-node Ray cluster on loopback (head, CPU node, "GPU" node) for one test module
    (tests/test_cluster_support.py: RayCluster)."""
    from tests.test_cluster_support import RayCluster

    cluster = RayCluster.start()
    yield cluster
    cluster.shutdown()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path):
    """A fresh, migrated run store: once on SQLite, once on the machine's PostgreSQL."""
    from orchestrator.store import RunStore

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'runs.db'}"
    else:
        url = request.getfixturevalue("fresh_postgres_url")()
    st = RunStore(url, migrate=True)
    yield st
    st.close()
