"""reasoning-gym tasks as GSM8K-shaped rows: ``gym:<task>[:key=value,...]`` names, fixed disjoint train/test seeds.

`reasoning-gym <https://github.com/open-thought/reasoning-gym>`_ (extra ``grpo-math[gym]``, imported only when a
``gym:`` name is used) generates verifiable problems at a chosen difficulty. ``gym:chain_sum:max_terms=3,max_digits=2``
reads task ``chain_sum`` with those fields of its config (values read as int, float, ``true``/``false``, else text);
two keys are ours: ``size`` (training rows, default 10,000) and ``test_size`` (held-out rows, default 1,000).

* Only ``TASKS`` are accepted: their gold answers are plain numbers, so ``answers.answers_match`` (the one checker
  behind ``rewards.correct`` and the reported accuracy) scores them exactly; a row whose gold is not a plain
  number still stops the load with a ``UserError`` naming the task.
* Splits: ``train`` and ``test`` only, each from a fixed seed. reasoning-gym seeds item ``i`` with ``seed + i``, so
  the test seed sits 2^31 items past the train seed (seeds 1 and 2 would share all items but one), and the test
  split keeps only questions that appear neither in the train split of the same name (its ``size`` rows) nor
  earlier in the test split: held out by question, not only by seed. Settings with too few distinct questions
  raise a ``UserError`` instead of returning a short test set.
* Golds are checked where they can be: for tasks with an arithmetic ``expression`` (``EXPRESSION_TASKS``) the
  expression is evaluated exactly and a row whose gold disagrees is dropped (reasoning-gym's ``basic_arithmetic``
  floors some divisions: 0.7% of rows at default settings), as is a gold of 10^15 or more, beyond exact checking
  (0.1% of ``basic_arithmetic`` at default settings); more than ``MAX_BAD_GOLD_SHARE`` dropped is an error.
* ``gsm_symbolic`` (GSM-Symbolic) is held-out only (``HELD_OUT_ONLY``); its rows carry their reasoning as
  ``solution``, the other tasks' rows have none (empty).

>>> parse_spec("gym:chain_sum:max_digits=1,allow_negation=false,size=50")
('chain_sum', {'max_digits': 1, 'allow_negation': False, 'size': 50})
"""

from __future__ import annotations

import ast
import dataclasses
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
MAX_TRIES = 10  # items generated per row asked for, at most (duplicates and dropped golds are skipped)

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


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


@lru_cache(maxsize=8)  # training reads train and, for the in-training accuracy, test (which needs train's questions)
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
    seen = set()
    if split == "test" and task not in HELD_OUT_ONLY:
        seen = {row["question"] for row, _ in _generate(rg, dataset_name, task, settings, "train", sizes)}
    return _generate(rg, dataset_name, task, settings, split, sizes, seen)


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


def _generate(reasoning_gym, name, task, settings, split, sizes, exclude=frozenset()) -> tuple[tuple[dict, str], ...]:
    """The first ``sizes[split]`` usable items of the split's seed; the test split skips ``exclude`` and repeats."""
    count = sizes[split]
    try:
        dataset = reasoning_gym.create_dataset(task, seed=SEEDS[split], size=MAX_TRIES * count + 100, **settings)
    except (AssertionError, TypeError, ValueError) as err:
        raise UserError(f"'{name}': invalid settings for gym task '{task}': {err or type(err).__name__}") from None
    rows, seen, bad = [], set(exclude), 0
    for index in range(len(dataset)):
        if len(rows) == count:
            break
        item = dataset[index]
        gold = _gold(name, task, item)
        if gold is None:
            bad += 1
        elif split == "train" or item["question"] not in seen:
            seen.add(item["question"])
            reasoning = (item["metadata"].get("answer_cot") or "").rsplit("####", 1)[0].rstrip()
            rows.append(
                (
                    {"question": item["question"], "answer": f"{reasoning}\n#### {gold}"},
                    f"{name} [{split}] item {index}",
                )
            )
    if bad > MAX_BAD_GOLD_SHARE * (len(rows) + bad):
        raise UserError(
            f"'{name}': {bad} of {len(rows) + bad} generated golds disagree with their own expression (a "
            f"reasoning-gym bug at these settings) or reach 10^15; change the settings"
        )
    if len(rows) < count:
        raise UserError(
            f"'{name}' [{split}]: only {len(rows)} of {count} questions are new (not in train, not repeated): "
            "these settings allow few distinct questions; raise the difficulty or lower test_size"
        )
    return tuple(rows)


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
