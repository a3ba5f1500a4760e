"""What every command needs, built lazily: settings, the run store, storage.

Kept import-light: `charforge jobs status`/`list` answer from the database alone and never import
torch or ray.
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console

from orchestrator.settings import Settings, load_settings
from orchestrator.store import RunStore

# Piped output (scripts, CI logs) gets a wide fixed width, so tables are not cut to 80 columns.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 160)


def settings(**overrides: Any) -> Settings:
    return load_settings(**overrides)


def store(cfg: Settings) -> RunStore:
    """The run store: SQLite (the embedded default) is migrated automatically; any other database
    must have been brought up to date with `charforge db upgrade`."""
    embedded = cfg.database_url.startswith("sqlite")
    run_store = RunStore(cfg.database_url, migrate=embedded)
    if not embedded:
        run_store.require_schema()
    return run_store


def is_tty() -> bool:
    return sys.stderr.isatty()
