"""The manifest stored beside corpus.txt: what went in, what did not and why, and the vocabulary.

Per-file records stream to temporary JSON-lines files while the corpus is written, then the
manifest is assembled from them, so its size never has to fit in memory while building.
Layout (docs/corpus.md has an example): format_version, hash, repos, config, totals, text,
vocab, files, skipped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from json.encoder import encode_basestring  # the C string escaper behind json.dumps
from pathlib import Path
from typing import IO, Any, Self

from schemas.units import human_size

# Part of every corpus key: bumped whenever the builder's output for the same commits and config
# changes, so no stored corpus built the old way is reused. 2: header names escaped, and
# linguist-vendored=false honoured inside vendored directories. 3: tool cache directories
# (__pycache__/, ...) skipped whole as generated.
FORMAT_VERSION = 3


def kept_line(repo: int, outcome: Any) -> str:
    """One "files" record (an `Outcome` that was kept), exactly as json.dumps would write it.

    Formatted by hand: this runs once per file, the build's hottest bookkeeping. Strings go
    through json's own escaper.
    """
    lang = "null" if outcome.language is None else encode_basestring(outcome.language)
    return (f'{{"repo":{repo},"path":{encode_basestring(outcome.rel)},"bytes":{outcome.size},'
            f'"sha256":"{outcome.sha256.hex()}","language":{lang}}}\n')


def skipped_line(repo: int, outcome: Any) -> str:
    """One "skipped" record (an `Outcome` with a reason)."""
    extra = f',"detail":{encode_basestring(outcome.detail)}' if outcome.detail else ""
    return (f'{{"repo":{repo},"path":{encode_basestring(outcome.rel)},"reason":"{outcome.reason}",'
            f'"bytes":{outcome.size}{extra}}}\n')


_encode = json.JSONEncoder(ensure_ascii=False).encode  # one encoder: json.dumps makes one per call


def _pair_json(item: Sequence[Any]) -> str:
    """`item` as json.dumps(item, ensure_ascii=False) writes it; a (character, count) pair of the
    vocabulary by hand (ten times faster)."""
    if len(item) == 2 and type(item[0]) is str and type(item[1]) is int:
        return f"[{encode_basestring(item[0])}, {item[1]}]"
    return _encode(item)


class ManifestWriter:
    """Collects kept/skipped records on disk; `write` emits the manifest JSON.

    A context manager: whoever opens it with `with` owns it, and it is closed when that ends.
    """

    def __init__(self, scratch: Path) -> None:
        scratch.mkdir(parents=True, exist_ok=True)
        # Open for the whole build, until the `with` block that owns the writer ends.
        self._kept = open(scratch / "kept.jsonl", "w+", encoding="utf-8")  # noqa: SIM115
        self._skipped = open(scratch / "skipped.jsonl", "w+", encoding="utf-8")  # noqa: SIM115

    def add(self, kept_lines: str, skipped_lines: str) -> None:
        """Records from `kept_line`/`skipped_line`, in walk order."""
        self._kept.write(kept_lines)
        self._skipped.write(skipped_lines)

    def write(self, out: IO[bytes], head: dict[str, Any]) -> None:
        """`head` (everything but the file lists) followed by "files" and "skipped".

        Lists of pairs in `head` ("vocab": thousands of them) are written one pair per line, not
        by json.dumps with `indent` (its Python encoder, item by item).
        """
        pairs = {k: v for k, v in head.items() if isinstance(v, list) and v and isinstance(v[0], (list, tuple))}
        body = json.dumps({k: v for k, v in head.items() if k not in pairs}, ensure_ascii=False, indent=1)
        out.write(body[:-2].encode("utf-8"))  # drop the closing "\n}" to append the lists
        for name, items in pairs.items():
            lines = ",\n  ".join(map(_pair_json, items))
            out.write(f',\n "{name}": [\n  {lines}\n ]'.encode())
        for name, fh in (("files", self._kept), ("skipped", self._skipped)):
            out.write(f',\n "{name}": [\n'.encode())
            fh.flush()
            fh.seek(0)
            separator = b""
            # A megabyte of records at a time; each is one line (JSON escapes every newline).
            while records := fh.readlines(1 << 20):
                out.write(separator + "".join(records)[:-1].replace("\n", ",\n").encode("utf-8"))
                separator = b",\n"
            out.write(b"\n ]")
        out.write(b"\n}\n")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._kept.close()
        self._skipped.close()


def _char(c: str) -> str:
    return json.dumps(c, ensure_ascii=False)  # quoted, so " " and "\n" are visible


def format_summary(summary: dict[str, Any], *, top: int = 20) -> str:
    """A human-readable summary: repos, files kept/skipped by reason, languages, top characters."""
    t = summary["totals"]
    lines = ["repos:"]
    for repo in summary["repos"]:
        commit = repo["commit"][:12] if repo["commit"] else "plain folder"
        ref = f" ({repo['ref']})" if repo.get("ref") else ""
        lines.append(f"  {repo['spec']}  {commit}{ref}  {repo['files']} files, {human_size(repo['bytes'])}")
    lines.append(f"kept: {t['files']} files, {human_size(t['bytes'])} of corpus text "
                 f"({t['chars']} characters, vocabulary {t['vocab_size']})")
    lines.append(f"skipped: {t['skipped']}")
    for reason, n in sorted(t["skipped_by_reason"].items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {reason:<14} {n}")
    lines.append("bytes by language:")
    total = max(1, sum(t["bytes_by_language"].values()))
    for lang, n in list(t["bytes_by_language"].items()):
        files = t["files_by_language"][lang]
        lines.append(f"  {lang:<14} {human_size(n):>10}  {100 * n / total:5.1f}%  {files} files")
    chars = max(1, t["chars"])
    shown = "  ".join(f"{_char(c)} {100 * n / chars:.1f}%" for c, n in summary["vocab"][:top])
    lines.append(f"top characters: {shown}")
    return "\n".join(lines)

