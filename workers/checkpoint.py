"""Checkpoints that describe themselves and load without trusting pickle.

A checkpoint is one `torch.save` file holding only tensors and plain values (str, int, float,
bool, None, lists, dicts): the weights, the optimizer's state, RNG states, the data position and
hidden state of the training stream, plus a JSON string with the model config, train config,
vocabulary, step and losses. It is read back with `torch.load(weights_only=True)`, which refuses
any pickled Python object (a hostile `__reduce__` included), and with `map_location`, so a
checkpoint written on a GPU loads on a CPU-only machine.

Next to the step files, `latest.json` names the latest and the best checkpoint and the ones kept.
It is written after the step file it names, so it never points at a missing object.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import ValidationError

from schemas.errors import ArtifactNotFound, CheckpointDamaged, InvalidSpec, TrainingError
from schemas.training import ModelConfig, TrainConfig
from workers import keys
from workers.model import CharRNN
from workers.storage import ObjectInfo, Storage, file_sha256
from workers.vocab import Vocab

FORMAT = "charforge-checkpoint"
VERSION = 1
_STEP_FILE = re.compile(r"step-(\d+)\.pt$")


@dataclass
class Checkpoint:
    model_config: ModelConfig
    train_config: TrainConfig
    vocab: Vocab
    state_dict: dict[str, torch.Tensor]
    step: int = 0
    val_loss: float | None = None
    best_val_loss: float | None = None
    train_loss: float | None = None
    # Everything a resume needs to continue bit-for-bit (see workers/train.py).
    optimizer_state: dict[str, Any] | None = None
    # The fp16 grad scaler's state ({} when the run did not use one). Files written before it
    # had this name held it as {"scaler": state} under "scheduler"; they still load.
    scaler_state: dict[str, Any] = field(default_factory=dict)
    rng_state: dict[str, Any] = field(default_factory=dict)
    data_state: dict[str, Any] = field(default_factory=dict)
    # Plain facts for people and tools: run id, corpus hash, chars seen, stop reason, ...
    info: dict[str, Any] = field(default_factory=dict)

    def build_model(self, device: torch.device | str = "cpu") -> CharRNN:
        """The network with these weights, in eval mode, on `device`."""
        model = CharRNN(len(self.vocab), self.model_config)
        model.load_state_dict(self.state_dict)
        return model.to(device).eval()


def _meta(ckpt: Checkpoint) -> str:
    return json.dumps({
        "model_config": ckpt.model_config.model_dump(mode="json"),
        "train_config": ckpt.train_config.model_dump(mode="json"),
        "vocab": ckpt.vocab.to_list(),
        "step": ckpt.step,
        "val_loss": ckpt.val_loss,
        "best_val_loss": ckpt.best_val_loss,
        "train_loss": ckpt.train_loss,
        "info": ckpt.info,
    }, ensure_ascii=False)


def save_checkpoint(storage: Storage, key: str, ckpt: Checkpoint) -> ObjectInfo:
    """Write `ckpt` to `key` atomically; returns its size and sha256."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "meta": _meta(ckpt),
        "model": {k: v.detach() for k, v in ckpt.state_dict.items()},
        "optimizer": ckpt.optimizer_state,
        "scaler": ckpt.scaler_state,
        "rng": ckpt.rng_state,
        "data": ckpt.data_state,
    }
    with storage.writer(key) as out:
        torch.save(payload, out)  # type: ignore[arg-type]  # a file-like object with write()
    return ObjectInfo(key, out.size, out.sha256)


def _refuse(key: str, why: str) -> TrainingError:
    return TrainingError(f"checkpoint {key!r} refused: {why}")


def load_checkpoint(
    storage: Storage, key: str, map_location: torch.device | str | None = "cpu"
) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`; anything else is refused with a reason,
    as is one whose bytes are not those its run's `latest.json` recorded when it was written."""
    expected = recorded_sha256(storage, key)
    with storage.local_path(key) as path:
        if expected is not None and (actual := file_sha256(path)) != expected:
            raise CheckpointDamaged(f"checkpoint {key!r} refused: its sha256 is {actual[:12]}, not the "
                                    f"{expected[:12]} recorded when it was written: it was damaged in storage")
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise _refuse(key, f"it holds pickled Python objects, not plain data ({first})") from None
        except (RuntimeError, EOFError, OSError) as err:
            raise _refuse(key, f"not a readable torch file ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise _refuse(key, "not a charforge checkpoint")
    if payload.get("version") != VERSION:
        raise _refuse(key, f"format version {payload.get('version')} (this charforge reads {VERSION})")
    try:
        meta = json.loads(payload["meta"])
        ckpt = Checkpoint(
            model_config=ModelConfig.model_validate(meta["model_config"]),
            train_config=TrainConfig.model_validate(meta["train_config"]),
            vocab=Vocab.from_list(meta["vocab"]),
            state_dict=payload["model"],
            step=int(meta["step"]),
            val_loss=meta.get("val_loss"),
            best_val_loss=meta.get("best_val_loss"),
            train_loss=meta.get("train_loss"),
            optimizer_state=payload.get("optimizer"),
            scaler_state=payload.get("scaler") or (payload.get("scheduler") or {}).get("scaler") or {},
            rng_state=payload.get("rng") or {},
            data_state=payload.get("data") or {},
            info=meta.get("info") or {},
        )
    except (KeyError, TypeError, ValueError, AttributeError, ValidationError) as err:
        raise _refuse(key, f"damaged metadata ({type(err).__name__}: {err})".splitlines()[0]) from None
    _check_weights(key, ckpt)
    return ckpt


def _check_weights(key: str, ckpt: Checkpoint) -> None:
    """Refuse a checkpoint whose config does not describe the weights it holds.

    The network is built from the config (sampling, resume, --init-from), so a config that
    claims far more than the file holds (16x8192 is ~34 GB) would be allocated before
    load_state_dict noticed. The expected shapes come from a network on the meta device, which
    allocates nothing.
    """
    with torch.device("meta"):
        expected = CharRNN(len(ckpt.vocab), ckpt.model_config).state_dict()
    state = ckpt.state_dict
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise _refuse(key, "its weights are not a dict of tensors")
    got = {name: tuple(t.shape) for name, t in state.items()}
    want = {name: tuple(t.shape) for name, t in expected.items()}
    if got != want:
        m = ckpt.model_config
        raise _refuse(
            key,
            f"its config ({m.num_layers}x{m.rnn_size} {m.model}, vocabulary {len(ckpt.vocab)}, "
            f"{sum(math.prod(s) for s in want.values()):,} parameters) does not match the "
            f"weights it holds ({sum(math.prod(s) for s in got.values()):,} parameters; "
            f"{_first_difference(got, want)})",
        )


def _first_difference(got: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]]) -> str:
    for name, shape in want.items():
        if name not in got:
            return f"{name} is missing"
        if got[name] != shape:
            return f"{name} is {list(got[name])}, the config needs {list(shape)}"
    extra = next(name for name in got if name not in want)
    return f"{extra} is not part of that network"


# --- latest.json: which checkpoints a run has ------------------------------------------------


_RUN_CHECKPOINT = re.compile(r"^runs/([^/]+)/checkpoints/step-\d+\.pt$")


def recorded_sha256(storage: Storage, key: str) -> str | None:
    """The sha256 `latest.json` recorded for checkpoint `key` (None: not recorded, or written
    before checkpoints carried it)."""
    match = _RUN_CHECKPOINT.match(key)
    pointer = read_pointer(storage, match.group(1)) if match else None
    if not isinstance(pointer, dict):
        return None
    entries = [*pointer.get("kept", []), pointer.get("best"), pointer.get("latest")]
    return next((e.get("sha256") for e in entries if isinstance(e, dict) and e.get("key") == key), None)


def read_pointer(storage: Storage, run_id: str) -> dict[str, Any] | None:
    key = keys.latest_checkpoint(run_id)
    if not storage.exists(key):
        return None
    return json.loads(storage.get_bytes(key))


def available_steps(storage: Storage, run_id: str) -> list[int]:
    """Steps of the checkpoint files that exist for a run, ascending."""
    steps = []
    for key in storage.list(keys.checkpoints_prefix(run_id)):
        match = _STEP_FILE.search(key)
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps)


def require_checkpoint(storage: Storage, run_id: str, key: str) -> str:
    """`key`, when that checkpoint of the run exists; else an error naming the steps that do."""
    if storage.exists(key):
        return key
    match = _STEP_FILE.search(key)
    steps = ", ".join(map(str, available_steps(storage, run_id))) or "none"
    what = f"at step {int(match.group(1))}" if match else key
    raise ArtifactNotFound(f"run {run_id} has no checkpoint {what}; available steps: {steps}")


def find_checkpoint(storage: Storage, run_id: str, which: str = "latest") -> str:
    """The key of a run's "latest", "best" or step-N checkpoint (N given as text)."""
    which = str(which).strip().lower()
    if which.isdigit():
        return require_checkpoint(storage, run_id, keys.checkpoint(run_id, int(which)))
    if which not in ("latest", "best"):
        raise InvalidSpec(f"checkpoint must be 'latest', 'best' or a step number, got {which!r}")
    pointer = read_pointer(storage, run_id)
    if pointer is None:
        written = available_steps(storage, run_id)
        if not written:
            raise ArtifactNotFound(f"run {run_id} has no checkpoint yet")
        return keys.checkpoint(run_id, written[-1])  # a step file written before its pointer
    entry = pointer.get("best") if which == "best" else None
    return (entry or pointer["latest"])["key"]


def resumable(storage: Storage, run_id: str, pointer: dict[str, Any], log: Callable[[str], None]) -> Checkpoint:
    """The latest checkpoint, or, when it is damaged in storage, the newest kept one that is not
    (training rewinds to it). Two trainers of one run (the old one not yet killed after a
    recovery) can leave a step file that is not the one `latest.json` recorded."""
    latest = pointer["latest"]["key"]
    try:
        return load_checkpoint(storage, latest, map_location="cpu")
    except CheckpointDamaged as damaged:
        for entry in reversed(pointer.get("kept", [])):
            if entry["key"] == latest:
                continue
            try:
                start = load_checkpoint(storage, entry["key"], map_location="cpu")
            except (CheckpointDamaged, ArtifactNotFound):
                continue
            log(f"{damaged.message}; resuming from step {start.step} instead")
            return start
        raise CheckpointDamaged(f"{damaged.message}; no other kept checkpoint is whole: delete "
                                f"{keys.checkpoints_prefix(run_id)} to train this run from the start") from None


def record_checkpoint(
    storage: Storage, run_id: str, step: int, key: str, val_loss: float | None, keep_last: int,
    sha256: str | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Add a written checkpoint (with the sha256 of its bytes, which `load_checkpoint` checks)
    to `latest.json`; delete those neither recent nor best.

    Returns the new pointer and the keys deleted.
    """
    pointer = read_pointer(storage, run_id) or {"kept": [], "best": None}
    entry = {"step": step, "key": key, "val_loss": val_loss, "sha256": sha256}
    kept = [e for e in pointer["kept"] if e["step"] < step] + [entry]
    best = pointer.get("best")
    if best is not None and best["step"] >= step:
        best = None  # a resume rewound past it: that checkpoint is being replaced
    if val_loss is not None and (best is None or best["val_loss"] is None
                                 or val_loss < best["val_loss"]):
        best = entry
    recent = {e["step"] for e in kept[-keep_last:]}
    dropped = [e for e in kept if e["step"] not in recent and (best is None or e["step"] != best["step"])]
    kept = [e for e in kept if e not in dropped]
    pointer = {"latest": entry, "best": best, "kept": kept}
    storage.put_bytes(keys.latest_checkpoint(run_id), json.dumps(pointer, indent=1).encode())
    for old in dropped:
        storage.delete(old["key"])
    return pointer, [old["key"] for old in dropped]
