"""The code is held to the linter and the type checker configured in pyproject.toml ([tool.ruff],
[tool.mypy]), at the versions constraints.txt pins (scripts/install installs them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [
    ["ruff", "check", "--no-cache", "--output-format", "concise", "."],
    ["mypy", "--cache-dir", "{tmp}"],  # the files of [tool.mypy]: orchestrator, workers, schemas
], ids=["ruff", "mypy"])
def test_finds_nothing(argv, tmp_path):
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
