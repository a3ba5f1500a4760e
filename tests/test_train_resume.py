"""Resume after an interruption continues bit-for-bit (CPU, fixed seed), never from step 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from schemas.errors import CheckpointDamaged
from schemas.events import EventKind
from schemas.training import PRESETS, ModelConfig
from tests.test_train import code_text, make_corpus
from workers import keys
from workers.checkpoint import find_checkpoint, load_checkpoint
from workers.progress import ListReporter
from workers.storage import LocalStorage
from workers.train import run_train_stage

# Two layers with dropout, so the RNG state matters too.
MODEL = ModelConfig(rnn_size=32, num_layers=2, dropout=0.2)


class Killed(Exception):
    """Stands in for the worker process dying."""


class DyingReporter(ListReporter):
    def __init__(self, die_at: int) -> None:
        super().__init__()
        self.die_at = die_at

    def metric(self, step: int, **values: float) -> None:
        if step >= self.die_at:
            raise Killed(f"killed at step {step}")
        super().metric(step, **values)


def history(reporter: ListReporter) -> list[tuple[int, str, float]]:
    """Every loss and lr reported, by step (chars/s is a timing and left out)."""
    out = []
    for m in reporter.of(EventKind.METRIC):
        out += [(m["step"], k, v) for k, v in m.items() if k in ("train_loss", "val_loss", "lr")]
    return out


@pytest.mark.parametrize("batching", ["sequential", "random"])
def test_resume_gives_the_same_losses(tmp_path: Path, batching: str) -> None:
    storage = LocalStorage(tmp_path)
    corpus = make_corpus(storage, code_text(4096))
    train = PRESETS["tiny"][1].model_copy(update={
        "batching": batching, "max_iters": 40, "log_every": 1, "eval_val_every": 5,
        "checkpoint_every": 10, "keep_last": 1, "lr_schedule": "cosine", "warmup_iters": 5,
    })
    kwargs: dict[str, Any] = {"device": "cpu", "num_threads": 1}

    whole = ListReporter()
    expected = run_train_stage(storage, "aaaa01", corpus, MODEL, train, whole, **kwargs)

    dying = DyingReporter(die_at=25)
    with pytest.raises(Killed):
        run_train_stage(storage, "bbbb02", corpus, MODEL, train, dying, **kwargs)
    assert find_checkpoint(storage, "bbbb02") == keys.checkpoint("bbbb02", 20)

    resumed = ListReporter()
    # The caller's configs are ignored on resume: the checkpoint's are the run's.
    result = run_train_stage(storage, "bbbb02", corpus, ModelConfig(rnn_size=8), train, resumed, **kwargs)

    after = history(resumed)
    assert after[0][0] == 21  # continues after the checkpoint, no restart from step 0
    assert after == [h for h in history(whole) if h[0] > 20]
    assert history(dying) == [h for h in history(whole) if h[0] < 25]
    numbers = ("final_step", "best_val_loss", "final_train_loss", "final_val_loss", "stop_reason")
    assert [getattr(result, f) for f in numbers] == [getattr(expected, f) for f in numbers]
    a = load_checkpoint(storage, expected.checkpoint_key).state_dict
    b = load_checkpoint(storage, result.checkpoint_key).state_dict
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert any("resuming from checkpoint at step 20" in e["message"] for e in resumed.of(EventKind.LOG))


def test_a_damaged_latest_checkpoint_resumes_from_the_newest_whole_one(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    corpus = make_corpus(storage, code_text(4096))
    train = PRESETS["tiny"][1].model_copy(update={"max_iters": 40, "checkpoint_every": 10, "keep_last": 3})
    with pytest.raises(Killed):
        run_train_stage(storage, "dddd04", corpus, MODEL, train, DyingReporter(die_at=35), num_threads=1)
    latest = storage.root / keys.checkpoint("dddd04", 30)
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # e.g. a second trainer's bytes, not the ones recorded
    latest.write_bytes(bytes(data))
    resumed = ListReporter()
    result = run_train_stage(storage, "dddd04", corpus, MODEL, train, resumed, num_threads=1)
    logs = [e["message"] for e in resumed.of(EventKind.LOG)]
    assert any("damaged in storage; resuming from step 20 instead" in m for m in logs)
    assert 20 < history(resumed)[0][0] <= 25 and result.final_step == 40
    for path in (storage.root / keys.checkpoints_prefix("dddd04")).glob("step-*.pt"):
        data = bytearray(path.read_bytes())  # with nothing whole left, the error says what to delete
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    with pytest.raises(CheckpointDamaged, match=r"no other kept checkpoint is whole: delete runs/dddd04/checkpoints/"):
        run_train_stage(storage, "dddd04", corpus, MODEL, train, ListReporter(), num_threads=1)


def test_resuming_a_finished_run_trains_no_more(tmp_path: Path) -> None:
    """A Ray retry after training finished (the result was lost on the way) returns the result."""
    storage = LocalStorage(tmp_path)
    corpus = make_corpus(storage, code_text(2048))
    model, train = PRESETS["tiny"]
    first = run_train_stage(storage, "cccc03", corpus, model, train, ListReporter(), num_threads=1)
    again = ListReporter()
    second = run_train_stage(storage, "cccc03", corpus, model, train, again, num_threads=1)
    assert second.model_dump() | {"chars_per_sec": 0} == first.model_dump() | {"chars_per_sec": 0}
    assert again.of(EventKind.METRIC) == [] and again.of(EventKind.ARTIFACT) == []


def test_wall_clock_checkpoints_come_before_checkpoint_every_and_resume_bit_for_bit(
    tmp_path: Path,
) -> None:
    """`checkpoint_every_seconds`: a run killed long before `checkpoint_every` resumes from its
    last timed checkpoint, and the extra checkpoints (each after a validation pass) change
    nothing in the training itself."""
    storage = LocalStorage(tmp_path)
    corpus = make_corpus(storage, code_text(4096))
    base = PRESETS["tiny"][1].model_copy(update={
        "max_iters": 30, "log_every": 1, "eval_val_every": 1000, "checkpoint_every": 1000,
        "keep_last": 1, "warmup_iters": 5, "checkpoint_every_seconds": 0,
    })
    kwargs: dict[str, Any] = {"device": "cpu", "num_threads": 1}
    plain = ListReporter()
    expected = run_train_stage(storage, "dddd01", corpus, MODEL, base, plain, **kwargs)
    assert [a["meta"]["step"] for a in plain.of(EventKind.ARTIFACT)] == [30]  # 0 turns it off

    # A microsecond: every step (a few ms here) ends past it, so each step boundary checkpoints.
    timed = base.model_copy(update={"checkpoint_every_seconds": 1e-6})
    dying = DyingReporter(die_at=13)
    with pytest.raises(Killed):
        run_train_stage(storage, "dddd02", corpus, MODEL, timed, dying, **kwargs)
    assert [a["meta"]["step"] for a in dying.of(EventKind.ARTIFACT)] == list(range(1, 13))
    assert find_checkpoint(storage, "dddd02") == keys.checkpoint("dddd02", 12)

    resumed = ListReporter()
    result = run_train_stage(storage, "dddd02", corpus, MODEL, timed, resumed, **kwargs)

    def training(reporter: ListReporter) -> list[tuple[int, str, float]]:
        return [h for h in history(reporter) if h[1] != "val_loss"]

    assert training(resumed)[0][0] == 13
    assert training(dying) + training(resumed) == training(plain)
    assert (result.final_step, result.final_train_loss) == (expected.final_step, expected.final_train_loss)
    a = load_checkpoint(storage, expected.checkpoint_key).state_dict
    b = load_checkpoint(storage, result.checkpoint_key).state_dict
    assert all(torch.equal(a[name], b[name]) for name in a)
