"""Connecting to Ray: a private local instance (embedded default) or a cluster at RAY_ADDRESS.

Local Ray binds to loopback only: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` makes Ray use 127.0.0.1 as
the node address instead of the machine's reachable one (and refuse remote worker nodes), which is
what a single-machine deployment wants. Usage stats are off. Ray >= 2.59 turns token auth on for
local clusters and generates the token itself; a cluster started with `RAY_AUTH_MODE=token` needs
the same token here, from `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from schemas.errors import TransientError

# Every charforge driver joins this namespace; dispatchers' named relays live in it.
NAMESPACE = "charforge"


class RayUnavailable(TransientError):
    """Ray cannot be started or reached."""


def _token_configured() -> bool:
    return bool(
        os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or (Path.home() / ".ray" / "auth_token").is_file()
    )


def _prepare_local_env() -> None:
    """Environment for a private local Ray; it must be in place before `import ray`.

    `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` makes Ray bind every server to 127.0.0.1 (Ray reads it
    once, at import). Ray >= 2.59 turns token auth on for a new local instance; we give it a
    token of this process's own, which Ray's processes inherit: nothing else needs to join a
    private instance, and no other process can race us rewriting ~/.ray/auth_token. The token
    stays for the life of the process (Ray caches it), so a second local start reuses it.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


def connect(address: str | None, *, num_cpus: int | None = None) -> bool:
    """Start or join Ray once per process; True if this call did it (and should shut it down)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not address:
        _prepare_local_env()
    import ray

    if ray.is_initialized():
        return False
    # Ray's notice that it turned token auth on is for people who did not choose it; we did.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    common: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address:
            ray.init(address=address, **common)
        else:
            # address="local": a new private instance, never a `ray start` cluster found in /tmp/ray.
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **common)
    # (a wrong token raises AuthenticationError, a RayError)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
        hint = ""
        if address and os.environ.get("RAY_AUTH_MODE") == "token" and not _token_configured():
            hint = " (token auth is on: set RAY_AUTH_TOKEN to the cluster's token)"
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RayUnavailable(f"cannot start or reach {where}: {first}{hint}") from None
    return True


def accelerator_resource(preferred: str | None) -> str | None:
    """The resource training and sampling should ask for, if the cluster has any of it."""
    import ray

    resources = ray.cluster_resources()
    name = preferred or "GPU"
    return name if resources.get(name, 0) > 0 else None


def cluster_tag() -> str:
    """A short tag naming the Ray cluster this process is connected to (from its GCS address).

    Dispatcher ids carry it, so a dispatcher only judges the liveness of dispatchers on its own
    cluster: an embedded `jobs submit` on a private local Ray sharing the database is never
    mistaken for a dead dispatcher. (A cluster reached under two addresses gets two tags: its
    dispatchers then notice each other's death by heartbeat only, which is slower but safe.)
    """
    import ray

    return hashlib.sha256(ray.get_runtime_context().gcs_address.encode()).hexdigest()[:6]


def actor_exists(name: str) -> bool:
    """Whether a live named actor `name` exists in charforge's namespace."""
    import ray

    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def nodes_without(resource: str) -> list[str]:
    """Alive nodes that have CPUs and none of `resource`: where CPU-only stages should go."""
    import ray

    return [
        n["NodeID"] for n in ray.nodes()
        if n.get("Alive") and n["Resources"].get("CPU", 0) > 0 and not n["Resources"].get(resource)
    ]


class NodePicker:
    """Live nodes without a resource, taken in turn (the list is refreshed every `refresh` s)."""

    def __init__(self, refresh: float = 10.0) -> None:
        self._nodes: list[str] = []
        self._refresh, self._at, self._turn = refresh, float("-inf"), 0

    def pick(self, without: str) -> str | None:
        now = time.monotonic()
        if now - self._at >= self._refresh:
            self._nodes, self._at = nodes_without(without), now
        if not self._nodes:
            return None
        self._turn += 1
        return self._nodes[self._turn % len(self._nodes)]


def largest_node_cpus() -> int:
    """The most CPUs any one live node has: a task asking for more can never be placed."""
    import ray

    return int(max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0))


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


