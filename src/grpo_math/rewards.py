"""Reward functions for GRPO on GSM8K, their registry and weight presets.

Every reward is a `Reward`: a picklable callable with TRL's signature `f(completions, answer, **kwargs) ->
list[float]` (dataset columns such as `question` and `solution` arrive as keyword arguments; completions may be
strings or chat messages) that applies a module-level function, or a `functools.partial` of one, to each
completion. Its `__name__` is the registry name, so TRL logs `rewards/<name>/mean`, and its `range` is the
(low, high) every value lies in (`RANGES` collects them). Parametrised rewards come from `make_*` factories.

Anti-farming rules (tests/test_rewards.py checks each against a concrete exploit):

* `correct` uses strict extraction: no answer in the asked format, or several different answers,
  scores 0 (see `answers.py`).
* `format` / `format_soft` check exactly one answer marker holding a plain number, reasoning before
  it and nothing after it; a second marker, a reasoning-free answer or an answer placed before the
  reasoning lose credit.
* `steps` is a fraction, so extra true lines cannot push it above a clean derivation's 1.0. It checks
  arithmetic lines `a op b = c` and GSM8K `<<a op b=c>>` annotations as `steps.find_steps` reads them
  (`steps.py` lists the notations and units it understands and what it skips). Lines with the same
  operands, operators and result count once, in any order, so repeating a line never raises it. A true
  line earns credit only when grounded: at least one operand other than 0, 1 or 2 is a number of the
  question (digits, number words, n% as n/100) or the result of an earlier counted line, and the line
  is not an identity ("16 + 0 = 16"), so "1+1=2", "2+2=4" and other empty filler score nothing. Wrong
  lines always count against.
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

import re
from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from typing import Any

from grpo_math.answers import (
    answers_match,
    check_answer_format,
    extract_strict,
    find_answers,
    gold_from_solution,
    parse_number,
)
from grpo_math.steps import MAX_STEP_CHARS, Step, find_steps, number_key  # noqa: F401 (re-exported)

STEP_CREDIT, STEP_CAP = 0.2, 1.0  # steps_count: per distinct grounded true step, and the cap
REPETITION_NGRAM, REPETITION_FREE = 4, 0.2  # repetition: share of repeated 4-grams tolerated for free
LENGTH_SOFT_CHARS, LENGTH_HARD_CHARS = 2000, 4000  # length: 0 up to soft, -1 from hard, linear between

TRIVIAL = frozenset([0.0, 1.0, 2.0])  # too common to tie a line to the problem, even when the question has them
NUMBER_WORDS = {
    **{
        w: i
        for i, w in enumerate(
            "zero one two three four five six seven eight nine ten eleven twelve thirteen "
            "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
        )
    },
    **{w: 10 * i for i, w in enumerate("thirty forty fifty sixty seventy eighty ninety".split(), start=3)},
    "hundred": 100,
    "thousand": 1000,
    "million": 1_000_000,
    "triple": 3,
    "thrice": 3,
    "quarter": 4,
    "dozen": 12,
}

_QUESTION_NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?|\.\d+", re.ASCII)
_PERCENT = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?) ?(?:%|percent)", re.ASCII)
_WORD = re.compile(r"[a-z]+")
_NGRAM_TOKEN = re.compile(r"\w+|[^\w\s]")


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


def question_numbers(question: str) -> set[float]:
    """Numbers written with digits in `question` (rounded keys).

    >>> sorted(question_numbers("Janet's ducks lay 16 eggs and sells them for $2, or $1,000.50 in total."))
    [2.0, 16.0, 1000.5]
    """
    return {number_key(float(m.replace(",", ""))) for m in _QUESTION_NUMBER.findall(question)}


@lru_cache(maxsize=1024)
def _analyse(text: str, question: str | None) -> tuple[int, int, float]:
    """(counted lines, true counted lines, share of question numbers used) for one completion.

    Without a question every line is taken as grounded.
    """
    q_digits = question_numbers(question) if question is not None else set()
    known = set(q_digits)
    if question is not None:
        known |= {number_key(NUMBER_WORDS[w]) for w in _WORD.findall(question.lower()) if w in NUMBER_WORDS}
        known |= {number_key(float(n) / 100) for n in _PERCENT.findall(question)}
    counted = true = 0
    used: set[float] = set()
    for step in find_steps(text):
        ops = {number_key(abs(x)) for x in step.operands}
        result = number_key(abs(step.result))
        identity = result in ops and ops - {0.0, 1.0} <= {result}  # "16 + 0 = 16", "16 * 1 = 16"
        grounded = (question is None or bool(ops & known - TRIVIAL)) and not identity
        if step.ok and not grounded:
            continue  # true but empty or unrelated ("1+1=2"): neither credit nor penalty
        counted += 1
        true += step.ok
        used |= ops & q_digits
        known.add(result)
    return counted, true, len(used) / len(q_digits) if q_digits else 0.0


class Reward:
    """A batched TRL reward: `fn(text, gold, question) -> float` applied to every completion.

    `fn` is a module-level function or a `functools.partial` of one, so a Reward pickles (TRL may send its
    rewards to other processes). `__name__` is the registry name and `range` the (low, high) of every value.
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[str, str, str | None], float],
        range: tuple[float, float],
        answer_format: str = "tags",
        doc: str | None = None,
    ) -> None:
        self.__name__ = self.__qualname__ = name
        self.fn, self.range, self.answer_format = fn, range, answer_format
        self.__doc__ = doc or fn.__doc__

    def __call__(
        self, completions: Sequence[Any], answer: Sequence[str], question: Sequence[str] | None = None, **kwargs: Any
    ) -> list[float]:
        questions = question if question is not None else [None] * len(completions)
        rows = zip(completions, answer, questions, strict=True)
        return [self.fn(completion_text(c), _gold(a), q) for c, a, q in rows]

    def __repr__(self) -> str:
        return f"Reward({self.__name__!r}, answer_format={self.answer_format!r})"


def _correct(text: str, gold: str, question: str | None, answer_format: str = "tags", wrong: float = 0.0) -> float:
    return 1.0 if answers_match(extract_strict(text, answer_format), gold) else wrong


def make_correct(answer_format: str = "tags", wrong: float = 0.0, name: str = "correct") -> Reward:
    """+1 when the strictly extracted answer equals the gold number, else `wrong`.

    >>> make_correct()([[{"content": "<answer>42</answer>"}], "42"], answer=["42", "42"])
    [1.0, 0.0]
    >>> make_correct("hash", wrong=-1.0, name="correct_pm1")(["#### 41"], answer=["42"])
    [-1.0]
    """
    check_answer_format(answer_format)
    fn = partial(_correct, answer_format=answer_format, wrong=wrong)
    return Reward(name, fn, (min(wrong, 1.0), max(wrong, 1.0)), answer_format, make_correct.__doc__)


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


def _format(text: str, gold: str, question: str | None, answer_format: str = "tags") -> float:
    return float(all(_structure(text, answer_format)))


def _format_soft(text: str, gold: str, question: str | None, answer_format: str = "tags") -> float:
    return sum(_structure(text, answer_format)) / 4


def make_format(answer_format: str = "tags") -> Reward:
    """1 when the completion has exactly the asked structure, else 0 (strict).

    >>> make_format()(["<think>2+2=4</think>\\n<answer>4</answer>", "<answer>4</answer>"], answer=["4", "4"])
    [1.0, 0.0]
    """
    check_answer_format(answer_format)
    fn = partial(_format, answer_format=answer_format)
    return Reward("format", fn, (0.0, 1.0), answer_format, make_format.__doc__)


def make_format_soft(answer_format: str = "tags") -> Reward:
    """Partial format credit in [0, 1]: a quarter for each of the four checks of `format`.

    >>> make_format_soft()(["<answer>4</answer>", "<think>x</think><answer>4</answer><answer>4</answer>"],
    ...                    answer=["4", "4"])
    [0.5, 0.25]
    """
    check_answer_format(answer_format)
    fn = partial(_format_soft, answer_format=answer_format)
    return Reward("format_soft", fn, (0.0, 1.0), answer_format, make_format_soft.__doc__)


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


def _length(
    text: str, gold: str, question: str | None, soft: int = LENGTH_SOFT_CHARS, hard: int = LENGTH_HARD_CHARS
) -> float:
    return min(0.0, max(-1.0, (soft - len(text)) / (hard - soft)))


def make_length(answer_format: str = "tags", soft: int = LENGTH_SOFT_CHARS, hard: int = LENGTH_HARD_CHARS) -> Reward:
    """Penalty in [-1, 0]: 0 up to `soft` characters, -1 from `hard`, linear in between.

    >>> make_length(soft=10, hard=20)(["x" * 5, "x" * 15, "x" * 99], answer=["1"] * 3)
    [0.0, -0.5, -1.0]
    """
    return Reward("length", partial(_length, soft=soft, hard=hard), (-1.0, 0.0), answer_format, make_length.__doc__)


# name -> factory called as `factory(answer_format=...)`; the rewards that ignore the format take it all the same
REWARDS: dict[str, Callable[..., Reward]] = {
    "correct": make_correct,
    "correct_pm1": partial(make_correct, wrong=-1.0, name="correct_pm1"),
    "format": make_format,
    "format_soft": make_format_soft,
    "steps": partial(Reward, "steps", _steps, (0.0, 1.0)),
    "steps_count": partial(Reward, "steps_count", _steps_count, (0.0, STEP_CAP)),
    "numbers_used": partial(Reward, "numbers_used", _numbers_used, (0.0, 1.0)),
    "repetition": partial(Reward, "repetition", _repetition, (-1.0, 0.0)),
    "length": make_length,
}
# name -> (low, high) that every value of the reward lies in, read from the rewards themselves
RANGES: dict[str, tuple[float, float]] = {name: factory().range for name, factory in REWARDS.items()}

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
    # Correctness alone carries the signal (DeepSeek-R1's accuracy + format): for a policy that already answers in
    # the format (after a cold start, or the default preset's first steps). No steps or numbers shaping, which a
    # policy can raise without being right; format_soft stays, small (at most 0.1, a tenth of a correct answer),
    # so the format cannot drift and all-wrong groups still rank well-formed answers above broken ones.
    "correctness": {"correct": 1.0, "format_soft": 0.1},
}


def get_reward_funcs(names: Sequence[str], answer_format: str = "tags") -> list[Reward]:
    """Reward functions by registry name; an unknown name raises an error listing the valid ones.

    >>> [f.__name__ for f in get_reward_funcs(["correct", "steps"], "boxed")]
    ['correct', 'steps']
    """
    check_answer_format(answer_format)
    for name in names:
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; valid: {', '.join(REWARDS)}")
    return [REWARDS[name](answer_format=answer_format) for name in names]


def score_rows(
    rows: Sequence[dict[str, Any]],
    reward_funcs: Sequence[str],
    reward_weights: Sequence[float] | None = None,
    answer_format: str = "tags",
) -> list[dict[str, Any]]:
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
    return [
        {
            "total": sum(w * v[i] for w, v in zip(weights, values)),
            "parts": {name: v[i] for name, v in zip(reward_funcs, values)},
        }
        for i in range(len(rows))
    ]
