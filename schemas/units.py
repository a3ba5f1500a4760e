"""How sizes read in messages and tables, one way everywhere (binary units: KiB, MiB, GiB)."""

from __future__ import annotations


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
    return f"{n} {word}" if n != 1 else f"{n} {word.removesuffix('es') if word.endswith('ches') else word[:-1]}"
