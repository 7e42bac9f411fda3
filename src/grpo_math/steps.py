"""Arithmetic lines in free text: find every `a op b = c` and check whether it holds.

`find_steps` reads arithmetic lines `a op b = c` (+ - * / and parentheses) and GSM8K `<<a op b=c>>`
annotations after normalising `$`, thousands commas, `%`, `x`, `×`, LaTeX operators and `\\frac`, "times",
"equals" and unit words ("16 eggs - 3 eggs = 9 eggs"); algebra, clock times and powers are skipped. Lines with
the same operands, operators and result are returned once, in any order. The `steps` rewards (`rewards.py`)
decide which lines earn credit; the report colours lines with the same checker.

Linear in the text length and bounded per line: only the whole lines within `MAX_STEP_CHARS` leading
characters are read, and a left-hand side longer than `MAX_LHS_CHARS` is not checked.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import NamedTuple

MAX_STEP_CHARS = 20_000  # arithmetic is looked for in the whole lines within this many leading characters
MAX_LHS_CHARS = 120  # the longest left-hand side of an equation that is checked

_NOT_UNITS = r"(?!(?:dozens?|hundreds?|thousands?|millions?|billions?|half|times|st|nd|rd|th)\b)"
_MATH_SUBS = [
    (re.compile(p), r)
    for p, r in [  # applied in order to each line before looking for "="
        (r"\\[dt]?frac\{([^{}]{1,40})\}\{([^{}]{1,40})\}", r"(\1)/(\2)"),
        (r"\\times|\\cdot|[×·∗⋅]", "*"),
        (r"\\div|÷", "/"),
        (r"[\u2212\u2013]", "-"),
        (r"\\[()\[\]]|\\left|\\right", " "),
        (r"\\?\$", ""),
        (r"(?<=\d),(?=\d{3}(?!\d))", ""),
        (r"(?<![\d.])(\d+(?:\.\d+)?) ?(?:%(?!\d)|percent\b)", r"(\1/100)"),
        (r"(?<=\d) plus (?=\d)", " + "),
        (r"(?<=\d) minus (?=\d)", " - "),
        (r"(?<=\d) (?:times|multiplied by) (?=\d)", " * "),
        (r"(?<=\d) divided by (?=\d)", " / "),
        # units between a number and an operator: "16 eggs - 3 eggs", "$20/hour * 35 hours/week", "(440 feet/minute)"
        (
            rf"(?<=\d)(?:/[A-Za-z]+\b| ?{_NOT_UNITS}[A-Za-z]{{2,}}\b(?:/[A-Za-z]+\b)?){{1,3}}"
            r"(?= ?(?:[-+*/=)]|[xX] ?[\d(]))",
            "",
        ),
        (r"(?<=[\d)]) ?[xX] ?(?=[\d(.])", "*"),
        (r"(?<=\d)(?=\([\d.(])|(?<=\))(?=[\d(])", "*"),  # implicit multiplication: "3(16)", "(2+3)(4)"
        (r"(?<=\d) equals? (?=[-\d.(])", " = "),
    ]
]
_LHS_CHARS = frozenset("0123456789.+-*/() ")
_LHS_JUNK = re.compile(r"^(?:[ +*/)]|-(?= )|\.(?!\d)|\d+\. +(?=[\d(]))+")
_RHS = re.compile(r" *(-?\d+(?:\.\d+)?)", re.ASCII)
# after the result: more arithmetic, a mixed number "1 1/2", "18 000", or glued text "4x", "50%", "8:20"
_RHS_STOP = re.compile(r" *[-+*/] *[\d(]| \d+/\d| \d{3}\b|[\d.]*[\w%:]", re.ASCII)
_TOKEN = re.compile(r"\d+(?:\.\d+)?|\.\d+|[-+*/()]", re.ASCII)


class Step(NamedTuple):
    """One distinct arithmetic line: its operands and operators, the written result, and whether it holds."""

    operands: tuple[float, ...]
    operators: tuple[str, ...]
    result: float
    ok: bool


def number_key(x: float) -> float:
    """A number rounded to 6 decimals, as numbers are compared (0.1 + 0.2 and 0.3 are the same key)."""
    return round(x, 6)


def _evaluate(tokens: list[str]) -> tuple[float, list[float], list[str]] | None:
    """Value, operands and operators of `+ - * /` arithmetic with parentheses; None if malformed."""
    pos, operands, operators = 0, [], []

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def factor() -> float:
        nonlocal pos
        tok = peek()
        pos += 1
        if tok == "-":
            return -factor()
        if tok == "(":
            value = expr()
            if peek() != ")":
                raise ValueError("unbalanced")
            pos += 1
            return value
        if tok is None or tok in "+*/)":
            raise ValueError("operand expected")
        operands.append(float(tok))
        return operands[-1]

    def chain(sub: Callable[[], float], ops: str) -> float:
        nonlocal pos
        value = sub()
        while (op := peek()) is not None and op in ops:
            pos += 1
            operators.append(op)
            rhs = sub()
            value = {"+": value + rhs, "-": value - rhs, "*": value * rhs}[op] if op != "/" else value / rhs
        return value

    def term() -> float:
        return chain(factor, "*/")

    def expr() -> float:
        return chain(term, "+-")

    try:
        value = expr()
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    if pos != len(tokens) or not operators or not math.isfinite(value):
        return None
    return value, operands, operators


def _verifies(value: float, result_text: str) -> bool:
    """`value` equals the written result, or rounds to it at the decimals shown (e.g. 10/3 = 3.33)."""
    result = float(result_text)
    if math.isclose(value, result, rel_tol=1e-9, abs_tol=1e-9):
        return True
    decimals = len(result_text.partition(".")[2])
    return decimals > 0 and abs(value - result) <= 0.5 * 10**-decimals + 1e-9


def _equations(line: str) -> Iterator[tuple[list[str], str]]:
    """(left-hand tokens, written result) of every `arithmetic = number` in one normalised line."""
    for eq in re.finditer("=", line):
        i = j = eq.start()
        while j > 0 and i - j <= MAX_LHS_CHARS and line[j - 1] in _LHS_CHARS:
            j -= 1
        rhs = _RHS.match(line, i + 1)
        lhs = line[j:i].strip()
        # the expression continues a word or a time: algebra ("3x + 4"), units left in ("eggs * 2"), "7:50 + 30"
        glued = j > 0 and (line[j - 1].isalnum() or line[j - 1] == ":") and (line[j] != " " or lhs[:1] in "+-*/)")
        if rhs is None or _RHS_STOP.match(line, rhs.end()) or i - j > MAX_LHS_CHARS or glued or not lhs:
            continue
        lhs = _LHS_JUNK.sub("", lhs)
        while lhs.count("(") > lhs.count(")") and lhs.startswith("("):
            lhs = lhs[1:]
        tokens = _TOKEN.findall(lhs)
        lone_percentage = len(tokens) == 5 and tokens[-2:] == ["100", ")"]  # "80% = $500" states a proportion
        if "".join(tokens) == lhs.replace(" ", "") and not lone_percentage:
            yield tokens, rhs.group(1)


def find_steps(text: str) -> list[Step]:
    """Distinct arithmetic equations in `text`, in order of first appearance, checked.

    >>> [(s.operands, s.ok) for s in find_steps("48/2 = 24, then 24 x 3 = 72 and 2*24=50, 3*24=72")]
    [((48.0, 2.0), True), ((24.0, 3.0), True), ((2.0, 24.0), False)]
    """
    steps, seen = [], set()
    if len(text) > MAX_STEP_CHARS:  # whole lines only: a cut line could verify ("10 + 5 = 150" -> "10 + 5 = 15")
        text = text[: text.rfind("\n", 0, MAX_STEP_CHARS + 1) + 1]
    for line in text.splitlines():
        if "=" not in line and "equal" not in line:
            continue
        for pattern, repl in _MATH_SUBS:
            line = pattern.sub(repl, line)
        for tokens, result_text in _equations(line):
            evaluated = _evaluate(tokens)
            if evaluated is None:
                continue
            value, operands, operators = evaluated
            result = float(result_text)
            key = (tuple(sorted(map(number_key, operands))), tuple(sorted(operators)), number_key(result))
            if key not in seen:
                seen.add(key)
                steps.append(Step(tuple(operands), tuple(operators), result, _verifies(value, result_text)))
    return steps
