"""Code-likeness metrics on hand-made inputs whose right answers are known."""

from __future__ import annotations

import pytest

from workers.codemetrics import (
    SYNTAXES,
    IndentStyle,
    TextCounts,
    batch_metrics,
    indent_style,
    layout,
    lex_errors,
    lexer_for,
    measure,
    metrics,
    scan,
)

PY = SYNTAXES["python"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("f(a[1], {2: (3)})", 1.0),
        ("f(a[1]", 2 / 3),  # the outer ( never closes
        ("( ] )", 2 / 3),  # a stray closer scores nothing and leaves the stack alone
        ("([)]", 2 / 4),  # ) cannot close [; ] then closes [
        ("}}}{", 0.0),
        ("no brackets at all", None),
    ],
)
def test_bracket_balance(text, expected):
    assert metrics(text)["bracket_balance"] == (pytest.approx(expected) if expected else expected)


def test_brackets_inside_strings_and_comments_do_not_count():
    assert scan('x = "(" + \')\'  # a ) in a comment\n', PY)[:2] == (0, 0)
    assert metrics("int a = f(1); /* ( [ */ // {\n", "c")["bracket_balance"] == 1.0
    assert metrics("local t = {1} --[[ ( ]] -- (\n", "lua")["bracket_balance"] == 1.0


@pytest.mark.parametrize(
    ("text", "strings", "closed"),
    [
        ('s = "a \\" b"', 1, 1),  # escaped quote inside
        ("s = 'it\\'s'", 1, 1),
        ('s = "a\\\\" + "b"', 2, 2),  # an escaped backslash does not escape the quote
        ('s = "never closed\nt = 1', 1, 0),  # a one-line string ends at the newline
        ('s = "ok" + "open', 2, 1),
        ('doc = """spans\nlines "quoted" inside"""', 1, 1),
        ("x = 1  # don't count this apostrophe", 0, 0),
    ],
)
def test_quote_balance_with_escapes(text, strings, closed):
    assert scan(text, PY)[2:] == (strings, closed)


def test_quote_balance_ratio_and_language_without_comment_table():
    assert metrics('a = "x" "y" "z', None)["quote_balance"] == pytest.approx(2 / 3)
    assert metrics("plain words", None)["quote_balance"] is None


def test_lexer_error_rate_clean_code_vs_text_the_lexer_cannot_read():
    clean = "def f(x):\n    return [x, {'a': 1}]\n"
    assert metrics(clean, "python")["lexer_error_rate"] == 0.0
    tokens, errors = lex_errors("x = 1 $ ? `", "python")
    assert errors == 3 and tokens == 6  # x, =, 1 read; $ ? ` are Error tokens
    assert metrics("x = 1 $ ? `", "python")["lexer_error_rate"] == pytest.approx(3 / 6)
    assert metrics("int main(void) { return 0; } @ `", "c")["lexer_error_rate"] > 0


def test_lexer_lookup_by_identify_tag():
    assert lexer_for("python").name == "Python"
    assert lexer_for("c++").name == "C++"
    assert lexer_for("shell").name == "Bash"
    assert lexer_for("no-such-language") is None and lexer_for(None) is None
    assert metrics("x = 1", "no-such-language")["lexer_error_rate"] is None


def test_mean_line_length_ignores_blank_lines():
    assert metrics("abcd\n\n  \nab\n")["mean_line_length"] == pytest.approx(3.0)
    assert metrics("")["mean_line_length"] is None


def test_indentation_consistency():
    four = "def f():\n    if x:\n        y()\n    return 1\n"
    assert metrics(four)["indent_consistency"] == 1.0
    # Unit 4 (the common step); a 3-space line and a tab-indented line are off.
    mixed = "def f():\n    a\n    b\n   c\n\td\n"
    assert layout(mixed) == (5, sum(map(len, mixed.split("\n"))), 4, 2)
    tabs = "int f() {\n\tif (x) {\n\t\ty();\n\t}\n}\n"
    assert metrics(tabs)["indent_consistency"] == 1.0
    assert metrics("flat\ntext\n")["indent_consistency"] is None


def test_indent_style_and_checking_a_sample_against_the_corpus_style():
    assert indent_style("def f():\n    return 1\n") == IndentStyle(" ", 4)
    assert indent_style("int f() {\n\treturn 0;\n}\n") == IndentStyle("\t", 1)
    assert indent_style("a\n  b\nc\n    d\n") == IndentStyle(" ", 2)  # a tie goes to the smaller
    assert indent_style("flat\n") is None
    sample = "if x:\n  y\n  z\n"
    assert metrics(sample)["indent_consistency"] == 1.0  # by its own 2-space style
    four = IndentStyle(" ", 4)
    assert measure(sample, style=four).ratios()["indent_consistency"] == 0.0  # not the corpus's


def test_counts_add_up_to_a_batch_micro_average():
    texts = ["f(x)", "f(x"]
    total = measure(texts[0]) + measure(texts[1])
    assert total.bracket_chars == 3 and total.bracket_closed == 2
    assert batch_metrics(texts)["bracket_balance"] == pytest.approx(2 / 3)
    assert sum((measure(t) for t in texts), TextCounts()) == total
