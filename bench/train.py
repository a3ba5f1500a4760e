"""Training benchmark (issue 4): the project's training against a plain PyTorch reference.

    .venv/bin/python bench/train.py [--budget 100] [--parts abc] [--set key=value ...]

Corpus: the `.py` files of this machine's Python standard library (tests and site-packages left
out), concatenated in path order; the last 5% is the held-out tail.

(a) chars/s of the project's training step (`run_train_stage`, default precision and batching)
    for a 2x256 LSTM, batch 32, seq 128, against the reference step: embedding + nn.LSTM +
    linear, fp32, Adam, random windows, nothing else. Rounds alternate to share out the noise.
(b) achieved FLOP/s of both, as a fraction of a big matmul's FLOP/s measured here (fp32 and bf16).
(c) validation loss after `--budget` seconds of training: the project's default settings
    (`--preset`, default: the default preset, plus `--set` overrides) against the reference
    trained for the same wall time; both measured on the held-out tail the way `charforge jobs
    eval` measures it (`workers.evaluate` with `EVAL_STREAMS`: one stream read once, in order,
    state carried through all of it, fp32).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.events import EventKind
from schemas.results import CorpusResult
from schemas.run import build_run_spec
from schemas.training import DEFAULT_PRESET, ModelConfig, TrainConfig
from workers import keys
from workers.data import prepare_corpus, split
from workers.evaluate import EVAL_STREAMS, MAX_STREAMS, evaluate_ids, evaluate_text
from workers.progress import ListReporter
from workers.storage import LocalStorage, Storage
from workers.train import default_threads, run_train_stage

HASH = "b" * 64
REF_LR = 2e-3  # char-rnn's default Adam learning rate


def stdlib_text() -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if not any(part in ("site-packages", "test", "tests", "idle_test") for part in p.parts)
    )
    return "".join(p.read_text("utf-8", errors="replace") for p in files)


def make_corpus(storage: Storage, text: str) -> CorpusResult:
    storage.put_bytes(keys.corpus_text(HASH), text.encode())
    return CorpusResult(hash=HASH, text_key=keys.corpus_text(HASH),
                        manifest_key=keys.corpus_manifest(HASH), bytes=len(text.encode()),
                        files=1, skipped=0, vocab_size=len(set(text)), repos=())


class Reference(nn.Module):
    """The plain model: what a tutorial writes."""

    def __init__(self, vocab: int, hidden: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x, state=None):  # type: ignore[no-untyped-def]
        out, state = self.lstm(self.embed(x), state)
        return self.head(out), state


class ReferenceTrainer:
    def __init__(self, train_ids: np.ndarray, vocab: int, batch: int = 32, seq: int = 128) -> None:
        torch.manual_seed(0)
        self.data = torch.from_numpy(np.asarray(train_ids, dtype=np.int64))
        self.model = Reference(vocab)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=REF_LR)
        self.batch, self.seq = batch, seq
        self.steps = 0

    def step(self) -> float:
        starts = torch.randint(0, len(self.data) - self.seq - 1, (self.batch,))
        window = self.data[starts[:, None] + torch.arange(self.seq + 1)]
        logits, _ = self.model(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.steps += 1
        return loss.item()

    def chars_per_sec(self, steps: int) -> float:
        for _ in range(3):
            self.step()
        began = time.perf_counter()
        for _ in range(steps):
            self.step()
        return steps * self.batch * self.seq / (time.perf_counter() - began)


def project_chars_per_sec(storage: Storage, corpus: CorpusResult, run: int, steps: int) -> float:
    model = ModelConfig(rnn_size=256, num_layers=2)
    train = TrainConfig(batch_size=32, seq_length=128, max_iters=steps + 10, log_every=10,
                        eval_val_every=10**6, checkpoint_every=10**6, eval_max_chars=5000)
    reporter = ListReporter("bench")
    run_train_stage(storage, f"{run:08x}", corpus, model, train, reporter)
    rates = [m["chars_per_sec"] for m in reporter.of(EventKind.METRIC) if "chars_per_sec" in m]
    return statistics.median(rates[1:])  # the first interval holds the warm-up


def flops_per_char(vocab: int, hidden: int = 256, layers: int = 2) -> float:
    """Matmul FLOPs per trained character: forward (LSTM gates + head) x3 for backward."""
    forward = layers * 2 * 4 * hidden * (hidden + hidden) + 2 * hidden * vocab
    return 3.0 * forward


def matmul_flops(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    began = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - began)


def part_ab(storage: Storage, corpus: CorpusResult, rounds: int, steps: int) -> None:
    data = prepare_corpus(storage, corpus, TrainConfig())
    with storage.local_path(data.key) as path:
        ids = np.memmap(path, dtype=data.dtype, mode="r", shape=(data.length,))
        train_ids, _ = split(ids, 0.05)
        ref, ours = [], []
        for i in range(rounds):
            ref.append(ReferenceTrainer(train_ids, len(data.vocab)).chars_per_sec(steps))
            ours.append(project_chars_per_sec(storage, corpus, 0xA0 + i, steps))
            print(f"  round {i + 1}: reference {ref[-1]:,.0f} chars/s, project {ours[-1]:,.0f} chars/s")
    r, o = statistics.median(ref), statistics.median(ours)
    print(f"(a) 2x256 LSTM, batch 32, seq 128: reference {r:,.0f} chars/s, project {o:,.0f} "
          f"chars/s -> {o / r:.2f}x (goal >= 1.5x)")
    fpc = flops_per_char(len(data.vocab))
    mm32, mm16 = matmul_flops(torch.float32), matmul_flops(torch.bfloat16)
    print(f"(b) big matmul: fp32 {mm32 / 1e9:,.0f} GFLOP/s, bf16 {mm16 / 1e9:,.0f} GFLOP/s; "
          f"{fpc / 1e6:.2f} MFLOP per trained char")
    print(f"    reference {r * fpc / 1e9:,.0f} GFLOP/s = {r * fpc / mm32:.0%} of fp32 matmul; "
          f"project {o * fpc / 1e9:,.0f} GFLOP/s = {o * fpc / mm16:.0%} of bf16 matmul, "
          f"{o * fpc / mm32:.0%} of fp32 matmul")


def part_c(storage: Storage, corpus: CorpusResult, text: str, budget: float,
           preset: str, sets: list[str], tmp: Path) -> None:
    spec = build_run_spec([str(tmp)], preset=preset,
                          sets=[f"time_budget={budget}s", "max_iters=100000000", *sets])
    print(f"(c) project settings: preset {preset}: {spec.model.model_dump()} "
          f"{spec.train.model_dump(exclude={'seed', 'val_frac', 'keep_last'})}")
    tail = text[len(text) - max(2, int(len(text) * spec.train.val_frac)):]
    reporter = ListReporter("bench")
    result = run_train_stage(storage, "c0ffee", corpus, spec.model, spec.train, reporter)
    began = time.perf_counter()
    ours = evaluate_text(storage, result.checkpoint_key, [tail])
    took = time.perf_counter() - began
    print(f"    project: {result.final_step} steps in {budget:.0f}s "
          f"({result.chars_per_sec or 0:,.0f} chars/s) -> {ours.nats_per_char:.4f} nats/char "
          f"({ours.bits_per_char:.3f} bits/char) on {ours.chars:,} held-out chars "
          f"(eval {took:.1f} s, {ours.chars / took:,.0f} chars/s)")
    fast = evaluate_text(storage, result.checkpoint_key, [tail], streams=MAX_STREAMS)
    print(f"    (training's validation reading, {MAX_STREAMS} streams side by side from zero states: "
          f"{fast.nats_per_char:.4f} nats/char)")

    data = prepare_corpus(storage, corpus, spec.train)
    with storage.local_path(data.key) as path:
        ids = np.memmap(path, dtype=data.dtype, mode="r", shape=(data.length,))
        train_ids, val_ids = split(ids, spec.train.val_frac)
        ref = ReferenceTrainer(train_ids, len(data.vocab))
        began = time.monotonic()
        while time.monotonic() - began < budget:
            ref.step()
        # The reference is no checkpoint, so evaluate_text cannot load it: the same reading.
        began = time.perf_counter()
        theirs = evaluate_ids(ref.model, val_ids, device=torch.device("cpu"), max_streams=EVAL_STREAMS)
        took = time.perf_counter() - began
    print(f"    reference: {ref.steps} steps in {budget:.0f}s -> {theirs.nats_per_char:.4f} nats/char "
          f"({theirs.bits_per_char:.3f} bits/char) on {theirs.chars:,} held-out chars "
          f"(eval {took:.1f} s, {theirs.chars / took:,.0f} chars/s)")
    gap = theirs.nats_per_char - ours.nats_per_char
    print(f"    project is {gap:.4f} nats/char below the reference (goal >= 0.10)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=100.0, help="seconds of training in (c)")
    parser.add_argument("--parts", default="abc", help="which parts to run: a, b (with a), c")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round in (a)")
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args(argv)
    torch.set_num_threads(default_threads())
    text = stdlib_text()
    print(f"corpus: {len(text):,} chars of Python stdlib; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(prefix="charforge-bench-") as tmp:
        storage = LocalStorage(Path(tmp) / "store")
        corpus = make_corpus(storage, text)
        if "a" in args.parts or "b" in args.parts:
            part_ab(storage, corpus, args.rounds, args.steps)
        if "c" in args.parts:
            part_c(storage, corpus, text, args.budget, args.preset, args.sets, Path(tmp))


if __name__ == "__main__":
    main()
