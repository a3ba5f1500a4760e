"""How sizes read in messages and tables, one way everywhere (binary units: KiB, MiB, GiB)."""

from __future__ import annotations

import re

from schemas.errors import InvalidSpec

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def human_size(n: float | None) -> str:
    if n is None:
        return "n/a"
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def plural(n: int | None, word: str) -> str:
    """`3 files`, `1 file` (`word` is the plural; `None` counts as 0)."""
    n = n or 0
    if n != 1:
        return f"{n} {word}"
    return f"1 {word[:-2] if word.endswith('ches') else word[:-1]}"


def parse_size(text: str) -> int:
    """`1048576`, `512K`, `1M`, `1.5GiB` -> bytes (binary multiples)."""
    match = _SIZE.match(text)
    if not match:
        raise InvalidSpec(f"cannot read size {text!r}: use bytes or a K/M/G suffix, e.g. 1M")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))
