"""Pieces the cluster tests share (this module holds no tests of its own).

- `RayCluster`: a real multi-node Ray cluster on loopback (`ray.cluster_utils.Cluster`): a head
  with 1 CPU, a CPU node, and a "GPU" node carrying the custom resource `accel`; this process
  joins it as a driver. Storage credentials for the test S3 servers are put in the environment
  before the nodes start, because Ray workers inherit the environment of their node.
- `GitTarpit`: a TCP proxy in front of the git daemon that serves the first `allow` connections
  and holds every later one open without answering: a git server that hangs, so a test can catch
  the fetch or corpus stage mid-way on purpose.
- `wait_until`, `alive`, `assert_resumed_not_restarted`.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tests.seaweedfs import S3_ACCESS_KEY, S3_SECRET_KEY

ACCEL = "accel"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class RayCluster:
    cluster: Any
    head: Any
    cpu: Any
    gpu: Any
    saved_env: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def start(cls) -> RayCluster:
        from ray.cluster_utils import Cluster

        from orchestrator import ray_runtime

        saved = {k: os.environ.get(k) for k in S3_ENV}
        os.environ.update(S3_ENV)
        # Health checks every 0.5 s: a killed node is declared dead in ~1.5 s instead of ~15 s,
        # which is all the tests would otherwise wait for (the settings, not the behaviour, differ
        # from a production cluster's).
        health = {"health_check_period_ms": 500, "health_check_timeout_ms": 500,
                  "health_check_failure_threshold": 3}
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False, "_system_config": health})
        cpu = cluster.add_node(num_cpus=2)
        gpu = cluster.add_node(num_cpus=2, resources={ACCEL: 2})
        cluster.wait_for_nodes()
        ray_runtime.connect(cluster.address)
        return cls(cluster, cluster.head_node, cpu, gpu, saved)

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def gpu_node_id(self) -> str:
        return self.gpu.node_id

    @property
    def cpu_node_ids(self) -> set[str]:
        return {self.head.node_id, self.cpu.node_id}

    def kill_gpu_node(self) -> str:
        """Remove the accelerator node (its raylet and workers die); returns its id."""
        old, self.gpu = self.gpu, None
        self.cluster.remove_node(old, allow_graceful=False)
        return old.node_id

    def add_gpu_node(self) -> str:
        # add_node waits until the new raylet has registered. Not `wait_for_nodes()`: it would
        # also wait ~15 s for the health checks to declare the killed node dead.
        self.gpu = self.cluster.add_node(num_cpus=2, resources={ACCEL: 2})
        return self.gpu.node_id

    def free(self, resource: str) -> float:
        import ray

        return ray.available_resources().get(resource, 0.0)

    def shutdown(self) -> None:
        from orchestrator import ray_runtime

        ray_runtime.shutdown()
        self.cluster.shutdown()
        for key, value in self.saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class GitTarpit:
    """Forwards the first `allow` connections to the git daemon; holds later ones unanswered
    until `release()`."""

    def __init__(self, upstream_port: int, allow: int) -> None:
        self.upstream_port, self.allow = upstream_port, allow
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"git://127.0.0.1:{self.port}/"

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                if self.connections > self.allow:
                    self._held.append(conn)  # never answered: the client waits (until its timeout)
                    continue
            self._forward(conn)

    def _forward(self, conn: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        for a, b in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    def release(self) -> None:
        """Answer the held connections, and every later one."""
        with self._lock:
            self.allow, held, self._held = float("inf"), self._held, []
        for conn in held:
            self._forward(conn)

    def close(self) -> None:
        self._closed = True
        self._server.close()
        for conn in self._held:
            conn.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60.0,
               step: Callable[[], None] | None = None, interval: float = 0.1) -> Any:
    """Call `step` (a dispatcher tick) until `condition()` is truthy; fail saying `what` if never.

    The deadline only keeps a broken run from hanging the suite; no test asserts on time.
    """
    deadline = time.monotonic() + timeout
    while True:
        if step is not None:
            step()
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout:.0f}s")
        time.sleep(interval)


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def assert_resumed_not_restarted(store: Any, run_id: str, seen_step: int, killed_at: datetime,
                                 log_every: int = 5) -> int:
    """The killed training resumed from a checkpoint at or after `seen_step`, never from step 0.

    `seen_step` is a checkpoint the store had recorded before the kill at `killed_at`. Returns
    the step training resumed from.
    """
    logs = [line.message for line in store.logs(run_id)]
    resumed = [int(m.rsplit(" ", 1)[1]) for m in logs if m.startswith("resuming from checkpoint at step ")]
    assert resumed, logs
    step = resumed[-1]
    assert step >= seen_step > 0
    points = store.metrics(run_id)
    # The points up to the checkpoint seen before the kill are the first attempt's own, written
    # before the kill: a restart from step 0 would have rewritten them (the store rewinds the
    # history to where a resumed attempt reports).
    early = [p for p in points if log_every < p.step <= seen_step]
    assert early and all(p.recorded_at < killed_at for p in early)
    # One continuous history: a train loss every `log_every` steps, none missing, none twice.
    logged = [p.step for p in points if p.train_loss is not None]
    assert logged == list(range(log_every, logged[-1] + 1, log_every))
    assert logged[-1] > step
    return step


class Serve:
    """A `charforge serve` process against the test cluster (its output goes to a file)."""

    def __init__(self, env: dict[str, str], log_path: Any, *args: str) -> None:
        import subprocess
        import sys

        self.log_path = log_path
        charforge = os.path.join(os.path.dirname(sys.executable), "charforge")
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen([charforge, "serve", "--poll", "0.2", *args], env=env,
                                         stdout=out, stderr=subprocess.STDOUT)

    @property
    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def dispatcher_id(self) -> str:
        """The id it announces once it is connected and ready (waits for that line)."""
        def announced() -> str | None:
            assert self.proc.poll() is None, f"serve exited early:\n{self.output[-3000:]}"
            for line in self.output.splitlines():
                if line.startswith("charforge serve: dispatcher "):
                    return line.split()[3]
            return None
        return wait_until(announced, "charforge serve to start", 90)

    def kill(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except Exception:  # noqa: BLE001 - a stuck serve must not hang the suite
                self.proc.kill()


class StageWatcher:
    """Samples the process table: which (run, stage) each Ray worker is executing.

    A worker's process title is `ray::charforge-<stage>-<run id>` while it runs a stage task.
    Two live processes with the same title at one moment would be one stage running twice.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.seen: set[tuple[str, str]] = set()
        self.doubles: list[dict[tuple[str, str], list[int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
        self._thread.start()

    def _loop(self, interval: float) -> None:
        while not self._stop.is_set():
            running = stage_processes()
            self.seen.update(running)
            doubles = {key: pids for key, pids in running.items() if len(pids) > 1 and all(map(alive, pids))}
            if doubles:
                self.doubles.append(doubles)
            time.sleep(interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def titled_processes(prefix: str) -> dict[int, tuple[str, int]]:
    """pid -> (process title, parent pid) of the live (not zombie) processes whose title starts
    with `prefix`."""
    found: dict[int, tuple[str, int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read().split(b"\0", 1)[0].decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        if title.startswith(prefix) and state != "Z":
            found[int(entry)] = (title, int(ppid))
    return found


def stage_processes() -> dict[tuple[str, str], list[int]]:
    """(run id, stage) -> pids of the live Ray workers executing that stage now (by process title).

    A child the worker forks (git, say) carries the worker's title until it execs: it is not a
    second worker running the stage, and is left out (seen as a "double" before this was so).
    """
    found = titled_processes("ray::charforge-")
    running: dict[tuple[str, str], list[int]] = {}
    for pid, (title, ppid) in found.items():
        if ppid not in found or found[ppid][0] != title:
            stage, _, run_id = title.removeprefix("ray::charforge-").partition("-")
            running.setdefault((run_id, stage), []).append(pid)
    return running


def assert_attempts_never_overlap(view: Any) -> None:
    """Each stage's attempts of a run, in the store, one after the other."""
    by_stage: dict[Any, list[Any]] = {}
    for attempt in view.attempts:
        by_stage.setdefault(attempt.stage, []).append(attempt)
    for attempts in by_stage.values():
        attempts.sort(key=lambda a: a.started_at)
        for before, after in itertools.pairwise(attempts):
            assert before.finished_at is not None and before.finished_at <= after.started_at, view.attempts
