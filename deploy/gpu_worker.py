#!/usr/bin/env python3
"""Entry point of docker-compose.yml's `ray-gpu-worker`: one Ray worker node per GPU of the host.

Docker Compose cannot give each replica of a scaled service its own GPU (docker/compose#11863):
with `count: 1` every replica gets GPU 0. So every replica sees all GPUs (`count: all`), takes an
exclusive lock on one of them in a directory all replicas share (a named volume), and starts Ray
with only that GPU visible. The lock belongs to the Ray process itself, so a replica that dies
frees its GPU; a replica that finds none free exits with a message saying how far to scale.

Usage: gpu_worker.py [ray start options...]   (runs `ray start --num-gpus=1 <options>`)
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

LOCK_DIR = Path("/var/lock/charforge-gpus")


def parse_gpu_uuids(nvidia_smi_output: str) -> list[str]:
    """UUIDs from `nvidia-smi --query-gpu=uuid --format=csv,noheader` (one per line)."""
    return [
        line.strip() for line in nvidia_smi_output.splitlines() if line.strip().startswith("GPU-")
    ]


def gpu_uuids() -> list[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise SystemExit(
            f"ray-gpu-worker: no NVIDIA GPU visible ({exc}): install the NVIDIA Container Toolkit "
            "on the host, or run without this service"
        ) from None
    return parse_gpu_uuids(out)


def claim_gpu(uuids: list[str], lock_dir: Path) -> tuple[str, int]:
    """Lock the first GPU no other replica holds; return its UUID and the lock's descriptor."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    for uuid in uuids:
        fd = os.open(lock_dir / f"{uuid}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return uuid, fd
    raise SystemExit(
        f"ray-gpu-worker: all {len(uuids)} GPUs of this host are taken by other replicas: "
        f"scale ray-gpu-worker to at most {len(uuids)}"
    )


def main(ray_args: list[str]) -> None:
    uuid, fd = claim_gpu(gpu_uuids(), LOCK_DIR)
    os.set_inheritable(fd, True)  # `ray start --block` keeps the lock for as long as it lives
    os.environ["CUDA_VISIBLE_DEVICES"] = uuid
    print(f"ray-gpu-worker: using GPU {uuid}", flush=True)
    os.execvp("ray", ["ray", "start", "--num-gpus=1", *ray_args])


if __name__ == "__main__":
    main(sys.argv[1:])
