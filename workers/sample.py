"""The sample stage: batched generation from a checkpoint, code-likeness metrics, JSONL out.

`generate` advances all `n` samples together: the prime goes in once as an (n, len) batch, then
one model call per character for the whole batch with the hidden state carried (char-rnn's loop,
batched). `run_sample_stage` wraps it for the pipeline and `charforge jobs sample`: it loads a
checkpoint, writes one JSONL batch to `runs/<id>/samples/<batch-id>.jsonl` and reports it as an
artifact. Records and metrics are described in docs/sampling.md.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import torch

from schemas.errors import SamplingError, StorageError
from schemas.results import CorpusResult, SampleResult
from schemas.sampling import SampleConfig, SampleText
from workers import codemetrics, keys
from workers.model import CharRNN, resolve_device
from workers.progress import Reporter
from workers.storage import Storage
from workers.vocab import Vocab

# The corpus's own figures come from a bounded prefix: cheap for a multi-GB corpus, on S3 too.
CORPUS_EXCERPT_BYTES = 256 * 1024
CORPUS_METRICS_VERSION = 1  # bump when a metric's definition changes: old caches are ignored
PROGRESS_EVERY = 64  # characters between progress callbacks
UNIFORM_BLOCK = 64  # steps of random numbers drawn (and copied to the device) at a time


def new_seed() -> int:
    return secrets.randbits(63)


def prime_ids(vocab: Vocab, prime: str) -> list[int]:
    """The prime as vocabulary indices; refuses characters the model never saw, by name."""
    missing = vocab.missing(prime)
    if missing:
        names = ", ".join(repr(c) for c in missing)
        raise SamplingError(f"prime text has characters the model never saw: {names}")
    if prime:
        return [int(i) for i in vocab.encode(prime)]
    # No prime: start as a file's next line would, from a newline the sample does not include.
    return [vocab.index.get("\n", 0)]


class Uniforms:
    """The random numbers behind every draw: one uniform in [0, 1) per row and step.

    They come from a CPU `torch.Generator` whatever the device: a CUDA generator draws other
    numbers from the same seed, so a batch made on a GPU could not be made again on a CPU. Row i
    at step t takes element [t, i] of the float64 stream `torch.rand((steps, rows))` of a CPU
    generator seeded with the batch's seed. They are drawn `UNIFORM_BLOCK` steps at a time, one
    host-to-device copy per block rather than per step; the CPU generator gives the same stream
    whatever the block size (tested).
    """

    def __init__(self, seed: int, rows: int, device: torch.device) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.rows, self.device = rows, device
        self.block = torch.empty((0, rows), dtype=torch.float64)
        self.at = 0

    def next(self) -> torch.Tensor:
        """The next step's numbers, shape (rows,), on the device."""
        if self.at == len(self.block):
            block = torch.rand((UNIFORM_BLOCK, self.rows), generator=self.gen, dtype=torch.float64)
            self.block, self.at = block.to(self.device), 0
        self.at += 1
        return self.block[self.at - 1]


def _choose(logits: torch.Tensor, config: SampleConfig, uniforms: Uniforms | None) -> torch.Tensor:
    """Next character per row, shape (n,), from last-step logits (n, V)."""
    if config.greedy or uniforms is None:
        return logits.argmax(dim=-1)
    scaled = logits / config.temperature
    if config.top_k is not None and config.top_k < scaled.size(-1):
        kth = torch.topk(scaled, config.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return draw(torch.softmax(scaled, dim=-1), uniforms.next())


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One index per row with probability `probs[row, index]`, by inverting the CDF at `u[row]`.

    `u`: one uniform number in [0, 1) per row, on probs' device. `torch.multinomial` costs ~2 us
    per row on CPU (8x this at n=64, 14x at n=256), the largest cost of a step after the model
    itself. `right=True` never lands on a zero-probability index (masked by top-k or the
    unknown-symbol rule): a draw of exactly 0 goes to the first index with mass. Float64 keeps
    the CDF's last step exact enough that u < total always (the clamp is for rounding at 2**-53).
    """
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    idx = torch.searchsorted(cdf, u.reshape(-1, 1).double() * cdf[:, -1:], right=True).squeeze(1)
    return idx.clamp_(max=probs.size(-1) - 1)


@torch.inference_mode()
def generate(
    model: CharRNN,
    vocab: Vocab,
    config: SampleConfig,
    *,
    device: str | torch.device | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[SampleText]:
    """`config.num_samples` texts, each the prime plus `config.length` generated characters.

    Same seed, options and model -> the same texts, on any device (`Uniforms`: every draw comes
    from a CPU generator). A missing seed draws a fresh one: pass `config.seed` to reproduce a batch.
    """
    if len(vocab) != model.vocab_size:
        raise SamplingError(
            f"vocabulary has {len(vocab)} characters but the model expects {model.vocab_size}"
        )
    dev = resolve_device(device)
    model = model.to(dev).eval()
    n, length = config.num_samples, config.length
    seed = config.seed if config.seed is not None else new_seed()
    uniforms = None if config.greedy else Uniforms(seed, n, dev)

    prime = torch.tensor(prime_ids(vocab, config.prime), dtype=torch.long, device=dev)
    logits, state = model(prime.unsqueeze(0).expand(n, -1), model.init_state(n, dev))
    logits = logits[:, -1].float()
    # The unknown symbol (index 0) is never chosen: it stands for "some rare character" and
    # would print as U+FFFD, which no corpus line holds.
    never = torch.zeros(logits.size(-1), device=dev)
    if never.numel() > 1:
        never[0] = float("-inf")
    out = torch.empty((n, length), dtype=torch.long, device=dev)
    nll = torch.zeros(n, dtype=torch.float64, device=dev)
    for t in range(length):
        nxt = _choose(logits + never, config, uniforms)
        out[:, t] = nxt
        # The model's own surprise at its choice, at temperature 1 (comparable to val loss).
        nll -= torch.log_softmax(logits, dim=-1).gather(1, nxt.unsqueeze(1)).squeeze(1)
        if t + 1 < length:
            step_logits, state = model(nxt.unsqueeze(1), state)
            logits = step_logits[:, -1].float()
        if on_progress is not None and (t + 1) % PROGRESS_EVERY == 0:
            on_progress(t + 1, length)
    bits = (nll / (length * math.log(2))).tolist()
    rows = out.cpu().numpy()
    return [
        SampleText(index=i, text=config.prime + vocab.decode(rows[i]), generated=length,
                   bits_per_char=bits[i])
        for i in range(n)
    ]


def read_excerpt(storage: Storage, key: str, limit: int = CORPUS_EXCERPT_BYTES) -> str:
    """The first `limit` bytes of a text object, cut at the last whole line."""
    with storage.open(key) as fh:
        data = fh.read(limit)
    text = data.decode("utf-8", errors="ignore")
    if len(data) == limit and "\n" in text:
        text = text[: text.rindex("\n") + 1]
    return text


def corpus_metrics_key(corpus_hash: str) -> str:
    # Beside the corpus it describes: corpora are content-addressed, so this never goes stale.
    return keys.corpus_metrics(corpus_hash, CORPUS_METRICS_VERSION)


def corpus_text_metrics(storage: Storage, corpus: CorpusResult) -> dict[str, Any]:
    """Text figures of the corpus's first `CORPUS_EXCERPT_BYTES`, cached in storage.

    Lexing 256 KiB costs ~0.5 s, more than sampling a default batch on CPU: paid once per corpus.
    """
    key = corpus_metrics_key(corpus.hash)
    if storage.exists(key):
        cached = json.loads(storage.get_bytes(key))
        if cached.get("language") == corpus.main_language:
            return cached
    excerpt = read_excerpt(storage, corpus.text_key)
    style = codemetrics.indent_style(excerpt)
    entry = {
        "language": corpus.main_language,
        "excerpt_chars": len(excerpt),
        "figures": codemetrics.round_metrics(codemetrics.metrics(excerpt, corpus.main_language)),
        "indent": None if style is None else {"char": style.char, "unit": style.unit},
    }
    try:
        storage.put_bytes(key, json.dumps(entry).encode())
    except StorageError:
        pass  # a cache: the figures stand without it
    return entry


def corpus_metrics(
    storage: Storage, corpus: CorpusResult, val_loss: float | None
) -> tuple[dict[str, Any], codemetrics.IndentStyle | None]:
    """The corpus's own figures, beside which sample metrics are read, and its indent style.

    Its bits/char is the checkpoint's validation loss (the held-out tail, in bits): the model's
    surprise at real code, where a sample's bits/char is its surprise at its own output.
    """
    entry = corpus_text_metrics(storage, corpus)
    style = codemetrics.IndentStyle(**entry["indent"]) if entry["indent"] else None
    bits = val_loss / math.log(2) if val_loss is not None else None
    indent = None if style is None else "tabs" if style.char == "\t" else f"{style.unit} spaces"
    return codemetrics.round_metrics(
        {"bits_per_char": bits, **entry["figures"], "indent": indent,
         "excerpt_chars": entry["excerpt_chars"]}
    ), style


def _options(config: SampleConfig) -> dict[str, Any]:
    return config.model_dump(include={"num_samples", "length", "temperature", "top_k", "prime", "argmax"})


def sample_records(
    samples: list[SampleText], *, run_id: str, batch_id: str, config: SampleConfig,
    checkpoint: dict[str, Any], language: str | None, style: codemetrics.IndentStyle | None = None,
    device: str | None = None,
) -> Iterator[tuple[dict[str, Any], codemetrics.TextCounts]]:
    """One JSONL record per sample (see docs/sampling.md), with the counts behind its metrics.

    Indentation is checked against `style` (the corpus's) when given, else each text's own.
    `device` is where the batch was made: the seed gives the same draws on every device, but
    the logits may differ in their last bits from one device to another (docs/sampling.md).
    """
    created = datetime.now(UTC).isoformat()
    for s in samples:
        counts = codemetrics.measure(s.text, language, style)
        figures = {"bits_per_char": s.bits_per_char, **counts.ratios()}
        yield {
            "type": "sample",
            "run_id": run_id,
            "batch_id": batch_id,
            "index": s.index,
            "text": s.text,
            "options": _options(config),
            "seed": config.seed,
            "device": device,
            "checkpoint": checkpoint,
            "language": language,
            "metrics": codemetrics.round_metrics(figures),
            "created_at": created,
        }, counts


def write_batch(
    storage: Storage, key: str, records: Iterator[tuple[dict[str, Any], codemetrics.TextCounts]]
) -> tuple[int, str, codemetrics.TextCounts]:
    """Stream records to `key` as JSONL; (size, sha256, summed counts)."""
    total = codemetrics.TextCounts()
    with storage.writer(key) as out:
        for record, counts in records:
            out.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
            total = total + counts
    return out.size, out.sha256, total


def read_samples(storage: Storage, key: str) -> Iterator[dict[str, Any]]:
    """The records of one stored batch, one at a time (the batch is never held whole)."""
    with storage.open(key) as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def run_sample_stage(
    storage: Storage,
    run_id: str,
    config: SampleConfig,
    reporter: Reporter,
    *,
    checkpoint_key: str,
    corpus: CorpusResult | None = None,
    device: str | None = None,
) -> SampleResult:
    """Generate one batch from `checkpoint_key`, measure it, store it, report it as an artifact."""
    from workers.checkpoint import (  # torch-heavy; imported when a stage runs
        load_checkpoint,
        require_checkpoint,
    )

    # A step named at submit (`--set sample.checkpoint=N`) may never have been written, or rotated away.
    ckpt = load_checkpoint(storage, require_checkpoint(storage, run_id, checkpoint_key), map_location="cpu")
    model = ckpt.build_model()
    config = config.model_copy(update={"seed": config.seed if config.seed is not None else new_seed()})
    language = corpus.main_language if corpus else None
    batch_id = secrets.token_hex(8)
    key = keys.samples(run_id, batch_id)
    dev = resolve_device(device)
    reporter.log(f"sampling {config.num_samples} x {config.length} chars on {dev} from step {ckpt.step}")

    started = time.perf_counter()
    samples = generate(
        model, ckpt.vocab, config, device=dev,
        on_progress=lambda done, total: reporter.progress(done, total, unit="chars"),
    )
    elapsed = time.perf_counter() - started
    val_loss = ckpt.val_loss if ckpt.val_loss is not None else ckpt.best_val_loss
    reference, style = corpus_metrics(storage, corpus, val_loss) if corpus else (None, None)
    checkpoint = {"key": checkpoint_key, "step": ckpt.step}
    records = sample_records(
        samples, run_id=run_id, batch_id=batch_id, config=config, checkpoint=checkpoint,
        language=language, style=style, device=str(dev),
    )
    size, sha256, counts = write_batch(storage, key, records)
    mean_bits = sum(s.bits_per_char for s in samples) / len(samples)
    batch = codemetrics.round_metrics({"bits_per_char": mean_bits, **counts.ratios()})
    reporter.progress(config.length, config.length, unit="chars",
                      chars_per_sec=round(config.num_samples * config.length / elapsed, 1))
    reporter.artifact(
        "samples", key, size, sha256,
        n=config.num_samples, batch_id=batch_id, checkpoint_step=ckpt.step,
        checkpoint_key=checkpoint_key, seed=config.seed, options=_options(config),
        language=language, metrics=batch, corpus_metrics=reference, device=str(dev),
    )
    return SampleResult(
        key=key, batch_id=batch_id, n=config.num_samples,
        checkpoint_step=ckpt.step, checkpoint_key=checkpoint_key,
    )
