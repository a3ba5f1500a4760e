"""Training options as `--set key=value` reaches them: parsed, validated, refused with reasons."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from schemas.errors import InvalidSpec
from schemas.run import build_run_spec
from schemas.training import DEFAULT_PRESET, PRESETS, TrainConfig, parse_duration


def _spec(tmp_path: Path, *sets: str, preset: str | None = None):  # type: ignore[no-untyped-def]
    return build_run_spec([str(tmp_path)], preset=preset, sets=list(sets))


@pytest.mark.parametrize(("text", "seconds"), [
    ("100s", 100.0), ("30m", 1800.0), ("2h", 7200.0), ("1h30m", 5400.0), ("90", 90.0),
    ("1.5h", 5400.0), (" 2 h ", 7200.0),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_time_budget_through_set(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "time_budget=30m", "train.max_epochs=2.5", "rnn_size=64")
    assert spec.train.time_budget == 1800.0 and spec.train.max_epochs == 2.5
    assert spec.model.rnn_size == 64
    assert _spec(tmp_path, "time_budget=none").train.time_budget is None


def test_new_options_through_set(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "precision=fp32", "batching=random", "lr_schedule=linear",
                 "warmup_iters=50", "keep_last=5", "optimizer=rmsprop", "model=gru")
    t = spec.train
    assert (t.precision, t.batching, t.lr_schedule, t.warmup_iters, t.keep_last, t.optimizer) == (
        "fp32", "random", "linear", 50, 5, "rmsprop")
    assert spec.model.model == "gru"


@pytest.mark.parametrize(("setting", "message"), [
    ("time_budget=soon", "not a duration"),
    ("time_budget=-5s", "not a duration"),
    ("time_budget=0", "greater than 0"),
    ("precision=fp64", "'auto', 'fp32', 'bf16' or 'fp16'"),
    ("batching=shuffled", "'sequential' or 'random'"),
    ("model=transformer", "'lstm', 'gru' or 'rnn'"),
    ("optimizer=sgd", "'adam' or 'rmsprop'"),
    ("learning_rate=-1", "greater than 0"),
    ("dropout=1.5", "less than 1"),
    ("rnn_size=big", "valid integer"),
    ("keep_last=0", "greater than or equal to 1"),
    ("seq_length=1", "greater than 1"),
    ("val_frac=0.9", "less than 0.5"),
    # torch.Generator().manual_seed(seed + 1) overflowed on these, deep inside training.
    ("seed=18446744073709551615", "less than 9223372036854775808"),
    ("seed=9223372036854775808", "less than 9223372036854775808"),
    ("seed=-1", "greater than or equal to 0"),
    ("sample.seed=18446744073709551615", "less than 9223372036854775808"),
    ("sample.seed=-3", "greater than or equal to 0"),
])
def test_bad_values_are_refused_with_the_reason(tmp_path: Path, setting: str, message: str) -> None:
    with pytest.raises(InvalidSpec, match="bad setting") as err:
        _spec(tmp_path, setting)
    assert message in str(err.value)
    assert setting.split("=")[0] in str(err.value)


def test_largest_seeds_are_accepted_and_seed_generators(tmp_path: Path) -> None:
    top = 2**63 - 1
    spec = _spec(tmp_path, f"seed={top}", f"sample.seed={top}")
    assert spec.train.seed == top and spec.sample.seed == top
    torch.Generator().manual_seed(spec.train.seed + 1)  # what the trainer does with it


def test_unknown_key_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec, match="unknown setting 'rnn_sise'") as err:
        _spec(tmp_path, "rnn_sise=128")
    assert "model.rnn_size" in str(err.value) and "train.time_budget" in str(err.value)


def test_presets(tmp_path: Path) -> None:
    assert set(PRESETS) == {"tiny", "small", "medium", "large"}
    assert DEFAULT_PRESET in PRESETS
    sizes = {name: (m.num_layers, m.rnn_size) for name, (m, _t) in PRESETS.items()}
    assert sizes["small"] == (2, 128) and sizes["medium"] == (2, 512) and sizes["large"] == (3, 512)
    spec = _spec(tmp_path, preset="tiny")
    assert spec.train == PRESETS["tiny"][1]
    assert TrainConfig().val_frac == 0.05
