"""The corpus builder: one clean, deterministic text from one or more repositories.

Modules, in the order data flows: `sources` (a link-proof sorted walk, and what git says about
paths), `paths` (decisions from a path alone), `reading` (files opened beneath the root, links
refused by the kernel), `content` (decisions from the bytes, run on every core), `layout` (how
files follow each other in the text: headers), `builder` (the ordered, bounded-memory pipeline),
`payload` (a batch's text, in memory or in a worker's part file), `streams` (its reader and
writer threads, and the builder's side of the part files), `pool` (the worker
processes, where they pay), `manifest` (the record of it all), `scratch` (temporary files a
killed build cannot leak) and `stage` (the pipeline stages and the CLI's build/inspect).
`native/` holds the optional C extension (`_native`) behind `reading`, `textscan` and `streams`
(reading, hashing and scanning files; writing the corpus). See docs/corpus.md.

Names are imported lazily: worker processes import `workers.corpus.content` only, and should not
pay for storage, git and pydantic models they never use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "FORMAT_VERSION": "manifest", "format_summary": "manifest",
    "build_corpus_file": "stage", "corpus_hash": "stage", "inspect_corpus": "stage",
    "run_corpus_stage": "stage", "run_fetch_stage": "stage",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"workers.corpus.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'workers.corpus' has no attribute {name!r}")
