"""The settings the tests run charforge under (environment variables, read by `load_settings`)."""

from __future__ import annotations

from pathlib import Path

import pytest


def use_embedded(patch: pytest.MonkeyPatch, home: Path, git_base_url: str) -> None:
    """The embedded default (SQLite, local storage, local Ray) under `home`, `owner/name` resolved
    on the tests' git daemon, training on one CPU (the suite's machines have two)."""
    patch.setenv("CHARFORGE_HOME", str(home))
    patch.setenv("CHARFORGE_GIT_BASE_URL", git_base_url)
    patch.setenv("CHARFORGE_TRAIN_CPUS", "1")
