"""docker-compose.yml and the Dockerfile, checked against the code (no Docker engine here).

What can be run is run: the bucket job's script against a real SeaweedFS, the Dockerfile's
dependency step against pyproject.toml, every weed/ray/charforge flag against the real tools'
help, the GPU claim of deploy/gpu_worker.py with real locks across processes.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.settings import Settings
from workers.s3 import S3Storage

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
CHARFORGE_IMAGE = SERVICES["dispatcher"]["image"]
CHARFORGE_SERVICES = sorted(n for n, s in SERVICES.items() if s.get("image") == CHARFORGE_IMAGE)
RAY_SERVICES = ["ray-head", "ray-gpu-worker", "dispatcher"]
# What an operator puts in .env (docs/deployment.md); values as a generator would make them.
DOT_ENV = {
    "POSTGRES_PASSWORD": "pgpass0123",
    "S3_ACCESS_KEY": "s3access",
    "S3_SECRET_KEY": "s3secret",
    "RAY_AUTH_TOKEN": "0123456789abcdef0123456789abcdef",
}
# Variables read by something other than Settings: boto3, Ray.
AWS_VARS = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_EC2_METADATA_DISABLED",
}
RAY_VARS = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_USAGE_STATS_ENABLED"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}` substitution."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match.groups()
        have = env.get(name, "")
        if op in (":?", "?") and not have:
            raise KeyError(f"{name}: {arg}")
        if op in (":-", "-") and not have:
            return arg
        return have

    return _VAR.sub(substitute, value)


def env_of(service: str, dot_env: dict[str, str] = DOT_ENV) -> dict[str, str]:
    return {
        k: str(v) for k, v in interpolate(SERVICES[service].get("environment", {}), dot_env).items()
    }


def settings_env_names() -> set[str]:
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names |= set(alias.choices) if alias is not None else {f"CHARFORGE_{name.upper()}"}
    return {n for n in names if n.isupper()}


def command_text(service: str) -> str:
    command = SERVICES[service]["command"]
    return command if isinstance(command, str) else " ".join(command)


# --- the stack's shape ---------------------------------------------------------------------


def test_services_present() -> None:
    assert set(SERVICES) == {
        "postgres",
        "s3",
        "s3-bucket",
        "migrate",
        "ray-head",
        "ray-gpu-worker",
        "dispatcher",
    }
    # One image for every charforge process: Ray needs the same Ray and Python on every node.
    assert set(CHARFORGE_SERVICES) == {
        "s3-bucket",
        "migrate",
        "ray-head",
        "ray-gpu-worker",
        "dispatcher",
    }
    assert all(SERVICES[name]["build"] == "." for name in CHARFORGE_SERVICES)


def test_environment_names_are_ones_the_code_reads() -> None:
    known = settings_env_names() | AWS_VARS | RAY_VARS | {"RAY_ADDRESS"}
    assert {
        "CHARFORGE_DATABASE_URL",
        "CHARFORGE_STORAGE_URL",
        "CHARFORGE_S3_ENDPOINT_URL",
        "RAY_ADDRESS",
        "CHARFORGE_GIT_BASE_URL",
    } <= known
    for name in CHARFORGE_SERVICES:
        unknown = set(env_of(name)) - known
        assert not unknown, f"{name} sets variables nothing reads: {sorted(unknown)}"
    dispatcher = set(env_of("dispatcher"))
    assert {
        "CHARFORGE_DATABASE_URL",
        "CHARFORGE_STORAGE_URL",
        "CHARFORGE_S3_ENDPOINT_URL",
        "RAY_ADDRESS",
        "CHARFORGE_GIT_BASE_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    } <= dispatcher
    # Ray nodes run workers: storage credentials yes, database credentials no (ARCHITECTURE.md).
    for name in ("ray-head", "ray-gpu-worker"):
        env = env_of(name)
        assert "CHARFORGE_DATABASE_URL" not in env and "AWS_SECRET_ACCESS_KEY" in env


def test_dispatcher_settings_resolve_to_the_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [*settings_env_names(), "RAY_ADDRESS"]:
        monkeypatch.delenv(name, raising=False)
    for name, value in env_of("dispatcher").items():
        monkeypatch.setenv(name, value)
    cfg = Settings(_env_file=None)
    assert cfg.database_url == (
        f"postgresql+psycopg://charforge:{DOT_ENV['POSTGRES_PASSWORD']}@postgres:5432/"
        f"{SERVICES['postgres']['environment']['POSTGRES_DB']}"
    )
    assert cfg.ray_address == "ray-head:6379" and not cfg.embedded
    assert cfg.git_base_url == "https://github.com/"
    storage = cfg.storage()
    assert isinstance(storage, S3Storage)
    assert storage.endpoint_url == "http://s3:8333"
    assert "-s3.port=8333" in SERVICES["s3"]["command"]
    # Every charforge process sees the same storage.
    assert len({env_of(name)["CHARFORGE_STORAGE_URL"] for name in CHARFORGE_SERVICES}) == 1


def test_secrets_have_no_defaults() -> None:
    for missing in DOT_ENV:
        dot_env = {k: v for k, v in DOT_ENV.items() if k != missing}
        with pytest.raises(KeyError, match=f"{missing}: set {missing} in .env"):
            interpolate(COMPOSE, dot_env)


def test_bucket_job_creates_the_storage_bucket(seaweedfs_factory, monkeypatch) -> None:
    """Run the job's own script against a real SeaweedFS that has no bucket yet."""
    server = seaweedfs_factory()
    client = server.client()
    client.delete_object(Bucket=server.bucket, Key="_ready")
    client.delete_bucket(Bucket=server.bucket)
    env = env_of("s3-bucket")
    bucket = env["CHARFORGE_STORAGE_URL"].removeprefix("s3://").split("/")[0]
    env.update(
        CHARFORGE_S3_ENDPOINT_URL=server.endpoint_url,
        AWS_ACCESS_KEY_ID=server.access_key,
        AWS_SECRET_ACCESS_KEY=server.secret_key,
        PYTHONPATH=str(ROOT),
        PATH="/usr/bin:/bin",
    )
    python, *args = SERVICES["s3-bucket"]["command"]
    assert python == "python"
    for _ in range(2):  # the job may run on every `up`: the second run must succeed too
        done = subprocess.run(
            [sys.executable, *args], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"bucket {bucket} is ready"
    assert bucket in [b["Name"] for b in client.list_buckets()["Buckets"]]

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CHARFORGE_DATABASE_URL", raising=False)
    storage = Settings(_env_file=None).storage()
    storage.put_bytes("runs/abc123/log.txt", b"hello")
    assert storage.get_bytes("runs/abc123/log.txt") == b"hello"


# --- exposure, auth, GPUs ------------------------------------------------------------------


def test_nothing_is_published_and_ray_stays_internal() -> None:
    for name, service in SERVICES.items():
        assert "ports" not in service, f"{name} publishes ports to the host"
        assert service.get("network_mode") != "host", f"{name} shares the host's network"
    head = SERVICES["ray-head"]["command"]
    assert "--port=6379" in head and "--head" in head
    assert "--address=ray-head:6379" in command_text("ray-gpu-worker")
    assert "ray start --address=ray-head:6379 --num-cpus=0 --num-gpus=0" in command_text(
        "dispatcher"
    )


def test_ray_token_auth_is_on_everywhere() -> None:
    tokens = set()
    for name in RAY_SERVICES:
        raw = SERVICES[name]["environment"]
        assert raw["RAY_AUTH_MODE"] == "token", name
        assert raw["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name
        tokens.add(env_of(name)["RAY_AUTH_TOKEN"])
    assert tokens == {DOT_ENV["RAY_AUTH_TOKEN"]}
    # The head's health check speaks to the GCS, so it fails when the token does not match.
    assert SERVICES["ray-head"]["healthcheck"]["test"][1:3] == ["ray", "health-check"]


def test_gpu_worker_reserves_gpus_and_scales() -> None:
    worker = SERVICES["ray-gpu-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "container_name" not in worker  # a fixed name would make --scale fail
    assert "gpu-locks:/var/lock/charforge-gpus" in worker["volumes"]
    assert worker["command"][0] == "charforge-gpu-worker"
    assert "--num-gpus=0" in SERVICES["ray-head"]["command"]


def test_stateful_services_have_healthchecks_and_are_waited_for() -> None:
    for name in ("postgres", "s3", "ray-head", "ray-gpu-worker"):
        assert SERVICES[name]["healthcheck"]["test"], name
    assert SERVICES["dispatcher"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
        "s3-bucket": {"condition": "service_completed_successfully"},
        "ray-head": {"condition": "service_healthy"},
    }
    assert set(COMPOSE["volumes"]) == {"pgdata", "s3data", "gpu-locks"}


# --- the commands exist as written -----------------------------------------------------------


def test_dispatcher_and_migrate_run_real_charforge_commands() -> None:
    from orchestrator.cli import app

    assert command_text("dispatcher").endswith("&& exec charforge serve")
    assert SERVICES["migrate"]["command"] == ["charforge", "db", "upgrade"]
    for args in (["serve", "--help"], ["db", "upgrade", "--help"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output


def _flags(argv: list[str]) -> set[str]:
    return {arg.split("=")[0] for arg in argv if arg.startswith("-") and arg != "-c"}


def test_weed_flags_exist() -> None:
    weed = Path(sys.executable).with_name("weed")
    if not weed.exists():
        pytest.skip("no weed binary to check the s3 service's flags against")
    command = SERVICES["s3"]["command"]
    assert command[0] == "mini"
    help_text = subprocess.run([weed, "mini", "-h"], capture_output=True, text=True, timeout=60)
    for flag in _flags(command[1:]):
        assert (
            f"  {flag} " in help_text.stdout + help_text.stderr
            or f"  {flag}\n" in help_text.stdout + help_text.stderr
        ), flag


def test_ray_start_flags_exist() -> None:
    ray = Path(sys.executable).with_name("ray")
    help_text = subprocess.run(
        [ray, "start", "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    used = _flags(SERVICES["ray-head"]["command"][2:]) | _flags(
        SERVICES["ray-gpu-worker"]["command"][1:]
    )
    used |= _flags(command_text("dispatcher").split("&&")[0].split()[2:]) | {"--num-gpus"}
    for flag in used:
        assert re.search(rf"^\s+{re.escape(flag)}\b", help_text, re.M), flag


# --- the image -------------------------------------------------------------------------------


def test_dockerfile_installs_the_project_and_its_dependencies(tmp_path: Path) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY . /src" in dockerfile and "pip install --no-cache-dir --no-deps /src" in dockerfile
    assert "/src/deploy/gpu_worker.py /usr/local/bin/charforge-gpu-worker" in dockerfile
    assert "git" in dockerfile.split("apt-get install", 1)[1].split("\n")[0]
    # Run the Dockerfile's own dependency step on our pyproject.toml.
    step = re.search(r'RUN (python -c ".*?") > /tmp/requirements.txt', dockerfile).group(1)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    script = step.removeprefix('python -c "').removesuffix('"').replace("/src/", f"{tmp_path}/src/")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr

    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert out.stdout.split("\n")[:-1] == expected
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".git", ".venv"} <= set(ignored)
    # The corpus builder's C extension: a compiler for the install, and a check that it was built,
    # run where the installed package (not /src) is what imports.
    install = dockerfile[dockerfile.index("COPY . /src"):]
    compiler = install.index("install -y --no-install-recommends gcc")
    assert compiler < install.index("pip install --no-cache-dir --no-deps /src")
    assert "cd / && python -c \"from workers.corpus.textscan import NATIVE; assert NATIVE" in install


# --- deploy/gpu_worker.py: one GPU per replica -------------------------------------------------


GPU_WORKER = ROOT / "deploy" / "gpu_worker.py"


def _gpu_worker():
    spec = importlib.util.spec_from_file_location("gpu_worker", GPU_WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nvidia_smi_output_parsing() -> None:
    output = (
        "GPU-5d1a0c8e-0b7e-2f39-8f2a-1c0ffee00001\nGPU-5d1a0c8e-0b7e-2f39-8f2a-1c0ffee00002\n\n"
    )
    assert _gpu_worker().parse_gpu_uuids(output) == [
        "GPU-5d1a0c8e-0b7e-2f39-8f2a-1c0ffee00001",
        "GPU-5d1a0c8e-0b7e-2f39-8f2a-1c0ffee00002",
    ]
    assert _gpu_worker().parse_gpu_uuids("No devices were found\n") == []


def test_replicas_claim_distinct_gpus(tmp_path: Path) -> None:
    """Each replica is a separate process: locks held by one are seen by the next."""
    claim = textwrap.dedent(f"""
        import importlib.util, sys, time
        from pathlib import Path
        spec = importlib.util.spec_from_file_location("g", {str(GPU_WORKER)!r})
        g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g)
        uuid, fd = g.claim_gpu(["GPU-a", "GPU-b"], Path({str(tmp_path)!r}))
        print(uuid, flush=True)
        sys.stdin.read()  # hold the lock until told to stop, like a running Ray node
    """)

    def replica() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", claim],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    first, second = replica(), None
    try:
        assert first.stdout.readline().strip() == "GPU-a"
        second = replica()
        assert second.stdout.readline().strip() == "GPU-b"
        third = replica()
        _, err = third.communicate(timeout=60)
        assert third.returncode == 1
        assert (
            "all 2 GPUs of this host are taken by other replicas: scale ray-gpu-worker to at most 2"
            in err
        )
        first.communicate("", timeout=60)  # a replica that stops frees its GPU
        fourth = replica()
        assert fourth.stdout.readline().strip() == "GPU-a"
        fourth.communicate("", timeout=60)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.communicate("", timeout=60)
