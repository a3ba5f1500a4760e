"""The training stage: a corpus in storage -> checkpoints in storage, resumable bit-for-bit.

`run_train_stage` resumes by itself: when the run already has a `latest.json`, it continues from
that checkpoint (a Ray retry after a killed worker, or `charforge jobs resume`). Everything the
next step depends on is in the checkpoint — weights, optimizer and grad-scaler state, the torch
and data RNG states, the data position, the hidden state carried between windows, the guard's
start loss and the losses not yet logged — so on CPU the resumed run reports the same losses as
one that was never interrupted (tests/test_train_resume.py). See docs/training.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from schemas.errors import TrainingError
from schemas.results import CorpusResult, TrainResult
from schemas.training import ModelConfig, TrainConfig
from workers import keys
from workers.checkpoint import (
    Checkpoint,
    load_checkpoint,
    read_pointer,
    record_checkpoint,
    resumable,
    save_checkpoint,
)
from workers.data import Batches, prepare_corpus, split
from workers.evaluate import MAX_STREAMS, evaluate_ids
from workers.model import (
    CharRNN,
    State,
    autocast,
    count_parameters,
    detach_state,
    resolve_device,
    resolve_precision,
    state_from_tensors,
    state_tensors,
)
from workers.optim import lr_at, make_optimizer
from workers.progress import Reporter
from workers.storage import Storage
from workers.vocab import Vocab

EXPLODE_FACTOR = 3.0  # char-rnn's guard: stop when the loss passes 3x its starting value


def run_train_stage(
    storage: Storage,
    run_id: str,
    corpus: CorpusResult,
    model: ModelConfig,
    train: TrainConfig,
    reporter: Reporter,
    *,
    init_from: str | None = None,
    device: str | None = None,
    num_threads: int | None = None,
) -> TrainResult:
    """Train (or resume training) run `run_id` on `corpus`; returns the keys it wrote."""
    torch.set_num_threads(num_threads or default_threads())
    dev = resolve_device(device)
    start: Checkpoint | None = None
    vocab: Vocab | None = None
    pointer = read_pointer(storage, run_id)
    if pointer is not None:
        start = resumable(storage, run_id, pointer, reporter.log)
        if start.info.get("finished"):
            reporter.log(f"training already finished at step {start.step}; nothing to resume")
            return _result(start, pointer)
        # The checkpoint's own configs: the resumed run must be the run that was interrupted.
        model, train, vocab = start.model_config, start.train_config, start.vocab
        reporter.log(f"resuming from checkpoint at step {start.step}")
    elif init_from is not None:
        start = load_checkpoint(storage, init_from, map_location="cpu")
        # The architecture must be the source's; dropout is a training choice of this run.
        if start.model_config.model_copy(update={"dropout": model.dropout}) != model:
            reporter.log(f"fine-tuning keeps the initial checkpoint's network: {_describe(start.model_config)}")
        model, vocab = start.model_config.model_copy(update={"dropout": model.dropout}), start.vocab
        reporter.log(f"starting from the weights of {init_from} (step {start.step})")
    data = prepare_corpus(storage, corpus, train, vocab)
    reporter.log(f"corpus: {data.length} characters, vocabulary of {len(data.vocab)}")
    with storage.local_path(data.key) as path, _out_of_memory(model, len(data.vocab), train):
        # Moving the network and a checkpoint's state to the device can run out of GPU memory
        # as surely as a training step: all of it reports the same TrainingError.
        ids = np.memmap(path, dtype=data.dtype, mode="r", shape=(data.length,))
        trainer = Trainer(storage, run_id, ids, data.vocab, model, train, reporter, dev)
        trainer.info["corpus_hash"] = corpus.hash
        if start is not None and pointer is not None:
            trainer.restore(start)
        elif start is not None:
            trainer.model.load_state_dict(start.state_dict)
        return trainer.run()


@contextlib.contextmanager
def _out_of_memory(model: ModelConfig, vocab_size: int, train: TrainConfig) -> Iterator[None]:
    try:
        yield
    except torch.OutOfMemoryError:
        raise TrainingError(oom_message(model, vocab_size, train)) from None


def oom_message(model: ModelConfig, vocab_size: int, train: TrainConfig) -> str:
    with torch.device("meta"):  # counts parameters without allocating them
        params = count_parameters(CharRNN(vocab_size, model))
    count = f"{params / 1e6:.1f}M" if params >= 1e6 else f"{params / 1e3:.1f}k"
    return (
        f"out of GPU memory training a {_describe(model)} network ({count} "
        f"parameters, vocabulary {vocab_size}) with batch_size={train.batch_size}, "
        f"seq_length={train.seq_length}: lower batch_size, seq_length or rnn_size"
    )


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _describe(model: ModelConfig) -> str:
    return f"{model.num_layers}x{model.rnn_size} {model.model}"


def _result(ckpt: Checkpoint, pointer: dict[str, Any]) -> TrainResult:
    best = pointer.get("best") or {}
    return TrainResult(
        final_step=ckpt.step,
        checkpoint_key=pointer["latest"]["key"],
        best_checkpoint_key=best.get("key"),
        best_val_loss=ckpt.best_val_loss,
        final_train_loss=ckpt.train_loss,
        final_val_loss=ckpt.val_loss,
        chars_per_sec=ckpt.info.get("chars_per_sec"),
        stop_reason=ckpt.info.get("stop_reason", "max_iters"),
    )


@dataclass
class Counters:
    """The run's progress besides tensors; saved in each checkpoint's data state."""

    step: int = 0
    start_loss: float | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    best_val_loss: float | None = None
    # Wall seconds of the run when the checkpoint was written, over all attempts: a resumed
    # attempt adds its own time to it (the time budget spans attempts).
    elapsed: float = 0.0
    train_seconds: float = 0.0  # seconds spent in training steps, for chars/s
    chars_seen: int = 0
    unlogged: list[float] = field(default_factory=list)  # losses since the last train_loss report


class Trainer:
    def __init__(
        self, storage: Storage, run_id: str, ids: np.ndarray, vocab: Vocab,
        model: ModelConfig, train: TrainConfig, reporter: Reporter, device: torch.device,
    ) -> None:
        self.storage, self.run_id, self.reporter = storage, run_id, reporter
        self.vocab, self.model_config, self.train = vocab, model, train
        self.device = device
        self.dtype = resolve_precision(train.precision, device, model.model)
        self.train_ids, self.val_ids = split(ids, train.val_frac)
        torch.manual_seed(train.seed)
        self.model = CharRNN(len(vocab), model).to(device)
        self.optimizer = make_optimizer(self.model, train)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype is torch.float16)
        self.data_rng = torch.Generator().manual_seed(train.seed + 1)
        self.batches = Batches(self.train_ids, train, self.data_rng)
        self.hidden: State | None = None
        self.c = Counters()
        self.info: dict[str, Any] = {"run_id": run_id}
        self._unchecked: list[tuple[int, torch.Tensor]] = []  # losses the guard has not seen

    # --- one step ---------------------------------------------------------------------------

    def _step(self, lr: float) -> torch.Tensor:
        x, y, fresh = self.batches.next()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast(self.device, self.dtype):
            logits, hidden = self.model(x, None if fresh else self.hidden)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        if self.train.batching == "sequential":
            self.hidden = detach_state(hidden)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def _progress(self, elapsed: float) -> float:
        parts = [self.c.step / self.train.max_iters]
        if self.train.time_budget:
            parts.append(elapsed / self.train.time_budget)
        if self.train.max_epochs:
            parts.append(self.batches.epochs_done / self.train.max_epochs)
        return max(parts)

    def _stop_reason(self, elapsed: float) -> str | None:
        if self.c.step >= self.train.max_iters:
            return "max_iters"
        if self.train.max_epochs and self.batches.epochs_done >= self.train.max_epochs:
            return "max_epochs"
        if self.train.time_budget and elapsed >= self.train.time_budget:
            return "time_budget"
        return None

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> TrainResult:
        self.model.train()
        # This attempt's start, and the wall clock of the last checkpoint (checkpoint_every_seconds).
        self._began = self._saved_at = time.monotonic()
        self._interval = (self.c.train_seconds, self.c.chars_seen)  # chars/s since the last log
        chars_per_step = self.train.batch_size * self.train.seq_length
        reason = self._stop_reason(self.c.elapsed)
        while reason is None:
            lr = lr_at(self.train, self.c.step + 1, self._progress(self._elapsed()))
            t0 = time.perf_counter()
            loss = self._step(lr)
            self.c.step += 1
            self.c.chars_seen += chars_per_step
            self._unchecked.append((self.c.step, loss))
            if self.c.step % self.train.log_every == 0:
                self._log(lr, self.c.train_seconds + time.perf_counter() - t0)
            self.c.train_seconds += time.perf_counter() - t0
            reason = self._stop_reason(self._elapsed())
            self._after_step(reason, self._elapsed())
        if not self.info.get("finished"):
            self._after_step(reason, self._elapsed())
        return _result(self._last_checkpoint, self._pointer)

    def _elapsed(self) -> float:
        """Wall seconds of the whole run: earlier attempts plus this one."""
        return self.c.elapsed + time.monotonic() - self._began

    def _checkpoint_due(self, step: int) -> bool:
        """Every `checkpoint_every` steps, and at the first step boundary after
        `checkpoint_every_seconds` of wall time since the last one (or since this attempt began),
        so a slow run killed early loses minutes, not hours."""
        t = self.train
        if step % t.checkpoint_every == 0:
            return True
        seconds = t.checkpoint_every_seconds
        return seconds > 0 and time.monotonic() - self._saved_at >= seconds

    def _after_step(self, reason: str | None, elapsed: float) -> None:
        step, t = self.c.step, self.train
        checkpoint = reason is not None or self._checkpoint_due(step)
        if checkpoint or step % t.eval_val_every == 0:
            self._check_losses()
            self._evaluate()
        if checkpoint:
            self.info.update(finished=reason is not None, stop_reason=reason)
            self._checkpoint(elapsed)
            self._saved_at = time.monotonic()
        if reason is not None:  # the run ends, at whichever limit: the bar completes at this step
            self.reporter.progress(step, step, stop_reason=reason)
            self.reporter.log(f"stopped at step {step} ({reason.replace('_', ' ')})")

    def _expected_steps(self, elapsed: float) -> int:
        """The step the run will stop at: `max_iters`, or, when a time budget or an epoch limit
        will end it sooner, `step / progress` (progress being the fraction the learning-rate
        schedule uses), so step/total on a progress bar reads as that fraction. Re-estimated at
        every report, from the run's average pace so far."""
        step, limit = self.c.step, self.train.max_iters
        progress = self._progress(elapsed)
        if step == 0 or progress <= step / limit:
            return limit
        return min(limit, max(step, round(step / progress)))

    # --- guards, metrics, evaluation ----------------------------------------------------------

    def _check_losses(self) -> None:
        """Look at the losses since the last check: one host sync per log interval, not per step."""
        if not self._unchecked:
            return
        steps = [s for s, _ in self._unchecked]
        values = torch.stack([v for _, v in self._unchecked]).tolist()
        self._unchecked.clear()
        for step, value in zip(steps, values, strict=True):
            if not math.isfinite(value):
                raise TrainingError(
                    f"training diverged at step {step}: loss {value} (lower learning_rate or grad_clip)"
                )
            if self.c.start_loss is None:
                self.c.start_loss = value
            elif value > EXPLODE_FACTOR * self.c.start_loss:
                raise TrainingError(
                    f"training diverged at step {step}: loss {value:.3f} exploded past 3x its start "
                    f"({self.c.start_loss:.3f}); lower learning_rate"
                )
            self.c.unlogged.append(value)

    def _log(self, lr: float, train_seconds: float) -> None:
        self._check_losses()
        secs0, chars0 = self._interval
        secs = train_seconds - secs0
        rate = (self.c.chars_seen - chars0) / secs if secs > 0 else 0.0
        self._interval = (train_seconds, self.c.chars_seen)
        self.c.train_loss = sum(self.c.unlogged) / len(self.c.unlogged)
        self.c.unlogged.clear()
        self.reporter.metric(self.c.step, train_loss=self.c.train_loss, lr=lr, chars_per_sec=rate)
        elapsed = self._elapsed()
        self.reporter.progress(
            self.c.step, self._expected_steps(elapsed), epoch=round(self.batches.epochs_done, 4),
            fraction=round(min(1.0, self._progress(elapsed)), 4),
        )

    def _evaluate(self) -> None:
        val = self.val_ids[: self.train.eval_max_chars]
        # Streams side by side: 3-4x faster than `jobs eval`'s one stream, ~0.0015 nats/char
        # higher (docs/training.md, Evaluation); what ranks the "best" checkpoint.
        result = evaluate_ids(self.model, val, device=self.device, dtype=self.dtype,
                              max_streams=MAX_STREAMS)
        self.c.val_loss = result.nats_per_char
        if self.c.best_val_loss is None or result.nats_per_char < self.c.best_val_loss:
            self.c.best_val_loss = result.nats_per_char
        self.reporter.metric(self.c.step, val_loss=result.nats_per_char)
        self.reporter.log(
            f"step {self.c.step}: val_loss {result.nats_per_char:.4f} nats/char "
            f"({result.bits_per_char:.3f} bits/char), best {self.c.best_val_loss:.4f}, "
            f"train_loss {self.c.train_loss if self.c.train_loss is not None else float('nan'):.4f}"
        )

    # --- checkpoints --------------------------------------------------------------------------

    def _checkpoint(self, elapsed: float) -> None:
        step = self.c.step
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "data": self.data_rng.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        counters = asdict(self.c) | {"elapsed": elapsed}
        chars_per_sec = self.c.chars_seen / self.c.train_seconds if self.c.train_seconds else None
        ckpt = Checkpoint(
            model_config=self.model_config, train_config=self.train, vocab=self.vocab,
            state_dict=self.model.state_dict(), step=step, val_loss=self.c.val_loss,
            best_val_loss=self.c.best_val_loss, train_loss=self.c.train_loss,
            optimizer_state=self.optimizer.state_dict(),
            scaler_state=self.scaler.state_dict(),
            rng_state=rng,
            data_state={**self.batches.state(), "hidden": state_tensors(self.hidden),
                        "counters": counters},
            info={**self.info, "chars_per_sec": chars_per_sec,
                  "precision": str(self.dtype or torch.float32).removeprefix("torch.")},
        )
        key = keys.checkpoint(self.run_id, step)
        written = save_checkpoint(self.storage, key, ckpt)
        pointer, deleted = record_checkpoint(
            self.storage, self.run_id, step, key, self.c.val_loss, self.train.keep_last, written.sha256
        )
        best = pointer["best"] is not None and pointer["best"]["step"] == step
        self.reporter.artifact("checkpoint", key, written.size, written.sha256,
                               step=step, val_loss=self.c.val_loss, best=best)
        self.reporter.log(f"checkpoint at step {step} saved{' (best so far)' if best else ''}: {key}")
        for old in deleted:
            self.reporter.log(f"removed checkpoint {old} (keeping the last {self.train.keep_last} and the best)")
        self._last_checkpoint, self._pointer = ckpt, pointer

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue exactly where `ckpt` left off."""
        self.model.load_state_dict(ckpt.state_dict)
        if ckpt.optimizer_state is not None:
            self.optimizer.load_state_dict(ckpt.optimizer_state)
        if ckpt.scaler_state:
            self.scaler.load_state_dict(ckpt.scaler_state)
        torch.set_rng_state(ckpt.rng_state["torch"])
        self.data_rng.set_state(ckpt.rng_state["data"])
        if "cuda" in ckpt.rng_state and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt.rng_state["cuda"], self.device)
        self.batches.restore(ckpt.data_state)
        self.hidden = state_from_tensors(ckpt.data_state.get("hidden") or [], self.device)
        self.c = Counters(**ckpt.data_state["counters"])
        self.info.update({k: v for k, v in ckpt.info.items() if k not in ("finished", "stop_reason")})
