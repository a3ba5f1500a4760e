"""The corpus builder: one clean, deterministic text from one or more repositories.

Modules, in the order data flows: `sources` (a link-proof sorted walk, and what git says about
paths), `paths` (decisions from a path alone), `content` (decisions from the bytes, run on every
core), `builder` (the ordered, bounded-memory pipeline), `manifest` (the record of it all) and
`stage` (the pipeline stages and the CLI's build/inspect). See docs/corpus.md.
"""

from workers.corpus.manifest import FORMAT_VERSION, format_summary, summary_of
from workers.corpus.stage import (
    build_corpus_file,
    corpus_hash,
    inspect_corpus,
    load_manifest,
    run_corpus_stage,
    run_fetch_stage,
)

__all__ = [
    "FORMAT_VERSION", "build_corpus_file", "corpus_hash", "format_summary", "inspect_corpus",
    "load_manifest", "run_corpus_stage", "run_fetch_stage", "summary_of",
]
