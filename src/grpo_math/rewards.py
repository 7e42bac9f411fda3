"""Reward functions for GRPO on GSM8K, their registry and weight presets.

Every reward has TRL's signature `f(completions, answer, **kwargs) -> list[float]`; dataset columns
(`question`, `solution`) arrive as keyword arguments and completions may be strings or chat messages.
Each part is its own function so TRL logs `rewards/<name>/mean`; parametrised ones come from
`make_*` factories that keep `__name__` equal to the registry name.

Anti-farming rules (tests/test_rewards.py checks each against a concrete exploit):

* `correct` uses strict extraction: no answer in the asked format, or several different answers,
  scores 0 (see `answers.py`).
* `format` / `format_soft` check exactly one answer marker holding a plain number, reasoning before
  it and nothing after it; a second marker, a reasoning-free answer or an answer placed before the
  reasoning lose credit.
* `steps` is a fraction, so extra true lines cannot push it above a clean derivation's 1.0. It checks
  arithmetic lines `a op b = c` (+ - * / and parentheses) and GSM8K `<<a op b=c>>` annotations after
  normalising `$`, thousands commas, `%`, `x`, `×`, LaTeX operators and `\\frac`, "times", "equals"
  and unit words ("16 eggs - 3 eggs = 9 eggs"); algebra, clock times and powers are skipped. Lines
  with the same operands, operators and result count once, in any order, so repeating a line never
  raises it. A true line earns credit only when grounded: at least one operand other than 0, 1 or 2
  is a number of the question (digits, number words, n% as n/100) or the result of an earlier
  counted line, and the line is not an identity ("16 + 0 = 16"), so "1+1=2", "2+2=4" and other
  empty filler score nothing. Wrong lines always count against.
* `steps_count` (+0.2 per distinct grounded true step, capped at 1.0) follows the same rules but is a
  count, hence farmable up to its cap; it only appears in the "notebook" preset.
* `numbers_used` counts question numbers used as operands of counted arithmetic lines (see `steps`),
  not mere mentions, so copying the question earns nothing.
* `repetition` and `length` are penalties in [-1, 0]: for the share of repeated word 4-grams beyond
  the 20% that natural solutions reach, and for characters past a soft limit.

Every function is linear in the completion length and bounded per line, so hostile text (100k-char
lines, huge numbers, deep nesting) cannot stall a training step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import Any, NamedTuple

from grpo_math.answers import (
    answers_match,
    check_answer_format,
    extract_strict,
    find_answers,
    gold_from_solution,
    parse_number,
)

RewardFunc = Callable[..., list[float]]

MAX_STEP_CHARS = 20_000  # arithmetic is looked for in the whole lines within this many leading characters
MAX_LHS_CHARS = 120  # the longest left-hand side of an equation that is checked
STEP_CREDIT, STEP_CAP = 0.2, 1.0  # steps_count: per distinct grounded true step, and the cap
REPETITION_NGRAM, REPETITION_FREE = 4, 0.2  # repetition: share of repeated 4-grams tolerated for free
LENGTH_SOFT_CHARS, LENGTH_HARD_CHARS = 2000, 4000  # length: 0 up to soft, -1 from hard, linear between

TRIVIAL = frozenset([0.0, 1.0, 2.0])  # too common to tie a line to the problem, even when the question has them
NUMBER_WORDS = {
    **{w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                  "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split())},
    **{w: 10 * i for i, w in enumerate("thirty forty fifty sixty seventy eighty ninety".split(), start=3)},
    "hundred": 100, "thousand": 1000, "million": 1_000_000, "triple": 3, "thrice": 3, "quarter": 4, "dozen": 12,
}

_NOT_UNITS = r"(?!(?:dozens?|hundreds?|thousands?|millions?|billions?|half|times|st|nd|rd|th)\b)"
_MATH_SUBS = [(re.compile(p), r) for p, r in [  # applied in order to each line before looking for "="
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
    (rf"(?<=\d)(?:/[A-Za-z]+\b| ?{_NOT_UNITS}[A-Za-z]{{2,}}\b(?:/[A-Za-z]+\b)?){{1,3}}"
     r"(?= ?(?:[-+*/=)]|[xX] ?[\d(]))", ""),
    (r"(?<=[\d)]) ?[xX] ?(?=[\d(.])", "*"),
    (r"(?<=\d)(?=\([\d.(])|(?<=\))(?=[\d(])", "*"),  # implicit multiplication: "3(16)", "(2+3)(4)"
    (r"(?<=\d) equals? (?=[-\d.(])", " = "),
]]
_LHS_CHARS = frozenset("0123456789.+-*/() ")
_LHS_JUNK = re.compile(r"^(?:[ +*/)]|-(?= )|\.(?!\d)|\d+\. +(?=[\d(]))+")
_RHS = re.compile(r" *(-?\d+(?:\.\d+)?)", re.ASCII)
# after the result: more arithmetic, a mixed number "1 1/2", "18 000", or glued text "4x", "50%", "8:20"
_RHS_STOP = re.compile(r" *[-+*/] *[\d(]| \d+/\d| \d{3}\b|[\d.]*[\w%:]", re.ASCII)
_TOKEN = re.compile(r"\d+(?:\.\d+)?|\.\d+|[-+*/()]", re.ASCII)
_QUESTION_NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?|\.\d+", re.ASCII)
_PERCENT = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?) ?(?:%|percent)", re.ASCII)
_WORD = re.compile(r"[a-z]+")
_NGRAM_TOKEN = re.compile(r"\w+|[^\w\s]")


class Step(NamedTuple):
    """One distinct arithmetic line: its operands and operators, the written result, and whether it holds."""

    operands: tuple[float, ...]
    operators: tuple[str, ...]
    result: float
    ok: bool


def completion_text(completion: str | list[dict[str, Any]]) -> str:
    """The text of a completion given as a string or as chat messages.

    >>> completion_text([{"role": "assistant", "content": "<answer>4</answer>"}])
    '<answer>4</answer>'
    """
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        content = message.get("content") or ""
        parts.extend([content] if isinstance(content, str) else [p.get("text", "") for p in content])
    return "".join(parts)


def _gold(answer: str) -> str:
    return gold_from_solution(answer) if "####" in answer else answer.strip()


def _key(x: float) -> float:
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
            key = (tuple(sorted(map(_key, operands))), tuple(sorted(operators)), _key(result))
            if key not in seen:
                seen.add(key)
                steps.append(Step(tuple(operands), tuple(operators), result, _verifies(value, result_text)))
    return steps


def question_numbers(question: str) -> set[float]:
    """Numbers written with digits in `question` (rounded keys).

    >>> sorted(question_numbers("Janet's ducks lay 16 eggs and sells them for $2, or $1,000.50 in total."))
    [2.0, 16.0, 1000.5]
    """
    return {_key(float(m.replace(",", ""))) for m in _QUESTION_NUMBER.findall(question)}


@lru_cache(maxsize=1024)
def _analyse(text: str, question: str | None) -> tuple[int, int, float]:
    """(counted lines, true counted lines, share of question numbers used) for one completion.

    Without a question every line is taken as grounded.
    """
    q_digits = question_numbers(question) if question is not None else set()
    known = set(q_digits)
    if question is not None:
        known |= {_key(NUMBER_WORDS[w]) for w in _WORD.findall(question.lower()) if w in NUMBER_WORDS}
        known |= {_key(float(n) / 100) for n in _PERCENT.findall(question)}
    counted = true = 0
    used: set[float] = set()
    for step in find_steps(text):
        ops = {_key(abs(x)) for x in step.operands}
        result = _key(abs(step.result))
        identity = result in ops and ops - {0.0, 1.0} <= {result}  # "16 + 0 = 16", "16 * 1 = 16"
        grounded = (question is None or bool(ops & known - TRIVIAL)) and not identity
        if step.ok and not grounded:
            continue  # true but empty or unrelated ("1+1=2"): neither credit nor penalty
        counted += 1
        true += step.ok
        used |= ops & q_digits
        known.add(result)
    return counted, true, len(used) / len(q_digits) if q_digits else 0.0


def _per_completion(fn: Callable[[str, str, str | None], float], name: str, doc: str | None = None) -> RewardFunc:
    """A batched TRL reward from `fn(text, gold, question) -> float`, named `name` for logging."""

    def reward(completions: Sequence[Any], answer: Sequence[str], question: Sequence[str] | None = None,
               **kwargs: Any) -> list[float]:
        questions = question if question is not None else [None] * len(completions)
        return [fn(completion_text(c), _gold(a), q) for c, a, q in zip(completions, answer, questions, strict=True)]

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = doc or fn.__doc__
    return reward


def make_correct(answer_format: str = "tags", wrong: float = 0.0, name: str = "correct") -> RewardFunc:
    """+1 when the strictly extracted answer equals the gold number, else `wrong`.

    >>> make_correct()([[{"content": "<answer>42</answer>"}], "42"], answer=["42", "42"])
    [1.0, 0.0]
    >>> make_correct("hash", wrong=-1.0, name="correct_pm1")(["#### 41"], answer=["42"])
    [-1.0]
    """
    check_answer_format(answer_format)
    return _per_completion(lambda t, g, q: 1.0 if answers_match(extract_strict(t, answer_format), g) else wrong, name,
                           make_correct.__doc__)


def _structure(text: str, answer_format: str) -> tuple[bool, bool, bool, bool]:
    """(one marker, its content a number, reasoning before it, nothing after it)."""
    found = find_answers(text, answer_format)
    one = len(found) == 1
    start, end, content = found[0] if found else (0, 0, "")
    number = one and parse_number(content) is not None
    tail = text[end:].strip()
    if answer_format == "tags":
        one = one and text.count("<answer>") == 1 and text.count("</answer>") == 1
        opens, closes = text.find("<think>"), text.find("</think>")
        think = text.count("<think>") == text.count("</think>") == 1 and -1 < opens < closes < start
        reasoning = think and text[:opens].strip() == "" and text[opens + 7 : closes].strip() != ""
        return one, number, reasoning, reasoning and text[closes + 8 : start].strip() == "" and tail == ""
    reasoning = text[:start].strip() != ""
    if answer_format == "hash":
        return one, number, reasoning, tail == "" and text[:start].rstrip(" \t").endswith("\n")
    return one, number, reasoning, len(tail) <= 3  # "boxed": at most "$." after it


def make_format(answer_format: str = "tags") -> RewardFunc:
    """1 when the completion has exactly the asked structure, else 0 (strict).

    >>> make_format()(["<think>2+2=4</think>\\n<answer>4</answer>", "<answer>4</answer>"], answer=["4", "4"])
    [1.0, 0.0]
    """
    check_answer_format(answer_format)
    return _per_completion(lambda t, g, q: float(all(_structure(t, answer_format))), "format", make_format.__doc__)


def make_format_soft(answer_format: str = "tags") -> RewardFunc:
    """Partial format credit in [0, 1]: a quarter for each of the four checks of `format`.

    >>> make_format_soft()(["<answer>4</answer>", "<think>x</think><answer>4</answer><answer>4</answer>"],
    ...                    answer=["4", "4"])
    [0.5, 0.25]
    """
    check_answer_format(answer_format)
    return _per_completion(lambda t, g, q: sum(_structure(t, answer_format)) / 4, "format_soft",
                           make_format_soft.__doc__)


def _steps(text: str, gold: str, question: str | None) -> float:
    """Share in [0, 1] of the checkable arithmetic lines that hold (0 without any; see the module rules).

    >>> q = "Natalia sold clips to 48 friends in April and half as many in May."
    >>> steps(["48/2 = 24, so 48 + 24 = 72", "48/2 = 25, so 48 + 25 = 73", "1 + 1 = 2"], answer=["72"] * 3,
    ...       question=[q] * 3)
    [1.0, 0.5, 0.0]
    """
    counted, true, _ = _analyse(text, question)
    return true / counted if counted else 0.0


def _steps_count(text: str, gold: str, question: str | None) -> float:
    """+0.2 per distinct grounded true arithmetic line, capped at 1.0 (the notebook's shaping).

    >>> steps_count(["48/2 = 24\\n48 / 2 = 24\\n48 + 24 = 72"], answer=["72"], question=["48 clips, half in May"])
    [0.4]
    """
    return min(STEP_CAP, round(STEP_CREDIT * _analyse(text, question)[1], 6))


def _numbers_used(text: str, gold: str, question: str | None) -> float:
    """Share of the question's numbers used as operands of counted arithmetic lines.

    >>> numbers_used(["48 / 2 = 24", "She sold 48 clips."], answer=["24"] * 2,
    ...              question=["48 clips in April, 30 in May"] * 2)
    [0.5, 0.0]
    """
    return _analyse(text, question)[2]


def _repetition(text: str, gold: str, question: str | None) -> float:
    """Penalty in [-1, 0] for the share of repeated word 4-grams beyond `REPETITION_FREE`.

    >>> texts = ["Half of 48 is 24; 48 + 24 = 72.", "Half of 48 is 24. " * 20]
    >>> [round(x, 2) for x in repetition(texts, answer=["72"] * 2)]
    [0.0, -0.94]
    """
    tokens = _NGRAM_TOKEN.findall(text.lower())
    ngrams = list(zip(*(tokens[i:] for i in range(REPETITION_NGRAM))))
    repeated = 1 - len(set(ngrams)) / len(ngrams) if ngrams else 0.0
    return min(0.0, (REPETITION_FREE - repeated) / (1 - REPETITION_FREE))


def make_length(answer_format: str = "tags", soft: int = LENGTH_SOFT_CHARS,
                hard: int = LENGTH_HARD_CHARS) -> RewardFunc:
    """Penalty in [-1, 0]: 0 up to `soft` characters, -1 from `hard`, linear in between.

    >>> make_length(soft=10, hard=20)(["x" * 5, "x" * 15, "x" * 99], answer=["1"] * 3)
    [0.0, -0.5, -1.0]
    """
    return _per_completion(lambda t, g, q: min(0.0, max(-1.0, (soft - len(t)) / (hard - soft))), "length",
                           make_length.__doc__)


def _fixed(fn: Callable[[str, str, str | None], float], name: str) -> Callable[..., RewardFunc]:
    reward = _per_completion(fn, name)
    return lambda answer_format="tags": reward


REWARDS: dict[str, Callable[..., RewardFunc]] = {
    "correct": make_correct,
    "correct_pm1": lambda answer_format="tags": make_correct(answer_format, wrong=-1.0, name="correct_pm1"),
    "format": make_format,
    "format_soft": make_format_soft,
    "steps": _fixed(_steps, "steps"),
    "steps_count": _fixed(_steps_count, "steps_count"),
    "numbers_used": _fixed(_numbers_used, "numbers_used"),
    "repetition": _fixed(_repetition, "repetition"),
    "length": make_length,
}

# Default ("tags") instances. "format" is only reachable through REWARDS so as not to shadow the builtin.
correct = make_correct()
correct_pm1 = REWARDS["correct_pm1"]()
format_soft = make_format_soft()
steps = REWARDS["steps"]()
steps_count = REWARDS["steps_count"]()
numbers_used = REWARDS["numbers_used"]()
repetition = REWARDS["repetition"]()
length = make_length()

PRESETS: dict[str, dict[str, float]] = {
    # Correctness (1.0) outweighs everything else together (0.5), so a well-formatted wrong answer never
    # beats a correct one; soft format and steps give signal before the first correct answers appear.
    "default": {"correct": 1.0, "format_soft": 0.25, "steps": 0.25, "repetition": 0.5, "length": 0.25},
    # The notebook's shaping: +0.4 for the answer, +0.2 per verified step (capped at 1.0).
    "notebook": {"correct": 0.4, "steps_count": 1.0},
}


def get_reward_funcs(names: Sequence[str], answer_format: str = "tags") -> list[RewardFunc]:
    """Reward functions by registry name; an unknown name raises an error listing the valid ones.

    >>> [f.__name__ for f in get_reward_funcs(["correct", "steps"], "boxed")]
    ['correct', 'steps']
    """
    check_answer_format(answer_format)
    for name in names:
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; valid: {', '.join(REWARDS)}")
    return [REWARDS[name](answer_format=answer_format) for name in names]


def score_rows(rows: Sequence[dict[str, Any]], reward_funcs: Sequence[str],
               reward_weights: Sequence[float] | None = None, answer_format: str = "tags") -> list[dict[str, Any]]:
    """Score completions outside training: `{"total": weighted sum, "parts": {name: value}}` per row.

    Rows hold `question`, `answer` (a plain number or a raw GSM8K solution ending in `#### N`) and
    `completion` (a string).

    >>> row = {"question": "Half of 48?", "answer": "#### 24",
    ...        "completion": "<think>48/2=24</think>\\n<answer>24</answer>"}
    >>> score_rows([row], ["correct", "format", "steps"], [1.0, 0.5, 0.5])
    [{'total': 2.0, 'parts': {'correct': 1.0, 'format': 1.0, 'steps': 1.0}}]
    """
    weights = [1.0] * len(reward_funcs) if reward_weights is None else list(reward_weights)
    if len(weights) != len(reward_funcs):
        raise ValueError(f"{len(reward_funcs)} reward_funcs but {len(weights)} reward_weights")
    funcs = get_reward_funcs(reward_funcs, answer_format)
    columns = {
        "completions": [row["completion"] for row in rows],
        "answer": [_gold(row["answer"]) for row in rows],
        "question": [row.get("question") for row in rows],
        "solution": [row.get("solution") for row in rows],
    }
    values = [f(**columns) for f in funcs]
    return [{"total": sum(w * v[i] for w, v in zip(weights, values)),
             "parts": {name: v[i] for name, v in zip(reward_funcs, values)}} for i in range(len(rows))]
