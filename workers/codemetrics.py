"""Code-likeness metrics: how much a text looks like source code, cheaply, per text and per batch.

Every metric is a ratio of counts. `measure(text, language)` returns the counts of one text
(`TextCounts`); counts add up (`sum(counts, TextCounts())`), so a batch's figure is the ratio of
its summed counts (a micro-average: a long sample weighs more than a short one), and the same
code measures a corpus excerpt. Definitions, with examples, are in docs/sampling.md.

The bracket/quote scanner is language-agnostic, with a small table of comment syntaxes so that an
apostrophe in `# don't` does not count as an unclosed string. It visits only the characters that
matter (one regex), so it costs a few milliseconds per 100 KB; Pygments lexing is the dear part.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, fields
from functools import lru_cache
from itertools import pairwise
from typing import Any

from pygments.lexer import Lexer
from pygments.lexers import get_lexer_by_name
from pygments.token import Error
from pygments.util import ClassNotFound

METRICS = (
    "bracket_balance",
    "quote_balance",
    "lexer_error_rate",
    "mean_line_length",
    "indent_consistency",
)
_PAIRS = {")": "(", "]": "[", "}": "{"}
_OPENERS = frozenset("([{")


@dataclass(frozen=True)
class Syntax:
    """What the scanner needs to know about a language: comments and string delimiters."""

    line_comments: tuple[str, ...] = ()
    block_comments: tuple[tuple[str, str], ...] = ()
    triple_quotes: bool = False  # Python's """ and ''' strings, which may span lines
    quotes: str = "\"'"


_C = Syntax(line_comments=("//",), block_comments=(("/*", "*/"),))
_HASH = Syntax(line_comments=("#",))
SYNTAXES: dict[str, Syntax] = {
    "python": Syntax(line_comments=("#",), triple_quotes=True),
    "c": _C, "c++": _C, "java": _C, "javascript": _C, "typescript": _C, "go": _C, "rust": _C,
    "c#": _C, "kotlin": _C, "scala": _C, "swift": _C, "objective-c": _C, "php": _C,
    "lua": Syntax(line_comments=("--",), block_comments=(("--[[", "]]"),)),
    "shell": _HASH, "bash": _HASH, "ruby": _HASH, "perl": _HASH, "r": _HASH, "yaml": _HASH,
    "makefile": _HASH, "cmake": _HASH,
}
# identify tags whose Pygments alias differs.
_LEXER_ALIASES = {"shell": "bash", "c++": "cpp", "c#": "csharp", "objective-c": "objc"}


@dataclass(frozen=True)
class TextCounts:
    """Additive counts behind the metrics; `ratios()` turns them into the published figures."""

    chars: int = 0
    bracket_chars: int = 0  # ( ) [ ] { } outside strings and comments
    bracket_closed: int = 0  # of those, the ones in a properly nested, matching pair
    strings: int = 0  # string literals opened
    strings_closed: int = 0  # of those, closed by the same delimiter
    tokens: int = 0  # non-whitespace Pygments tokens (0 when no lexer)
    error_tokens: int = 0
    lines: int = 0  # non-blank lines
    line_chars: int = 0  # their total length
    indented: int = 0  # non-blank lines with leading whitespace
    indent_consistent: int = 0  # of those, in the text's own indent style and unit

    def __add__(self, other: TextCounts) -> TextCounts:
        return TextCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def ratios(self) -> dict[str, float | None]:
        """The metrics; None where the text has nothing to measure (no brackets, no lexer...)."""
        return {
            "bracket_balance": _ratio(self.bracket_closed, self.bracket_chars),
            "quote_balance": _ratio(self.strings_closed, self.strings),
            "lexer_error_rate": _ratio(self.error_tokens, self.tokens),
            "mean_line_length": _ratio(self.line_chars, self.lines),
            "indent_consistency": _ratio(self.indent_consistent, self.indented),
        }


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def measure(
    text: str, language: str | None = None, style: IndentStyle | None = None
) -> TextCounts:
    """All counts for one text; `language` is an identify tag ("python", "c", "lua", ...),
    `style` the indentation to check against (default: the text's own)."""
    syntax = SYNTAXES.get(language or "", Syntax())
    brackets, closed, strings, strings_closed = scan(text, syntax)
    tokens, errors = lex_errors(text, language)
    lines, line_chars, indented, consistent = layout(text, style)
    return TextCounts(
        len(text), brackets, closed, strings, strings_closed, tokens, errors,
        lines, line_chars, indented, consistent,
    )


def metrics(text: str, language: str | None = None) -> dict[str, float | None]:
    return measure(text, language).ratios()


def batch_metrics(
    texts: list[str], language: str | None = None, style: IndentStyle | None = None
) -> dict[str, float | None]:
    return sum((measure(t, language, style) for t in texts), TextCounts()).ratios()


@lru_cache(maxsize=64)
def _scanner(syntax: Syntax) -> re.Pattern[str]:
    # Longest alternatives first: a block opener like `--[[` before the line comment `--`.
    starts = [o for o, _ in syntax.block_comments] + list(syntax.line_comments)
    parts = sorted(starts, key=len, reverse=True)
    if syntax.triple_quotes:
        parts += ['"""', "'''"]
    parts = [re.escape(p) for p in parts]
    parts += [r"\\.", "[" + re.escape(syntax.quotes + "()[]{}") + "]", r"\n"]
    return re.compile("|".join(parts), re.DOTALL)


def scan(text: str, syntax: Syntax = Syntax()) -> tuple[int, int, int, int]:
    """(bracket chars, brackets closed, strings opened, strings closed), skipping comments.

    A closer that does not match the innermost open bracket is counted unmatched and leaves the
    stack alone, so `( ] )` scores 2 of 3. A `"`/`'` string must close on its own line, with the
    same unescaped quote; a triple-quoted one may span lines.
    """
    block_ends = dict(syntax.block_comments)
    stack: list[str] = []
    brackets = closed = strings = strings_closed = 0
    pos = 0
    pattern = _scanner(syntax)
    while (m := pattern.search(text, pos)) is not None:
        tok, pos = m.group(), m.end()
        if tok in block_ends:
            end = text.find(block_ends[tok], pos)
            pos = len(text) if end < 0 else end + len(block_ends[tok])
        elif tok in syntax.line_comments:
            end = text.find("\n", pos)
            pos = len(text) if end < 0 else end
        elif tok in _OPENERS:
            brackets += 1
            stack.append(tok)
        elif tok in _PAIRS:
            brackets += 1
            if stack and stack[-1] == _PAIRS[tok]:
                stack.pop()
                closed += 2
        elif tok[0] in syntax.quotes:
            strings += 1
            pos, ok = _string_end(text, pos, tok)
            strings_closed += ok
    return brackets, closed, strings, strings_closed


def _string_end(text: str, pos: int, delim: str) -> tuple[int, bool]:
    """Where the string opened by `delim` just before `pos` ends, and whether it closed."""
    i = pos
    multiline = len(delim) == 3
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "\n" and not multiline:
            return i, False
        if text.startswith(delim, i):
            return i + len(delim), True
        i += 1
    return len(text), False


@lru_cache(maxsize=32)
def lexer_for(language: str | None) -> Lexer | None:
    """The Pygments lexer for an identify tag, or None when Pygments has none (or no tag)."""
    if not language:
        return None
    try:
        return get_lexer_by_name(
            _LEXER_ALIASES.get(language, language), stripnl=False, ensurenl=False
        )
    except ClassNotFound:
        return None


def lex_errors(text: str, language: str | None) -> tuple[int, int]:
    """(non-whitespace tokens, Error tokens) when lexed as `language`; (0, 0) without a lexer."""
    lexer = lexer_for(language)
    if lexer is None:
        return 0, 0
    tokens = errors = 0
    # The unprocessed stream: our lexers strip nothing, and this is the metrics' hot loop.
    for _, kind, value in lexer.get_tokens_unprocessed(text):
        if kind is Error:
            errors += 1
            tokens += 1
        elif not value.isspace():
            tokens += 1
    return tokens, errors


_INDENT = re.compile(r"^[ \t]*")


@dataclass(frozen=True)
class IndentStyle:
    char: str  # "\t" or " "
    unit: int  # indentation step in `char`s (1 for tabs)


def _lines_and_indents(text: str) -> tuple[list[str], list[str]]:
    lines = [ln for ln in text.split("\n") if ln.strip()]
    return lines, [_INDENT.match(ln).group() for ln in lines]  # type: ignore[union-attr]


def indent_style(text: str) -> IndentStyle | None:
    """A text's indentation style: its majority indent character (tab or space) and, for spaces,
    its unit, the most common positive step between successive indentation widths (the smaller
    step on a tie): 4 in PEP 8 code. None when no line is indented."""
    _, indents = _lines_and_indents(text)
    indented = [ind for ind in indents if ind]
    if not indented:
        return None
    tabs = sum(1 for ind in indented if ind[0] == "\t")
    if tabs * 2 > len(indented):
        return IndentStyle("\t", 1)
    widths = [len(ind) for ind in indents if ind.count(" ") == len(ind)]
    steps = Counter(b - a for a, b in pairwise(widths) if b > a)
    if steps:
        return IndentStyle(" ", max(steps.items(), key=lambda kv: (kv[1], -kv[0]))[0])
    return IndentStyle(" ", min((w for w in widths if w), default=1))


def layout(text: str, style: IndentStyle | None = None) -> tuple[int, int, int, int]:
    """(non-blank lines, their chars, indented lines, indented lines consistent with the style).

    A line is consistent when its indentation uses only the style's character and, for spaces, is
    a multiple of its unit. `style` defaults to the text's own; the sample stage passes the
    corpus's, so a sample scores how well it indents the way the corpus does.
    """
    lines, indents = _lines_and_indents(text)
    indented = [ind for ind in indents if ind]
    style = style or indent_style(text)
    if not indented or style is None:
        return len(lines), sum(map(len, lines)), 0, 0
    consistent = sum(
        1 for ind in indented if ind.count(style.char) == len(ind) and len(ind) % style.unit == 0
    )
    return len(lines), sum(map(len, lines)), len(indented), consistent


def round_metrics(values: dict[str, Any], digits: int = 4) -> dict[str, Any]:
    """Metrics as stored and shown: floats rounded, None kept (JSON null)."""
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in values.items()}
