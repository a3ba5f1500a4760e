"""Training data: the vocabulary's counts come from the corpus manifest when it has them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas.corpus import CorpusConfig
from schemas.errors import CorpusError
from schemas.results import CorpusResult
from schemas.training import PRESETS
from tests.test_train import code_text, make_corpus
from workers.corpus import build_corpus_file
from workers.data import (
    corpus_char_counts,
    corpus_vocab,
    count_codepoints,
    prepare_corpus,
    read_manifest_head,
)
from workers.storage import LocalStorage

TRAIN = PRESETS["tiny"][1]


def built_corpus(tmp_path: Path) -> tuple[Path, Path]:
    """corpus.txt and its manifest, built by the corpus builder from a small folder."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text(code_text(3000) + "# naïve café ✓\n")
    (src / "b.py").write_text("x = {'λ': [1, 2]}\n" * 40)
    out = tmp_path / "corpus.txt"
    build_corpus_file([str(src)], CorpusConfig(), out, git_base_url="https://git.invalid/")
    return out, out.with_name("corpus.txt.manifest.json")


def stored(storage: LocalStorage, text: bytes, manifest: bytes | None) -> CorpusResult:
    corpus = make_corpus(storage, text.decode())
    if manifest is not None:
        storage.put_bytes(corpus.manifest_key, manifest)
    return corpus


def test_counts_come_from_a_real_manifest_and_match_counting(tmp_path: Path) -> None:
    text_path, manifest_path = built_corpus(tmp_path)
    text, manifest = text_path.read_bytes(), manifest_path.read_bytes()
    with_manifest = LocalStorage(tmp_path / "a")
    corpus = stored(with_manifest, text, manifest)
    counts = corpus_char_counts(with_manifest, corpus)
    assert counts == count_codepoints([text.decode()])
    assert counts["λ"] == 40 and counts["✓"] == 1
    without = LocalStorage(tmp_path / "b")
    assert corpus_vocab(with_manifest, corpus, TRAIN) == corpus_vocab(
        without, stored(without, text, None), TRAIN)


def test_manifest_head_stops_before_the_file_lists(tmp_path: Path) -> None:
    _text, manifest_path = built_corpus(tmp_path)
    storage = LocalStorage(tmp_path / "s")
    storage.put_bytes("m.json", manifest_path.read_bytes())
    whole = json.loads(manifest_path.read_bytes())
    assert whole["files"]  # the lists exist in the file...
    head = read_manifest_head(storage, "m.json")
    assert head == {k: v for k, v in whole.items() if k not in ("files", "skipped")}
    # ...and any other layout is read whole.
    storage.put_bytes("compact.json", json.dumps(whole).encode())
    assert read_manifest_head(storage, "compact.json") == whole


def test_manifest_counts_are_used_only_when_they_add_up_to_the_text(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    text = b"aab"
    # Counts that are not the text's but add up to its 3 bytes: only the manifest can give "b".
    manifest = json.dumps({"vocab": [["b", 2], ["a", 1]], "files": []}).encode()
    corpus = stored(storage, text, manifest)
    assert corpus_char_counts(storage, corpus) == {"b": 2, "a": 1}
    assert corpus_vocab(storage, corpus, TRAIN).chars[1:] == ("b",)  # min count 2
    other = LocalStorage(tmp_path / "other")
    wrong = json.dumps({"vocab": [["b", 5]]}).encode()  # 5 bytes for a 3-byte text: not this text
    assert corpus_char_counts(other, stored(other, text, wrong)) == {"a": 2, "b": 1}
    broken = LocalStorage(tmp_path / "broken")
    assert corpus_char_counts(broken, stored(broken, text, b'{"vocab": 7}')) == {"a": 2, "b": 1}


def test_a_corpus_damaged_in_storage_is_refused_when_encoded(tmp_path: Path) -> None:
    """The text is hashed as it is encoded and checked against the manifest's record."""
    text_path, manifest_path = built_corpus(tmp_path)
    text, manifest = text_path.read_bytes(), manifest_path.read_bytes()
    storage = LocalStorage(tmp_path / "s")
    corpus = stored(storage, text, manifest)
    assert prepare_corpus(storage, corpus, TRAIN).length == len(text.decode())  # intact: encoded
    damaged = text.replace(b"x = ", b"y = ", 1)  # same size, one byte changed
    other = stored(LocalStorage(tmp_path / "d"), damaged, manifest)
    storage = LocalStorage(tmp_path / "d")
    with pytest.raises(CorpusError, match=rf"corpus {other.hash[:12]} is damaged in storage: .* its manifest says "
                                          rf"{json.loads(manifest)['text']['sha256'][:12]}; delete corpora/"):
        prepare_corpus(storage, other, TRAIN)
    assert not any(k.endswith(".bin") for k in storage.list("corpora/"))  # no encoding kept
