"""The `charforge jobs` commands a user runs after a submit: sample, eval, report, compare, logs,
resume, fine-tuning. One real tiny run (real git, Ray, training) serves the whole module."""

from __future__ import annotations

import json
import math

import pytest

from orchestrator.settings import load_settings
from orchestrator.store import RunStore
from tests.gitserver import source_files
from tests.settings import use_embedded
from tests.test_pipeline import invoke, submit_json

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


@pytest.fixture(scope="module")
def home(tmp_path_factory, git_server):
    patch = pytest.MonkeyPatch()
    use_embedded(patch, tmp_path_factory.mktemp("home"), git_server.base_url)
    yield patch
    patch.undo()


@pytest.fixture(scope="module")
def trained(home, git_server, local_ray):
    git_server.publish("acme/cli", source_files())
    result, runs = submit_json("--repo", "acme/cli", "--preset", "tiny", "--name", "cli-run",
                               "--set", "sample.length=48", "--set", "sample.top_k=3",
                               "--set", "corpus.file_header=false")
    assert result.exit_code == 0, result.output
    return runs[0]


def test_sample_is_reproducible_and_recorded(trained):
    args = ["jobs", "sample", trained["id"], "-n", "3", "--length", "40", "--seed", "7", "--prime", "def ",
            "--json"]
    first = json.loads(invoke(*args).stdout)
    second = json.loads(invoke(*args).stdout)
    texts = [s["text"] for s in first["samples"]]
    assert texts == [s["text"] for s in second["samples"]]
    assert len(texts) == 3 and all(t.startswith("def ") and len(t) == 44 for t in texts)
    assert first["key"] != second["key"]  # two batches, both stored
    status = json.loads(invoke("jobs", "status", trained["id"], "--json").stdout)
    keys = [s["key"] for s in status["samples"]]
    assert first["key"] in keys and second["key"] in keys


def test_sample_takes_the_runs_settings_where_no_option_is_given(trained):
    taken = json.loads(invoke("jobs", "sample", trained["id"], "-n", "2", "--json").stdout)["samples"]
    assert [len(s["text"]) for s in taken] == [48, 48]  # sample.length=48 at submit
    assert taken[0]["options"]["top_k"] == 3 and taken[0]["options"]["num_samples"] == 2
    given = invoke("jobs", "sample", trained["id"], "-n", "1", "--length", "10", "--top-k", "5", "--argmax",
                   "--json")
    [record] = json.loads(given.stdout)["samples"]
    assert len(record["text"]) == 10 and record["options"]["top_k"] == 5 and record["options"]["argmax"]
    every = json.loads(invoke("jobs", "sample", trained["id"], "-n", "1", "--top-k", "0", "--json").stdout)
    assert every["samples"][0]["options"]["top_k"] is None  # the run's top_k=3 lifted
    both = invoke("jobs", "sample", trained["id"], "--argmax", "--temperature", "0.5")
    assert both.exit_code == 1 and "give --argmax or --temperature, not both" in both.stderr


def test_sample_refuses_a_prime_and_a_prime_file_together(trained, tmp_path):
    prime = tmp_path / "prime.txt"
    prime.write_text("def ")
    result = invoke("jobs", "sample", trained["id"], "--prime", "x", "--prime-file", str(prime))
    assert result.exit_code == 1 and "--prime or --prime-file, not both" in result.stderr


def test_sample_refuses_a_prime_the_model_never_saw(trained):
    result = invoke("jobs", "sample", trained["id"], "--prime", "λ→", "--length", "5")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and "λ" in result.stderr and "→" in result.stderr


def test_sample_prints_text_by_default(trained):
    result = invoke("jobs", "sample", trained["id"], "-n", "1", "--length", "30", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert "sample 1/1" in result.stdout


def test_eval_on_a_file_and_on_a_repo(trained, tmp_path, git_server):
    text = "\n".join(source_files().values() if isinstance(next(iter(source_files().values())), str)
                     else (v.decode() for v in source_files().values()))
    path = tmp_path / "code.py"
    path.write_text(text)
    result = invoke("jobs", "eval", trained["id"], "--file", str(path), "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["run"] == trained["id"] and scores["chars"] == len(text) - 1
    assert scores["bits_per_char"] == pytest.approx(scores["nats_per_char"] / math.log(2))
    assert 0 < scores["nats_per_char"] < math.log(200)
    repo = invoke("jobs", "eval", trained["id"], "--repo", "acme/cli", "--json")
    assert repo.exit_code == 0, repo.output
    # Built with the run's corpus settings (no headers here), the repo's text is the run's corpus.
    status = json.loads(invoke("jobs", "status", trained["id"], "--json").stdout)
    corpus = load_settings().storage().get_bytes(status["corpus"]["key"]).decode()
    assert json.loads(repo.stdout)["chars"] == len(corpus) - 1
    neither = invoke("jobs", "eval", trained["id"])
    assert neither.exit_code == 1 and "exactly one of --file" in neither.stderr


def test_eval_streams_side_by_side(trained, tmp_path):
    """--streams N reads the text as N streams (each from a zero state): the same characters
    scored, a slightly different figure; 1 (the default) is the one-stream reading."""
    path = tmp_path / "long.py"
    path.write_text("".join(f"def f{i}(x):\n    return (x + {i}) * [x]\n" for i in range(800)))
    one = json.loads(invoke("jobs", "eval", trained["id"], "--file", str(path), "--json").stdout)
    four = json.loads(invoke("jobs", "eval", trained["id"], "--file", str(path), "--streams", "4", "--json").stdout)
    assert (one["streams"], four["streams"], four["chars"]) == (1, 4, one["chars"])
    assert four["nats_per_char"] != one["nats_per_char"]
    assert four["nats_per_char"] == pytest.approx(one["nats_per_char"], rel=0.05)
    refused = invoke("jobs", "eval", trained["id"], "--file", str(path), "--streams", "0")
    assert refused.exit_code == 2 and "--streams" in refused.stderr


def test_report_and_compare(trained, tmp_path):
    result = invoke("jobs", "report", trained["id"], "--out", str(tmp_path / "report"))
    assert result.exit_code == 0, result.output
    html = (tmp_path / "report" / "index.html").read_text()
    assert trained["id"] in html and "cli-run" in html
    assert (tmp_path / "report" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(invoke("jobs", "compare", "--all", "--json").stdout)
    assert [r["run"] for r in rows] == [trained["id"]]


def test_logs_tell_the_story_of_the_run(trained):
    result = invoke("jobs", "logs", trained["id"])
    assert result.exit_code == 0
    for stage in ("[fetch]", "[corpus]", "[train]", "[sample]"):
        assert stage in result.stdout
    assert result.stdout.splitlines()[-1].endswith(" run succeeded")


def test_fine_tuning_starts_from_another_runs_weights(trained, git_server):
    result, runs = submit_json("--repo", "acme/cli", "--preset", "tiny", "--init-from", trained["id"],
                               "--set", "max_iters=20", "--set", "corpus.file_header=false")  # as trained's
    assert result.exit_code == 0, result.output
    spec = runs[0]["spec"]
    assert spec["init_from"] == trained["id"] and spec["init_from_checkpoint"].startswith(f"runs/{trained['id']}/")
    # It starts from trained weights, so its first loss is already far below a fresh model's.
    metrics = RunStore(load_settings().database_url).metrics(runs[0]["id"])
    first = next(m.train_loss for m in metrics if m.train_loss is not None)
    assert first < math.log(runs[0]["corpus"]["vocab_size"]) - 0.5


def test_fine_tuning_keeps_the_source_network_in_its_spec(trained):
    """The spec says the network that trains (the source's), whatever the preset; a network set
    by hand that differs is refused."""
    result, runs = submit_json("--repo", "acme/cli", "--preset", "small", "--init-from", trained["id"][:8],
                               "--set", "dropout=0.1", "--detach")
    assert result.exit_code == 0, result.output
    model = runs[0]["spec"]["model"]
    assert (model["rnn_size"], model["num_layers"], model["dropout"]) == (32, 1, 0.1)  # tiny's 1x32, our dropout
    assert invoke("jobs", "cancel", runs[0]["id"]).exit_code == 0
    refused = invoke("jobs", "submit", "--repo", "acme/cli", "--init-from", trained["id"], "--set", "rnn_size=64",
                     "--set", "num_layers=1", "--detach")
    assert (refused.exit_code, refused.stderr) == (
        1, f"error: --init-from {trained['id']} keeps that run's network (1x32 lstm): drop --set rnn_size=64\n")


def test_fine_tuning_refuses_a_different_vocabulary(trained, git_server):
    git_server.publish("acme/other-chars", {"greek.txt": "αβγδε ζηθικ λμνξο πρστυ φχψω\n" * 200})
    result, runs = submit_json("--repo", "acme/other-chars", "--preset", "tiny", "--init-from", trained["id"])
    assert result.exit_code == 1
    assert runs[0]["status"] == "failed" and "vocabular" in runs[0]["error"]


def test_resume_continues_a_cancelled_run(home, git_server):
    git_server.publish("acme/resumable", source_files())
    queued = json.loads(invoke("jobs", "submit", "--repo", "acme/resumable", "--preset", "tiny",
                               "--detach", "--json").stdout)[0]
    assert invoke("jobs", "cancel", queued["id"]).exit_code == 0
    result = invoke("jobs", "resume", queued["id"], "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["status"] == "succeeded"
    again = invoke("jobs", "resume", queued["id"])
    assert again.exit_code == 1 and "only failed or cancelled runs can be resumed" in again.stderr


def test_bad_settings_are_refused_at_submit(home):
    for bad, expected in [("rnn_size=lots", "rnn_size"), ("model=transformer", "lstm"),
                          ("warp_speed=9", "valid keys")]:
        result = invoke("jobs", "submit", "--repo", "acme/cli", "--set", bad, "--detach")
        assert result.exit_code == 1 and expected in result.stderr, (bad, result.stderr)
    unknown = invoke("jobs", "submit", "--repo", "acme/cli", "--preset", "huge", "--detach")
    assert unknown.exit_code == 1 and "tiny, small, medium, large" in unknown.stderr


def test_a_selection_of_runs_is_one_way_or_the_other(trained, tmp_path):
    for args, message in [
        (["compare"], "name runs to compare, or use --all"),
        (["export", "--out", str(tmp_path)], "name runs to export, or use --all, --status or --name"),
        (["export", trained["id"], "--all", "--out", str(tmp_path)],
         "name runs to export, or use --all, --status or --name, not both"),
    ]:
        result = invoke("jobs", *args)
        assert (result.exit_code, result.stderr) == (1, f"error: {message}\n"), args
    twice = invoke("jobs", "compare", trained["id"], trained["id"][:6], "--json")
    assert [row["run"] for row in json.loads(twice.stdout)] == [trained["id"]]


def test_bad_sampling_options_are_one_line(trained):
    for value in ("-1", "inf", "nan"):  # inf sampled the same character over and over
        result = invoke("jobs", "sample", trained["id"], "--temperature", value)
        assert result.exit_code == 1, value
        assert result.stderr.startswith("error: invalid option: temperature: ")
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    submitted = invoke("jobs", "submit", "--repo", "acme/cli", "--set", "sample.temperature=inf", "--detach")
    assert submitted.exit_code == 1 and "finite number" in submitted.stderr
