"""Checkpoints: self-describing, loaded without trusting pickle, found by latest/best/step."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from schemas.errors import ArtifactNotFound, InvalidSpec, TrainingError
from schemas.training import PRESETS
from workers import keys
from workers.checkpoint import (
    Checkpoint,
    available_steps,
    find_checkpoint,
    load_checkpoint,
    record_checkpoint,
    save_checkpoint,
)
from workers.model import CharRNN
from workers.storage import LocalStorage
from workers.vocab import Vocab

RUN = "0123abcd"


def _checkpoint(step: int = 7) -> Checkpoint:
    model_config, train_config = PRESETS["tiny"]
    vocab = Vocab.from_text("héllo wörld 🎉")
    torch.manual_seed(0)
    model = CharRNN(len(vocab), model_config)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(2, 3, dtype=torch.long))[0].sum().backward()
    optimizer.step()
    return Checkpoint(
        model_config=model_config, train_config=train_config, vocab=vocab,
        state_dict=model.state_dict(), step=step, val_loss=1.5, best_val_loss=1.25,
        optimizer_state=optimizer.state_dict(), rng_state={"torch": torch.get_rng_state()},
        data_state={"epoch": 1, "hidden": [torch.ones(1, 2, 32)]}, info={"run_id": RUN},
    )


def test_round_trip_keeps_everything(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    ckpt = _checkpoint()
    info = save_checkpoint(storage, keys.checkpoint(RUN, 7), ckpt)
    assert info.size == storage.size(info.key) and len(info.sha256) == 64
    back = load_checkpoint(storage, info.key)
    assert (back.model_config, back.train_config, back.vocab) == (ckpt.model_config, ckpt.train_config, ckpt.vocab)
    assert (back.step, back.val_loss, back.best_val_loss, back.info) == (7, 1.5, 1.25, {"run_id": RUN})
    assert back.data_state["epoch"] == 1 and torch.equal(back.data_state["hidden"][0], torch.ones(1, 2, 32))
    model = back.build_model()
    assert not model.training
    for name, tensor in ckpt.state_dict.items():
        assert torch.equal(model.state_dict()[name], tensor)
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.load_state_dict(back.optimizer_state)  # usable as is


def test_a_checkpoint_damaged_in_storage_is_refused(tmp_path: Path) -> None:
    """A flipped byte inside a tensor loads without complaint from torch (its zip CRCs are not
    checked): the sha256 latest.json recorded at writing is."""
    storage = LocalStorage(tmp_path)
    key = keys.checkpoint(RUN, 7)
    info = save_checkpoint(storage, key, _checkpoint())
    record_checkpoint(storage, RUN, 7, key, 1.5, keep_last=2, sha256=info.sha256)
    assert load_checkpoint(storage, key).step == 7
    path = storage.root / key
    data = bytearray(path.read_bytes())
    weights = data.find(b"data/0") + 4096  # well inside the first tensor's bytes
    data[weights] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(TrainingError, match=rf"checkpoint '{key}' refused: its sha256 is \w{{12}}, not the "
                                            rf"{info.sha256[:12]} recorded when it was written"):
        load_checkpoint(storage, key)
    record_checkpoint(storage, RUN, 7, key, 1.5, keep_last=2)  # as before checkpoints carried it: unchecked
    assert load_checkpoint(storage, key).step == 7


def test_map_location_places_tensors(tmp_path: Path) -> None:
    """What makes a GPU checkpoint load on a CPU-only machine: every tensor goes to map_location."""
    storage = LocalStorage(tmp_path)
    key = keys.checkpoint(RUN, 7)
    save_checkpoint(storage, key, _checkpoint())
    on_meta = load_checkpoint(storage, key, map_location="meta")
    assert all(t.device.type == "meta" for t in on_meta.state_dict.values())
    assert on_meta.data_state["hidden"][0].device.type == "meta"
    on_cpu = load_checkpoint(storage, key, map_location=torch.device("cpu"))
    assert all(t.device.type == "cpu" for t in on_cpu.state_dict.values())


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_refused(tmp_path: Path, legacy: bool) -> None:
    storage = LocalStorage(tmp_path / "store")
    marker = tmp_path / "pwned"
    key = keys.checkpoint(RUN, 1)
    payload = {"format": "charforge-checkpoint", "version": 1, "model": _Exploit(marker)}
    with storage.writer(key) as out:
        if legacy:
            pickle.dump(payload, out, protocol=2)
        else:
            torch.save(payload, out)
    with pytest.raises(TrainingError, match="refused: it holds pickled Python objects"):
        load_checkpoint(storage, key)
    assert not marker.exists()


def test_other_files_are_refused(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put_bytes("a.pt", b"not a torch file")
    with pytest.raises(TrainingError, match="refused"):
        load_checkpoint(storage, "a.pt")
    with storage.writer("b.pt") as out:
        torch.save({"weights": torch.zeros(2)}, out)
    with pytest.raises(TrainingError, match="not a charforge checkpoint"):
        load_checkpoint(storage, "b.pt")
    with pytest.raises(ArtifactNotFound):
        load_checkpoint(storage, "missing.pt")


@pytest.mark.parametrize(("change", "difference"), [
    # ~34 GB of LSTM if it were built: refused from the shapes alone, before any allocation.
    ({"num_layers": 16, "rnn_size": 8192}, "embed.weight is [11, 32], the config needs [11, 8192]"),
    ({"model": "gru"}, "core.weight_ih_l0 is [128, 32], the config needs [96, 32]"),
    ({"model": "rnn", "num_layers": 1}, "core.weight_ih_l0 is [128, 32], the config needs [32, 32]"),
    ({"embedding_size": 8}, "embed.weight is [11, 32], the config needs [11, 8]"),
])
def test_config_that_disagrees_with_its_weights_is_refused(
    tmp_path: Path, change: dict, difference: str
) -> None:
    storage = LocalStorage(tmp_path)
    ckpt = _checkpoint()
    ckpt.model_config = ckpt.model_config.model_copy(update=change)
    key = keys.checkpoint(RUN, 7)
    save_checkpoint(storage, key, ckpt)
    with pytest.raises(TrainingError, match="does not match the weights it holds") as err:
        load_checkpoint(storage, key)
    assert str(err.value).endswith(f"(9,163 parameters; {difference})")


def test_weights_missing_or_extra_are_refused(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    ckpt = _checkpoint()
    ckpt.state_dict = {k: v for k, v in ckpt.state_dict.items() if k != "head.bias"}
    save_checkpoint(storage, keys.checkpoint(RUN, 7), ckpt)
    with pytest.raises(TrainingError, match=r"head\.bias is missing\)$"):
        load_checkpoint(storage, keys.checkpoint(RUN, 7))
    ckpt = _checkpoint()
    ckpt.state_dict = {**ckpt.state_dict, "core.weight_ih_l1": torch.zeros(128, 32)}
    save_checkpoint(storage, keys.checkpoint(RUN, 7), ckpt)
    with pytest.raises(TrainingError, match=r"core\.weight_ih_l1 is not part of that network\)$"):
        load_checkpoint(storage, keys.checkpoint(RUN, 7))


def test_vocabulary_that_disagrees_with_the_weights_is_refused(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    ckpt = _checkpoint()
    ckpt.vocab = Vocab.from_text("abc")
    save_checkpoint(storage, keys.checkpoint(RUN, 7), ckpt)
    with pytest.raises(TrainingError, match=r"vocabulary 4, .*embed\.weight is \[11, 32\], the config needs \[4, 32\]"):
        load_checkpoint(storage, keys.checkpoint(RUN, 7))


def test_old_checkpoints_with_the_scaler_under_scheduler_still_load(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    key = keys.checkpoint(RUN, 7)
    save_checkpoint(storage, key, _checkpoint())
    with storage.local_path(key) as path:
        payload = torch.load(path, weights_only=True)
    scaler = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5,
              "growth_interval": 2000, "_growth_tracker": 3}
    payload["scheduler"] = {"scaler": scaler}  # how version 1 files were first written
    del payload["scaler"]
    with storage.writer(key) as out:
        torch.save(payload, out)
    assert load_checkpoint(storage, key).scaler_state == scaler


@pytest.mark.parametrize("bad", ["abcdef\n", "ABCDEF", "abc", "../abcdef", "abcdef/x", "a" * 65])
def test_keys_take_only_hex_ids(bad: str) -> None:
    for build in (keys.run_prefix, lambda v: keys.corpus_encoded("a" * 64, v),
                  keys.corpus_text):
        with pytest.raises(ValueError, match="invalid"):
            build(bad)
    assert keys.corpus_encoded("a" * 64, "0123456789abcdef") == (
        f"corpora/{'a' * 64}/encoded-0123456789abcdef.bin",
        f"corpora/{'a' * 64}/encoded-0123456789abcdef.json",
    )


def test_keeps_last_k_and_the_best(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    losses = {10: 2.0, 20: 1.0, 30: 1.5, 40: 1.7, 50: 1.6}
    for step, loss in losses.items():
        key = keys.checkpoint(RUN, step)
        storage.put_bytes(key, b"x")
        pointer, deleted = record_checkpoint(storage, RUN, step, key, loss, keep_last=2)
    assert available_steps(storage, RUN) == [20, 40, 50]
    assert pointer["best"]["step"] == 20 and pointer["latest"]["step"] == 50
    assert deleted == [keys.checkpoint(RUN, 30)]
    assert find_checkpoint(storage, RUN) == keys.checkpoint(RUN, 50)
    assert find_checkpoint(storage, RUN, "best") == keys.checkpoint(RUN, 20)
    assert find_checkpoint(storage, RUN, "40") == keys.checkpoint(RUN, 40)


def test_find_checkpoint_explains_what_is_missing(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    with pytest.raises(ArtifactNotFound, match="has no checkpoint yet"):
        find_checkpoint(storage, RUN)
    key = keys.checkpoint(RUN, 30)
    storage.put_bytes(key, b"x")
    assert find_checkpoint(storage, RUN) == key  # a step file whose pointer was never written
    record_checkpoint(storage, RUN, 30, key, None, keep_last=3)
    assert find_checkpoint(storage, RUN, "best") == key  # no val loss yet: best falls back to latest
    with pytest.raises(ArtifactNotFound, match="no checkpoint at step 99; available steps: 30"):
        find_checkpoint(storage, RUN, "99")
    with pytest.raises(InvalidSpec, match="'latest', 'best' or a step number"):
        find_checkpoint(storage, RUN, "newest")
