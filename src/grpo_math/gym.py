"""reasoning-gym tasks as GSM8K-shaped rows: ``gym:<task>[:key=value,...]`` names, held out by question.

`reasoning-gym <https://github.com/open-thought/reasoning-gym>`_ (extra ``grpo-math[gym]``, imported only when a
``gym:`` name is used) generates verifiable problems at a chosen difficulty. ``gym:chain_sum:max_terms=3,max_digits=2``
reads task ``chain_sum`` with those fields of its config (values read as int, float, ``true``/``false``, else text);
two keys are ours: ``size`` (training rows, default 10,000) and ``test_size`` (held-out rows, default 1,000).

* Only ``TASKS`` are accepted: their gold answers are plain numbers, so ``answers.answers_match`` (the one checker
  behind ``rewards.correct`` and the reported accuracy) scores them exactly; a row whose gold is not a plain
  number still stops the load with a ``UserError`` naming the task.
* Splits: ``train`` and ``test`` only. Whether a question is held out is a property of its text (``held_out``: a
  stable hash puts ``HELD_OUT_PER_MILLE`` of the question space in test), so every spelling of a task (any
  ``size``, ``test_size``) gives disjoint splits, and both are drawn from the same generator: held-out problems
  follow the training distribution (easy questions are not used up by train). Train reads the items of seed 1
  whose question is not held out, test those of a seed 2^31 items further (reasoning-gym seeds item ``i`` with
  ``seed + i``) whose question is; repeats are kept in both, as the generator makes them. Settings that cannot
  fill a split, or give a test split less than half of whose rows are distinct questions, raise a ``UserError``.
* Worked steps: rows of ``EXPRESSION_TASKS`` carry as ``solution`` one exact ``a op b = c`` line per operation of
  their expression (``worked_steps``, innermost first, left to right), the lines the ``steps`` reward checks, so a
  cold start (``sft_examples``) can teach the reasoning; ``gsm_symbolic`` rows carry their own reasoning, the
  other tasks' rows none (empty).
* Golds are checked where they can be: for tasks with an arithmetic ``expression`` (``EXPRESSION_TASKS``) the
  expression is evaluated exactly and a row whose gold disagrees is dropped (reasoning-gym's ``basic_arithmetic``
  floors some divisions: 0.7% of rows at default settings), as is a gold of 10^15 or more, beyond exact checking
  (0.1% of ``basic_arithmetic`` at default settings); more than ``MAX_BAD_GOLD_SHARE`` dropped is an error.
* ``gsm_symbolic`` (GSM-Symbolic) is held-out only (``HELD_OUT_ONLY``): every question is test.

>>> parse_spec("gym:chain_sum:max_digits=1,allow_negation=false,size=50")
('chain_sum', {'max_digits': 1, 'allow_negation': False, 'size': 50})
>>> print(worked_steps("97 - 54 + 93"))
97 - 54 = 43
43 + 93 = 136
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import operator
from fractions import Fraction
from functools import lru_cache

from . import UserError
from .answers import gold_from_solution

PREFIX = "gym:"
TASKS = (  # every gold a plain number (checked on 300 rows each at default settings, reasoning-gym 0.1.25)
    "aiw basic_arithmetic binary_alternation chain_sum circuit_logic count_bits count_primes decimal_chain_sum "
    "gcd gsm_symbolic largest_island lcm leg_counting letter_counting maze number_sequence products "
    "rectangle_count rotten_oranges self_reference simple_equations simple_geometry"
).split()
HELD_OUT_ONLY = {
    "gsm_symbolic": "its templates were written from GSM8K test problems (GSM-Symbolic), so training on it "
    "trains on the GSM8K test set; evaluate on it only (grpo-math eval --dataset_name gym:gsm_symbolic)"
}
EXPRESSION_TASKS = ("basic_arithmetic", "chain_sum", "decimal_chain_sum", "products")
SEEDS = {"train": 1, "test": 1 + 2**31}
SIZES = {"train": 10_000, "test": 1_000}  # ``size`` / ``test_size``
OWN_KEYS = {"size": "train", "test_size": "test"}
MAX_BAD_GOLD_SHARE = 0.05
MAX_GOLD = 10**15  # answers.answers_match tells numbers apart exactly only below this (float comparison)
HELD_OUT_PER_MILLE = 100  # share of the question space (per 1,000) that is held out
MIN_DISTINCT_TEST_SHARE = 0.5  # a test split mostly of repeats would overstate what its statistics know
MAX_TRIES = 10  # items generated per row asked for, at most, beyond the split's share (dropped golds are skipped)

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_SYMBOLS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def is_gym(dataset_name: str) -> bool:
    """Whether ``dataset_name`` names a reasoning-gym task."""
    return dataset_name.startswith(PREFIX)


def parse_spec(dataset_name: str) -> tuple[str, dict]:
    """``(task, settings)`` of a ``gym:<task>[:key=value,...]`` name; keys are checked later, against the task."""
    task, _, text = dataset_name[len(PREFIX) :].partition(":")
    settings = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"bad setting '{item}' in '{dataset_name}': expected key=value, e.g. max_digits=2")
        settings[key.strip()] = _value(value.strip())
    return task, settings


def _value(text: str) -> int | float | bool | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def read_gym(dataset_name: str, split: str) -> list[tuple[dict, str]]:
    """``(row, where)`` pairs in GSM8K's raw shape (``answer`` = reasoning + ``#### gold``) for ``split``."""
    return list(_read(dataset_name, split))


def held_out(question: str) -> bool:
    """Whether ``question`` belongs to the test split: a stable hash of its text, whatever the settings' spelling.

    >>> sum(held_out(f"What is {n} + 1?") for n in range(10_000))  # about HELD_OUT_PER_MILLE per 1,000
    1033
    """
    return int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) % 1000 < HELD_OUT_PER_MILLE


@lru_cache(maxsize=8)  # training reads train, and test for the in-training accuracy
def _read(dataset_name: str, split: str) -> tuple[tuple[dict, str], ...]:
    task, settings = parse_spec(dataset_name)
    if split not in SEEDS:
        raise UserError(f"'{dataset_name}' has splits train and test, not '{split}'")
    if split == "train" and task in HELD_OUT_ONLY:
        raise UserError(f"'{dataset_name}' cannot be a training set: {HELD_OUT_ONLY[task]}")
    rg = _import(task)
    sizes = {part: settings.pop(key, SIZES[part]) for key, part in OWN_KEYS.items()}
    for key, size in zip(OWN_KEYS, sizes.values()):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise UserError(f"'{dataset_name}': {key} must be a whole number > 0, not {size!r}")
    fields = [f.name for f in config_fields(rg, task) if f.name not in ("seed", "size")]
    for key in settings:
        if key not in fields:
            raise UserError(f"unknown setting '{key}' for gym task '{task}'; valid: {', '.join([*fields, *OWN_KEYS])}")
    return _generate(rg, dataset_name, task, settings, split, sizes[split])


def _import(task: str):
    """reasoning_gym, once ``task`` is known to be one of ``TASKS``."""
    try:
        import reasoning_gym
    except ImportError:
        raise UserError(
            "gym: datasets need reasoning-gym: pip install 'grpo-math[gym]' (or pip install reasoning-gym)"
        ) from None
    if task not in TASKS:
        known = "a task whose answers are not plain numbers" if task in reasoning_gym.factory.DATASETS else "unknown"
        raise UserError(f"gym task '{task}' is {known}; valid: {', '.join(TASKS)}")
    return reasoning_gym


def config_fields(reasoning_gym, task: str) -> tuple:
    """The fields of ``task``'s config dataclass (its difficulty settings, plus ``seed`` and ``size``)."""
    return dataclasses.fields(reasoning_gym.factory.DATASETS[task][1])


def _generate(reasoning_gym, name, task, settings, split, count) -> tuple[tuple[dict, str], ...]:
    """The first ``count`` usable items of the split's seed whose question belongs to the split (``held_out``)."""
    share = (
        1.0
        if task in HELD_OUT_ONLY
        else HELD_OUT_PER_MILLE / 1000
        if split == "test"
        else 1 - HELD_OUT_PER_MILLE / 1000
    )
    try:  # items are generated when read: the size only bounds the search
        dataset = reasoning_gym.create_dataset(
            task, seed=SEEDS[split], size=int(MAX_TRIES * count / share) + 100, **settings
        )
    except (AssertionError, TypeError, ValueError) as err:
        raise UserError(f"'{name}': invalid settings for gym task '{task}': {err or type(err).__name__}") from None
    rows, bad = [], 0
    for index in range(len(dataset)):
        if len(rows) == count:
            break
        item = dataset[index]
        if task not in HELD_OUT_ONLY and held_out(item["question"]) != (split == "test"):
            continue
        gold = _gold(name, task, item)
        if gold is None:
            bad += 1
            continue
        rows.append(
            (
                {"question": item["question"], "answer": f"{_reasoning(task, item)}\n#### {gold}"},
                f"{name} [{split}] item {index}",
            )
        )
    if bad > MAX_BAD_GOLD_SHARE * (len(rows) + bad):
        raise UserError(
            f"'{name}': {bad} of {len(rows) + bad} generated golds disagree with their own expression (a "
            f"reasoning-gym bug at these settings) or reach 10^15; change the settings"
        )
    distinct = len({row["question"] for row, _ in rows})
    if len(rows) < count or (split == "test" and distinct < MIN_DISTINCT_TEST_SHARE * count):
        raise UserError(
            f"'{name}' [{split}]: {distinct} distinct questions in {len(rows)} of {count} rows asked for: these "
            "settings allow few distinct questions; raise the difficulty or lower size / test_size"
        )
    return tuple(rows)


def _reasoning(task: str, item: dict) -> str:
    """A row's worked solution: ``worked_steps`` of its expression, the task's own reasoning, or nothing."""
    if task in EXPRESSION_TASKS:
        try:
            return worked_steps(item["metadata"]["expression"])
        except (ValueError, ZeroDivisionError, SyntaxError, KeyError):
            return ""
    return (item["metadata"].get("answer_cot") or "").rsplit("####", 1)[0].rstrip()


def worked_steps(expression: str) -> str:
    """One exact ``a op b = c`` line per operation of an arithmetic expression, innermost first, left to right (the
    sign of a bracket as ``-1 * x = -x``); a ``ValueError`` when an intermediate result has no exact decimal form
    (e.g. 1/3)."""
    lines: list[str] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = walk(node.left), walk(node.right)
            c = _OPS[type(node.op)](a, b)
            lines.append(f"{_decimal(a)} {_SYMBOLS[type(node.op)]} {_decimal(b)} = {_decimal(c)}")
            return c
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.BinOp):
            value = walk(node.operand)  # the sign of a worked result: a line of its own
            lines.append(f"-1 * {_decimal(value)} = {_decimal(-value)}")
            return -value
        return _exact(node)

    walk(ast.parse(expression, mode="eval").body)
    return "\n".join(lines)


def _decimal(value: Fraction) -> str:
    """``value`` written exactly in decimals (``ValueError`` when it has no finite decimal form).

    >>> _decimal(Fraction(-7, 4)), _decimal(Fraction(12))
    ('-1.75', '12')
    """
    places = next((n for n in range(40) if (value * 10**n).denominator == 1), None)
    if places is None:
        raise ValueError(f"{value} has no exact decimal form")
    digits = str(abs(value * 10**places).numerator).rjust(places + 1, "0")
    text = f"{digits[: len(digits) - places]}.{digits[len(digits) - places :]}" if places else digits
    return ("-" if value < 0 else "") + text


def _gold(name: str, task: str, item: dict) -> str | None:
    """The item's gold as a plain number; None when it is too big to check exactly (``MAX_GOLD``) or disagrees with
    the item's own arithmetic expression."""
    answer = str(item["answer"]).strip()
    try:
        gold = gold_from_solution(f"#### {answer}")
    except ValueError:
        raise UserError(
            f"'{name}': gym task '{task}' gave a gold that is not a plain number ({answer!r}) at these settings"
        ) from None
    if abs(Fraction(gold)) >= MAX_GOLD:
        return None
    if task in EXPRESSION_TASKS:
        try:
            if _exact(ast.parse(item["metadata"]["expression"], mode="eval").body) != Fraction(gold):
                return None
        except (ZeroDivisionError, SyntaxError, KeyError):
            return None
    return gold


def _exact(node: ast.AST) -> Fraction:
    """The exact value of an arithmetic expression tree of numbers, + - * / and signs (nothing else is read)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return Fraction(repr(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return -_exact(node.operand) if isinstance(node.op, ast.USub) else _exact(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_exact(node.left), _exact(node.right))
    raise SyntaxError(f"not plain arithmetic: {ast.dump(node)[:80]}")
