"""Benchmark: the batched sampler against a naive one-sample, one-character loop (issue 5).

Trains a small char-LSTM (2x128 by default) for a short while on real code (this repository's
.py files plus some of the standard library), then, in the same process:

1. chars/s of a naive sampler written here: one sample at a time, one character per model call,
   hidden state carried, a Python loop (what a first char-rnn port does);
2. chars/s of `workers.sample.generate` at n = 1, 16, 64, 256 (one model call per character for
   the whole batch), and its speed-up over (1);
3. the cost of the code-likeness metrics (`workers.codemetrics`) as a fraction of the time it
   took to sample the batch they measure.

Goals: >= 20x at n=64 on CPU; metrics < 10% of sampling time.

    .venv/bin/python bench/sample.py [--train-seconds 60] [--length 500]
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from schemas.sampling import SampleConfig
from schemas.training import ModelConfig
from workers import codemetrics
from workers.model import CharRNN, detach_state
from workers.sample import generate
from workers.vocab import Vocab


def load_code(limit: int) -> str:
    """This repo's Python, then the stdlib's, up to `limit` characters, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in ROOT.glob("[!.]*/**/*.py") if ".venv" not in p.parts)
    files += sorted(stdlib.glob("*.py"))
    parts, size = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= limit:
            break
    return "".join(parts)[:limit]


def train(text: str, seconds: float, rnn_size: int, layers: int) -> tuple[CharRNN, Vocab, float]:
    torch.manual_seed(0)
    vocab = Vocab.from_text(text, min_count=5)
    data = torch.from_numpy(vocab.encode(text).astype("int64"))
    split = int(len(data) * 0.95)
    train_data, val_data = data[:split], data[split:]
    model = CharRNN(len(vocab), ModelConfig(rnn_size=rnn_size, num_layers=layers))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch, seq = 32, 128
    # Sequential streams with carried state (char-rnn's batching).
    stride = (len(train_data) - 1) // batch
    state, pos, steps = None, 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        if pos + seq + 1 > stride:
            pos, state = 0, None
        idx = torch.arange(batch) * stride + pos
        x = torch.stack([train_data[i:i + seq] for i in idx])
        y = torch.stack([train_data[i + 1:i + seq + 1] for i in idx])
        logits, state = model(x, state)
        state = detach_state(state)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(vocab)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        pos += seq
        steps += 1
    model.eval()
    with torch.inference_mode():
        v = val_data[: 20_000]
        logits, _ = model(v[:-1].unsqueeze(0))
        val = torch.nn.functional.cross_entropy(logits[0], v[1:]).item()
    print(f"trained {layers}x{rnn_size} {model.config.model} for {steps} steps "
          f"({seconds:.0f} s) on {len(text):,} chars; val loss {val:.3f} nats "
          f"= {val / math.log(2):.3f} bits/char; vocab {len(vocab)}")
    return model, vocab, val


@torch.inference_mode()
def naive_sample(model: CharRNN, vocab: Vocab, prime: str, length: int, temperature: float,
                 gen: torch.Generator) -> str:
    """The baseline: one sample, one character per model call, state carried, a Python loop."""
    ids = torch.tensor([[vocab.index[c] for c in prime]])
    logits, state = model(ids)
    out = []
    for _ in range(length):
        probs = torch.softmax(logits[0, -1] / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen)
        out.append(int(nxt))
        logits, state = model(nxt.view(1, 1), state)
    return prime + vocab.decode(out)


def best_of(repeats: int, fn) -> tuple[float, object]:
    """The fastest of `repeats` runs (other processes share these CPUs) and its result."""
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-seconds", type=float, default=60.0)
    parser.add_argument("--rnn-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--length", type=int, default=500)
    parser.add_argument("--corpus-chars", type=int, default=3_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    # One thread by default: on a shared 2-core machine, OpenMP threads that spin-wait for a core
    # another process holds make each op ~100x slower, which would measure the neighbours.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    model, vocab, _ = train(load_code(args.corpus_chars), args.train_seconds, args.rnn_size,
                            args.layers)
    prime, temperature, length = "def ", 0.8, args.length

    naive_chars = 4 * length
    gen = torch.Generator().manual_seed(0)
    naive_time, _ = best_of(args.repeats, lambda: [
        naive_sample(model, vocab, prime, length, temperature, gen) for _ in range(4)
    ])
    naive_rate = naive_chars / naive_time
    print(f"\nnaive loop (1 sample at a time): {naive_rate:,.0f} chars/s")

    codemetrics.batch_metrics(["def f(x):\n    return x\n"], "python")  # compile Pygments' regexes once
    print(f"\n{'n':>5} {'chars/s':>12} {'vs naive':>9} {'metrics':>9} {'of sampling':>12}")
    last = None
    for n in (1, 16, 64, 256):
        config = SampleConfig(num_samples=n, length=length, prime=prime, temperature=temperature,
                              seed=n)
        elapsed, samples = best_of(args.repeats, lambda c=config: generate(model, vocab, c, device="cpu"))
        texts = [s.text for s in samples]
        metric_time, _ = best_of(args.repeats, lambda t=texts: codemetrics.batch_metrics(t, "python"))
        rate = n * length / elapsed
        print(f"{n:>5} {rate:>12,.0f} {rate / naive_rate:>8.1f}x {metric_time * 1000:>7.1f}ms "
              f"{metric_time / elapsed:>11.1%}")
        last = samples
    figures = codemetrics.round_metrics(codemetrics.batch_metrics([s.text for s in last], "python"))
    mean_bits = sum(s.bits_per_char for s in last) / len(last)
    print(f"\nbatch metrics (n=256, T={temperature}): bits/char {mean_bits:.3f}, {figures}")
    print("\nfirst sample:\n" + last[0].text[:400])


if __name__ == "__main__":
    main()
