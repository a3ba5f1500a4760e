"""How files follow each other in the corpus text: a one-line header naming each file as a
comment in its own language (docs/corpus.md, "Layout").

A header must stay one comment line whatever the file is called: a name may hold a newline
(`"a\\nimport os; os.system(1)\\n#.py"` is a valid file name) and would otherwise put lines of
its choosing into the corpus as if they were code. Characters that end or reorder a line are
written as escapes (`\\n`, `\\x1b`, `\\u2028`), and a block comment's closing token inside a name
is broken (`--\\>`, `*\\/`). The manifest keeps the exact name.
"""

from __future__ import annotations

import re
from functools import cache

# Line-comment markers for the per-file header, by identify tag; "#" for everything else.
_SLASHES = frozenset({
    "c", "c++", "c#", "java", "javascript", "jsx", "ts", "tsx", "go", "rust", "kotlin", "scala",
    "swift", "php", "dart", "groovy", "objective-c", "proto", "zig", "cuda", "verilog", "glsl",
    "jsonnet", "solidity", "d", "v",
})
_DASHES = frozenset({"lua", "sql", "haskell", "elm", "ada", "plpgsql", "vhdl"})
_SEMICOLON = frozenset({"asm", "lisp", "clojure", "scheme", "racket", "ini"})
_PERCENT = frozenset({"tex", "latex", "erlang", "matlab", "prolog", "bib"})
_BLOCK = {"html": ("<!--", " -->"), "xml": ("<!--", " -->"), "markdown": ("<!--", " -->"),
          "svg": ("<!--", " -->"), "css": ("/*", " */"), "scss": ("/*", " */"), "less": ("/*", " */")}
_CLOSERS = {" -->": ("-->", "--\\>"), " */": ("*/", "*\\/")}

# C0 and C1 controls and DEL (newline, carriage return, vertical tab, form feed, NEL, escape
# sequences), the Unicode line and paragraph separators, and the bidirectional controls.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


@cache  # a few hundred languages at most
def comment_marks(language: str | None) -> tuple[str, str]:
    if language in _BLOCK:
        return _BLOCK[language]
    for marks, family in (("//", _SLASHES), ("--", _DASHES), (";", _SEMICOLON), ("%", _PERCENT)):
        if language in family:
            return marks, ""
    return "#", ""


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def header_line(display: str, language: str | None) -> bytes:
    """A comment naming the file, so the model learns how files begin: always one line."""
    start, end = comment_marks(language)
    # isprintable() is False for every character _UNSAFE matches: the common case skips the regex.
    shown = display if display.isprintable() else _UNSAFE.sub(_escape, display)
    if end:
        token, broken = _CLOSERS[end]
        shown = shown.replace(token, broken)
    return f"{start} {shown}{end}\n".encode()
