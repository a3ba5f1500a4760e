"""The training stage on real (tiny) corpora: it learns, it guards, it fine-tunes, it stops."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from schemas.errors import TrainingError
from schemas.events import EventKind
from schemas.results import CorpusResult
from schemas.training import PRESETS, ModelConfig
from workers import keys
from workers.checkpoint import (
    Checkpoint,
    available_steps,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from workers.data import prepare_corpus
from workers.model import CharRNN
from workers.progress import ListReporter
from workers.storage import LocalStorage
from workers.train import run_train_stage
from workers.vocab import Vocab

TINY_MODEL, TINY_TRAIN = PRESETS["tiny"]


def code_text(n: int = 2048) -> str:
    """About `n` characters of small, repetitive Python."""
    lines, i = [], 0
    while sum(map(len, lines)) < n:
        lines.append(f"def add_{i % 7}(a, b):\n    return a + b * {i % 5}\n\n")
        i += 1
    return "".join(lines)[:n]


def make_corpus(storage: LocalStorage, text: str, tag: str = "a") -> CorpusResult:
    corpus_hash = (tag * 64)[:64]
    storage.put_bytes(keys.corpus_text(corpus_hash), text.encode())
    return CorpusResult(
        hash=corpus_hash, text_key=keys.corpus_text(corpus_hash),
        manifest_key=keys.corpus_manifest(corpus_hash), bytes=len(text.encode()), files=1,
        skipped=0, vocab_size=len(set(text)), repos=(),
    )


def train_losses(reporter: ListReporter) -> list[tuple[int, float]]:
    return [(m["step"], m["train_loss"]) for m in reporter.of(EventKind.METRIC) if "train_loss" in m]


def test_tiny_model_overfits_2kb(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    corpus = make_corpus(storage, code_text(2048))
    train = TINY_TRAIN.model_copy(update={
        "learning_rate": 1e-2, "max_iters": 150, "batch_size": 8, "eval_val_every": 50,
        "checkpoint_every": 150,
    })
    reporter = ListReporter()
    result = run_train_stage(storage, "0f0f01", corpus, ModelConfig(rnn_size=64, num_layers=1),
                             train, reporter, device="cpu", num_threads=1)
    losses = train_losses(reporter)
    assert losses[0][1] > 2.5  # ~ln(vocab) at the start
    assert result.final_train_loss is not None and result.final_train_loss < 0.6
    assert result.final_step == 150 and result.stop_reason == "max_iters"
    assert result.best_val_loss is not None and result.best_val_loss < 1.5
    assert storage.exists(result.checkpoint_key)
    metric = reporter.of(EventKind.METRIC)
    assert all({"lr", "chars_per_sec"} <= set(m) for m in metric if "train_loss" in m)
    assert [m["step"] for m in metric if "val_loss" in m] == [50, 100, 150]
    artifacts = reporter.of(EventKind.ARTIFACT)
    assert [a["meta"]["step"] for a in artifacts] == [150]
    assert artifacts[0]["kind"] == "checkpoint" and artifacts[0]["meta"]["best"] is True


def test_keeps_last_checkpoints_and_the_best(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    corpus = make_corpus(storage, code_text(2048))
    train = TINY_TRAIN.model_copy(update={"max_iters": 50, "checkpoint_every": 10, "keep_last": 2})
    run_train_stage(storage, "0f0f02", corpus, TINY_MODEL, train, ListReporter(), num_threads=1)
    pointer = json.loads(storage.get_bytes(keys.latest_checkpoint("0f0f02")))
    kept = [e["step"] for e in pointer["kept"]]
    assert pointer["latest"]["step"] == 50 and kept[-2:] == [40, 50]
    assert set(kept) == {40, 50, pointer["best"]["step"]}
    assert find_checkpoint(storage, "0f0f02", "best") == pointer["best"]["key"]
    # Everything else was deleted: the files left are exactly the kept ones.
    assert available_steps(storage, "0f0f02") == sorted({40, 50, pointer["best"]["step"]})


def test_corpus_encoded_once_and_reused(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    corpus = make_corpus(storage, code_text(2048))
    first = prepare_corpus(storage, corpus, TINY_TRAIN)
    stamp = (tmp_path / first.key).stat().st_mtime_ns
    again = prepare_corpus(storage, corpus, TINY_TRAIN)
    assert again == first and (tmp_path / first.key).stat().st_mtime_ns == stamp
    assert storage.size(first.key) == 2048 and first.dtype.itemsize == 1


def test_large_vocabulary_uses_uint16_and_folds_rare_characters(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    common = "".join(chr(0x4E00 + i) for i in range(300)) * 2  # 300 characters seen twice
    corpus = make_corpus(storage, common + "ж")  # "ж" seen once: folded into unknown
    encoded = prepare_corpus(storage, corpus, TINY_TRAIN)
    assert len(encoded.vocab) == 301 and "ж" not in encoded.vocab.index
    assert storage.size(encoded.key) == 2 * 601
    with storage.local_path(encoded.key) as path:
        assert path.read_bytes()[-2:] == b"\0\0"  # the folded character is index 0


def test_nan_guard_fires_on_a_poisoned_batch(tmp_path: Path) -> None:
    """Weights that turn one character into NaN: the first batch holding it stops training."""
    storage = LocalStorage(tmp_path)
    text = code_text(2048)
    text = text[:1890] + "§§" + text[1892:]  # late in the last batch row: not in the first window
    corpus = make_corpus(storage, text)
    vocab = Vocab.from_text(text)
    torch.manual_seed(0)
    model = CharRNN(len(vocab), TINY_MODEL)
    with torch.no_grad():
        model.embed.weight[vocab.index["§"]] = float("nan")
    poisoned = keys.checkpoint("bad001", 1)
    save_checkpoint(storage, poisoned, Checkpoint(TINY_MODEL, TINY_TRAIN, vocab, model.state_dict()))
    reporter = ListReporter()
    with pytest.raises(TrainingError, match=r"^training diverged at step (\d+): loss nan") as err:
        run_train_stage(storage, "0f0f03", corpus, TINY_MODEL, TINY_TRAIN, reporter,
                        init_from=poisoned, num_threads=1)
    step = int(err.value.message.split("step ")[1].split(":")[0])
    assert step > 1  # earlier batches, without the character, trained normally
    assert all(math.isfinite(loss) for _s, loss in train_losses(reporter))  # no NaN reported
    assert not storage.exists(keys.latest_checkpoint("0f0f03"))  # nothing poisoned was saved


def test_exploding_loss_stops_training(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    corpus = make_corpus(storage, code_text(2048))
    train = TINY_TRAIN.model_copy(update={
        "learning_rate": 10.0, "grad_clip": 1e6, "optimizer": "rmsprop", "lr_schedule": "constant",
    })
    with pytest.raises(TrainingError, match=r"^training diverged at step \d+: loss "):
        run_train_stage(storage, "0f0f04", corpus, TINY_MODEL, train, ListReporter(), num_threads=1)


def test_fine_tuning_starts_from_another_runs_weights(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    text = code_text(2048)
    source = run_train_stage(storage, "0f0f05", make_corpus(storage, text, "b"), TINY_MODEL,
                             TINY_TRAIN, ListReporter(), num_threads=1)
    fresh, tuned = ListReporter(), ListReporter()
    subset = make_corpus(storage, text[1000:] + text[:1000], "c")  # same alphabet, new order
    run_train_stage(storage, "0f0f06", subset, TINY_MODEL, TINY_TRAIN, fresh, num_threads=1)
    run_train_stage(storage, "0f0f07", subset, ModelConfig(rnn_size=999), TINY_TRAIN, tuned,
                    init_from=source.checkpoint_key, num_threads=1)
    assert train_losses(tuned)[0][1] < train_losses(fresh)[0][1]
    assert load_checkpoint(storage, find_checkpoint(storage, "0f0f07")).model_config.rnn_size == 32
    assert any("fine-tuning keeps" in e["message"] for e in tuned.of(EventKind.LOG))

    other = make_corpus(storage, text + "λλλλ ΩΩΩΩ", "d")
    with pytest.raises(TrainingError, match=r"vocabularies differ: the corpus uses 2 characters .*Ωλ"):
        run_train_stage(storage, "0f0f08", other, TINY_MODEL, TINY_TRAIN, ListReporter(),
                        init_from=source.checkpoint_key, num_threads=1)


def test_time_budget_stops_cleanly_with_a_final_checkpoint(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    corpus = make_corpus(storage, code_text(2048))
    train = TINY_TRAIN.model_copy(update={"max_iters": 10**9, "time_budget": 0.5})
    reporter = ListReporter()
    result = run_train_stage(storage, "0f0f09", corpus, TINY_MODEL, train, reporter,
                             num_threads=1)
    assert result.stop_reason == "time_budget"
    ckpt = load_checkpoint(storage, result.checkpoint_key)
    assert ckpt.step == result.final_step and ckpt.info["finished"] is True
    assert ckpt.val_loss == result.final_val_loss
    # The bar's total is the step the budget is expected to end at (step / elapsed fraction),
    # not max_iters; it completes at the step the run stopped at.
    *during, last = reporter.of(EventKind.PROGRESS)
    assert during and all(p["step"] <= p["total"] < 10**9 for p in during)
    assert all(0 < p["fraction"] <= 1 for p in during)
    assert all(p["total"] == pytest.approx(p["step"] / p["fraction"], rel=0.01) for p in during
               if p["fraction"] < 1)  # fraction is rounded to 4 places
    assert (last["step"], last["total"], last["stop_reason"]) == (result.final_step,) * 2 + ("time_budget",)


def test_max_epochs_and_random_batching(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    corpus = make_corpus(storage, code_text(2048))
    train = TINY_TRAIN.model_copy(update={"max_epochs": 2.0, "batching": "random"})
    reporter = ListReporter()
    result = run_train_stage(storage, "0f0f0a", corpus, TINY_MODEL, train, reporter,
                             num_threads=1)
    # 2 epochs of 1946 training characters (2048 less the 5% tail) at 16 x 32 characters a step
    assert result.stop_reason == "max_epochs" and result.final_step == 8
    # An epoch limit is a fixed number of steps: the total is right from the first report.
    progress = reporter.of(EventKind.PROGRESS)
    assert [(p["step"], p["total"]) for p in progress] == [(5, 8), (8, 8)]
    assert progress[0]["fraction"] == round(5 * 16 * 32 / 1946 / 2, 4)


def test_progress_total_is_max_iters_without_other_limits(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    corpus = make_corpus(storage, code_text(2048))
    reporter = ListReporter()
    run_train_stage(storage, "0f0f0c", corpus, TINY_MODEL, TINY_TRAIN, reporter, num_threads=1)
    progress = reporter.of(EventKind.PROGRESS)
    assert [(p["step"], p["total"]) for p in progress] == [(s, 60) for s in range(5, 61, 5)] + [(60, 60)]
    assert [p["fraction"] for p in progress[:-1]] == [round(s / 60, 4) for s in range(5, 61, 5)]


@pytest.mark.parametrize("where", ["moving the network", "restoring a checkpoint"])
def test_out_of_gpu_memory_outside_the_loop_is_a_training_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """CUDA OOM cannot be caused on a CPU machine: the fault is injected where it would happen."""
    storage = LocalStorage(tmp_path)
    corpus = make_corpus(storage, code_text(2048))
    if where == "restoring a checkpoint":  # a run with a checkpoint to resume from
        train = TINY_TRAIN.model_copy(update={"max_iters": 20, "checkpoint_every": 10})
        run_train_stage(storage, "0f0f0d", corpus, TINY_MODEL, train, ListReporter(), num_threads=1)
        storage.put_bytes(keys.latest_checkpoint("0f0f0d"), json.dumps(
            {"latest": {"step": 10, "key": keys.checkpoint("0f0f0d", 10), "val_loss": None},
             "best": None, "kept": []}).encode())

    def out_of_memory(*_args: object, **_kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 34.00 GiB")

    target = "state_from_tensors" if where == "restoring a checkpoint" else "CharRNN.to"
    monkeypatch.setattr(f"workers.train.{target}", out_of_memory)
    with pytest.raises(TrainingError) as err:
        run_train_stage(storage, "0f0f0d", corpus, TINY_MODEL, TINY_TRAIN, ListReporter(),
                        num_threads=1)
    assert err.value.message == (
        "out of GPU memory training a 1x32 lstm network (10.1k parameters, vocabulary 26) with "
        "batch_size=16, seq_length=32: lower batch_size, seq_length or rnn_size"
    )


def test_corpus_too_small_for_the_batch_shape(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    corpus = make_corpus(storage, code_text(300))
    with pytest.raises(TrainingError, match="lower batch_size or seq_length"):
        run_train_stage(storage, "0f0f0b", corpus, TINY_MODEL, TINY_TRAIN, ListReporter())

