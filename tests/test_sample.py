"""The batched sampler and the sample stage (issue 5): options, reproducibility, JSONL, devices."""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager

import pytest
import torch
from torch import serialization

from schemas.errors import ArtifactNotFound, SamplingError
from schemas.events import EventKind
from schemas.results import CorpusResult
from schemas.sampling import SampleConfig
from schemas.training import ModelConfig, TrainConfig
from workers import keys
from workers import sample as sample_module
from workers.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from workers.model import CharRNN
from workers.progress import ListReporter
from workers.sample import (
    Uniforms,
    corpus_metrics_key,
    draw,
    generate,
    read_samples,
    run_sample_stage,
)
from workers.storage import LocalStorage
from workers.vocab import Vocab

CODE = (
    "def add(a, b):\n    return (a + b)\n\n"
    "def scale(xs, k):\n    return [x * k for x in xs]\n\n"
    "names = {'a': 1, \"b\": [2, 3]}\n"
) * 4
RUN = "ab12cd34ef56"
CORPUS_HASH = "c0ffee" * 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and spinning OpenMP threads on a shared 2-core
    machine slow every op by ~100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained() -> tuple[CharRNN, Vocab]:
    """A tiny LSTM fitted for a moment to CODE: enough for distinct, non-tied predictions."""
    torch.manual_seed(0)
    vocab = Vocab.from_text(CODE)
    model = CharRNN(len(vocab), ModelConfig(rnn_size=32, num_layers=1))
    data = torch.tensor(vocab.encode(CODE), dtype=torch.long)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        x, y = data[:-1].unsqueeze(0), data[1:].unsqueeze(0)
        logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, len(vocab)), y.view(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), vocab


def texts(model: CharRNN, vocab: Vocab, device: str | None = None, **options) -> list[str]:
    return [s.text for s in generate(model, vocab, SampleConfig(**options), device=device)]


def test_same_seed_same_samples_other_seed_other_samples(trained):
    model, vocab = trained
    first = texts(model, vocab, num_samples=4, length=60, seed=7, temperature=1.0)
    assert texts(model, vocab, num_samples=4, length=60, seed=7, temperature=1.0) == first
    assert texts(model, vocab, num_samples=4, length=60, seed=8, temperature=1.0) != first
    assert len(set(first)) > 1  # rows of one batch draw independently


def test_draw_follows_the_distribution_and_never_picks_zero_mass():
    probs = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3]).expand(100_000, 5)
    picks = draw(probs, torch.rand(100_000, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(picks, minlength=5).double() / len(picks)
    assert freq[0] == 0 and freq[2] == 0
    assert freq[1:].tolist() == pytest.approx([0.2, 0.0, 0.5, 0.3], abs=0.01)
    one_hot = torch.tensor([[0.0, 0.0, 1.0]] * 50)
    assert draw(one_hot, torch.rand(50, generator=torch.Generator().manual_seed(1))).tolist() == [2] * 50
    edges = torch.tensor([0.0, 0.19, 0.21, 0.71, 1.0 - 2**-53], dtype=torch.float64)
    assert draw(probs[:5], edges).tolist() == [1, 1, 3, 4, 4]


def test_uniforms_are_one_cpu_stream_whatever_the_block(monkeypatch):
    """The contract that makes a batch reproducible on any device: row i at step t takes element
    [t, i] of torch.rand((steps, rows), float64) from a CPU generator seeded with the seed."""
    expected = torch.rand((150, 5), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for block in (1, 7, 64):
        monkeypatch.setattr(sample_module, "UNIFORM_BLOCK", block)
        uniforms = Uniforms(9, 5, torch.device("cpu"))
        assert torch.equal(torch.stack([uniforms.next() for _ in range(150)]), expected)


def test_samples_follow_the_documented_draws(trained):
    """A reference sampler written from the contract above (CPU uniforms, inverse CDF) gives the
    same texts: anyone can make a batch again from its seed, on any device."""
    model, vocab = trained
    n, length, seed, temperature = 3, 30, 21, 0.9
    got = texts(model, vocab, num_samples=n, length=length, seed=seed, temperature=temperature,
                prime="def")
    u = torch.rand((length, n), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ids = torch.tensor([[int(i) for i in vocab.encode("def")]] * n)
    with torch.no_grad():
        logits, state = model(ids)
        for t in range(length):
            last = logits[:, -1].double() / temperature
            last[:, 0] = float("-inf")  # the unknown symbol
            cdf = torch.softmax(last, dim=-1).cumsum(-1)
            nxt = torch.searchsorted(cdf, u[t, :, None] * cdf[:, -1:], right=True)
            ids = torch.cat([ids, nxt], dim=1)
            logits, state = model(nxt, state)
    assert got == [vocab.decode(row) for row in ids.tolist()]


def test_temperature_towards_zero_top_k_one_and_zero_equal_argmax(trained):
    model, vocab = trained
    greedy = texts(model, vocab, num_samples=3, length=80, argmax=True, prime="def ")
    assert len(set(greedy)) == 1  # greedy decoding is deterministic across rows
    assert texts(model, vocab, num_samples=3, length=80, temperature=0.0, prime="def ") == greedy
    assert texts(model, vocab, num_samples=3, length=80, temperature=1e-4, prime="def ",
                 seed=1) == greedy
    assert texts(model, vocab, num_samples=3, length=80, top_k=1, temperature=1.5, prime="def ",
                 seed=2) == greedy


def test_prime_starts_every_sample_and_length_counts_generated_chars(trained):
    model, vocab = trained
    samples = generate(model, vocab, SampleConfig(num_samples=5, length=33, prime="return [", seed=3))
    assert [s.index for s in samples] == [0, 1, 2, 3, 4]
    for s in samples:
        assert s.text.startswith("return [")
        assert len(s.text) == len("return [") + 33 and s.generated == 33
        assert "\ufffd" not in s.text  # the unknown symbol is never drawn


def test_unknown_prime_characters_refused_by_name(trained):
    model, vocab = trained
    with pytest.raises(SamplingError) as err:
        generate(model, vocab, SampleConfig(prime="def €(\tx€):"))
    assert str(err.value) == "prime text has characters the model never saw: '€', '\\t'"


def test_one_model_call_per_character_for_the_whole_batch(trained):
    model, vocab = trained
    shapes = []
    hook = model.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    try:
        generate(model, vocab, SampleConfig(num_samples=6, length=20, prime="def", seed=1))
    finally:
        hook.remove()
    assert shapes == [(6, 3)] + [(6, 1)] * 19  # prime once as a batch, then one call per char


def test_carried_state_matches_rerunning_the_whole_text(trained):
    """Greedy text from the stepwise sampler equals greedy decoding that re-reads everything."""
    model, vocab = trained
    [sample] = generate(model, vocab, SampleConfig(num_samples=1, length=25, prime="names", argmax=True))
    ids = [int(i) for i in vocab.encode("names")]
    with torch.no_grad():
        for _ in range(25):
            logits, _ = model(torch.tensor([ids]))
            logits[0, -1, 0] = float("-inf")
            ids.append(int(logits[0, -1].argmax()))
    assert sample.text == vocab.decode(ids)


def test_bits_per_char_is_the_models_surprise_at_its_own_text(trained):
    model, vocab = trained
    [s] = generate(model, vocab, SampleConfig(num_samples=1, length=40, prime="def", seed=5,
                                              temperature=1.2))
    ids = torch.from_numpy(vocab.encode(s.text).astype("int64")).unsqueeze(0)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1])[0], dim=-1)[0]
    nll = -logp[torch.arange(2, ids.size(1) - 1), ids[0, 3:]].sum().item()
    assert s.bits_per_char == pytest.approx(nll / 40 / math.log(2), rel=1e-4)


@contextmanager
def saved_as_if_on_cuda():
    """Tag every tensor written inside the block as living on cuda:0, as a GPU trainer's are."""
    def tagger(obj):
        return "cuda:0"

    serialization.register_package(0, tagger, lambda obj, location: None)
    try:
        yield
    finally:
        serialization._package_registry[:] = [
            e for e in serialization._package_registry if e[1] is not tagger
        ]


def write_checkpoint(storage: LocalStorage, model: CharRNN, vocab: Vocab, step: int = 40) -> str:
    key = keys.checkpoint(RUN, step)
    ckpt = Checkpoint(model.config, TrainConfig(), vocab, model.state_dict(), step=step,
                      val_loss=1.25, best_val_loss=1.25)
    save_checkpoint(storage, key, ckpt)
    return key


@pytest.mark.skipif(torch.cuda.is_available(), reason="emulates a GPU checkpoint on a CPU-only host")
def test_checkpoint_written_on_gpu_samples_on_cpu(tmp_path, trained):
    model, vocab = trained
    storage = LocalStorage(tmp_path)
    with saved_as_if_on_cuda():
        key = write_checkpoint(storage, model, vocab)
    with pytest.raises(RuntimeError, match="CUDA"):  # proof the file really says cuda:0
        torch.load(storage.root / key, weights_only=True)
    ckpt = load_checkpoint(storage, key, map_location="cpu")
    options = {"num_samples": 3, "length": 50, "seed": 11, "prime": "def"}
    assert texts(ckpt.build_model(), ckpt.vocab, **options) == texts(model, vocab, **options)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_samples_on_cuda_and_a_cuda_checkpoint_samples_on_cpu(tmp_path, trained):
    model, vocab = trained
    storage = LocalStorage(tmp_path)
    cuda_model = CharRNN(len(vocab), model.config).cuda()
    cuda_model.load_state_dict(model.state_dict())
    config = SampleConfig(num_samples=8, length=40, prime="def", seed=1, temperature=1.0)
    samples = generate(cuda_model, vocab, config, device="cuda")
    assert all(s.text.startswith("def") for s in samples)
    # Same seed on the CPU: the same draws (CPU generator). Logits differ in their last bits
    # between cuDNN and oneDNN, so a draw within ~1e-6 of a CDF step could still differ: rare.
    assert [s.text for s in generate(model, vocab, config, device="cpu")] == [s.text for s in samples]
    key = write_checkpoint(storage, cuda_model, vocab)
    ckpt = load_checkpoint(storage, key, map_location="cpu")
    greedy = {"num_samples": 2, "length": 40, "prime": "def", "argmax": True}
    assert texts(ckpt.build_model(), ckpt.vocab, **greedy, device="cpu") == texts(model, vocab, **greedy)


def test_sample_stage_writes_jsonl_and_reports_the_batch(tmp_path, trained):
    model, vocab = trained
    storage = LocalStorage(tmp_path)
    ckpt_key = write_checkpoint(storage, model, vocab, step=40)
    storage.put_bytes(keys.corpus_text(CORPUS_HASH), CODE.encode())
    corpus = CorpusResult(hash=CORPUS_HASH, text_key=keys.corpus_text(CORPUS_HASH),
                          manifest_key=keys.corpus_manifest(CORPUS_HASH), bytes=len(CODE), files=1,
                          skipped=0, vocab_size=len(vocab), repos=(), main_language="python")
    reporter = ListReporter("sample")
    config = SampleConfig(num_samples=4, length=64, prime="def ", temperature=0.7, top_k=5)
    result = run_sample_stage(storage, RUN, config, reporter, checkpoint_key=ckpt_key,
                              corpus=corpus, device="cpu")

    assert result.key == keys.samples(RUN, result.batch_id)
    assert (result.n, result.checkpoint_step, result.checkpoint_key) == (4, 40, ckpt_key)
    records = list(read_samples(storage, result.key))
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    first = records[0]
    assert first["text"].startswith("def ") and first["run_id"] == RUN
    assert first["checkpoint"] == {"key": ckpt_key, "step": 40}
    assert first["options"] == {"num_samples": 4, "length": 64, "temperature": 0.7, "top_k": 5,
                                "prime": "def ", "argmax": False}
    assert isinstance(first["seed"], int) and first["language"] == "python"
    assert first["device"] == "cpu"
    assert set(first["metrics"]) == {"bits_per_char", "bracket_balance", "quote_balance",
                                     "lexer_error_rate", "mean_line_length", "indent_consistency"}

    [artifact] = reporter.of(EventKind.ARTIFACT)
    body = (storage.root / result.key).read_bytes()
    assert artifact["kind"] == "samples" and artifact["key"] == result.key
    assert artifact["size"] == len(body) and artifact["sha256"] == hashlib.sha256(body).hexdigest()
    meta = artifact["meta"]
    assert meta["n"] == 4 and meta["checkpoint_step"] == 40 and meta["seed"] == first["seed"]
    assert meta["corpus_metrics"]["bracket_balance"] == 1.0
    assert meta["corpus_metrics"]["indent"] == "4 spaces"
    assert meta["corpus_metrics"]["bits_per_char"] == pytest.approx(1.25 / math.log(2), abs=1e-4)
    assert 0.0 <= meta["metrics"]["bracket_balance"] <= 1.0

    # The recorded seed and options reproduce the batch.
    again = run_sample_stage(storage, RUN, config.model_copy(update={"seed": first["seed"]}),
                             ListReporter(), checkpoint_key=ckpt_key)
    assert [r["text"] for r in read_samples(storage, again.key)] == [r["text"] for r in records]
    assert json.loads(body.splitlines()[0])["type"] == "sample"


def test_corpus_figures_are_computed_once_and_cached_beside_the_corpus(tmp_path, trained):
    model, vocab = trained
    storage = LocalStorage(tmp_path)
    ckpt_key = write_checkpoint(storage, model, vocab)
    storage.put_bytes(keys.corpus_text(CORPUS_HASH), CODE.encode())
    corpus = CorpusResult(hash=CORPUS_HASH, text_key=keys.corpus_text(CORPUS_HASH),
                          manifest_key=keys.corpus_manifest(CORPUS_HASH), bytes=len(CODE), files=1,
                          skipped=0, vocab_size=len(vocab), repos=(), main_language="python")
    config = SampleConfig(num_samples=2, length=20)

    def corpus_figures() -> dict:
        reporter = ListReporter()
        run_sample_stage(storage, RUN, config, reporter, checkpoint_key=ckpt_key, corpus=corpus)
        return reporter.of(EventKind.ARTIFACT)[0]["meta"]["corpus_metrics"]

    assert corpus_figures()["bracket_balance"] == 1.0
    key = corpus_metrics_key(CORPUS_HASH)
    assert key.startswith(keys.corpus_prefix(CORPUS_HASH))
    cached = json.loads(storage.get_bytes(key))
    cached["figures"]["bracket_balance"] = 0.5  # a marker only the cache can supply
    storage.put_bytes(key, json.dumps(cached).encode())
    assert corpus_figures()["bracket_balance"] == 0.5
    other = corpus.model_copy(update={"main_language": "c"})  # another lexer: recomputed
    reporter = ListReporter()
    run_sample_stage(storage, RUN, config, reporter, checkpoint_key=ckpt_key, corpus=other)
    assert reporter.of(EventKind.ARTIFACT)[0]["meta"]["corpus_metrics"]["bracket_balance"] == 1.0


def test_sample_stage_names_the_steps_there_are_when_its_checkpoint_is_gone(tmp_path, trained):
    """`--set sample.checkpoint=N` at submit: step N may never be written, or be rotated away."""
    model, vocab = trained
    storage = LocalStorage(tmp_path)
    write_checkpoint(storage, model, vocab, step=40)
    with pytest.raises(ArtifactNotFound, match="no checkpoint at step 90; available steps: 40"):
        run_sample_stage(storage, RUN, SampleConfig(num_samples=1, length=5, checkpoint="90"), ListReporter(),
                         checkpoint_key=keys.checkpoint(RUN, 90))


def test_jobs_sample_options_over_the_runs_stored_ones():
    from orchestrator.cli.results import sample_options
    from schemas.errors import UserError

    stored = SampleConfig(length=48, top_k=3, argmax=True, temperature=0.6).model_dump()
    assert sample_options(stored, num_samples=4, length=None, top_k=None).model_dump() == {**stored, "num_samples": 4}
    lifted = sample_options(stored, top_k=0, temperature=0.5)  # top-k lifted; a temperature turns argmax off
    assert (lifted.top_k, lifted.temperature, lifted.argmax, lifted.greedy) == (None, 0.5, False, False)
    with pytest.raises(UserError, match="give --argmax or --temperature, not both"):
        sample_options(stored, argmax=True, temperature=0.5)
