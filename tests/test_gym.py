"""reasoning-gym sources (``gym:<task>[:key=value,...]``) and the ``correctness`` preset: rows, held-out split,
difficulty keys, gold answers through the one checker, one-line errors. Fast, offline (reasoning-gym generates)."""

import importlib.util
import re
import sys

import pytest
from conftest import require

from grpo_math import UserError, gym
from grpo_math.config import parse_train_args
from grpo_math.data import load_gsm8k, load_problems
from grpo_math.rewards import PRESETS, correct, score_rows

CHAIN = "gym:chain_sum:min_terms=2,max_terms=3,min_digits=1,max_digits=2,size=200,test_size=50"


@pytest.fixture
def needs_gym():
    """reasoning-gym, which the ``test`` extra installs (missing: skipped here, failed under ``CI=true``)."""
    require(importlib.util.find_spec("reasoning_gym") is not None, "reasoning-gym (pip install 'grpo-math[gym]')")


def tagged(answer: str) -> list[dict]:
    return [{"role": "assistant", "content": f"<think>\nworking\n</think>\n<answer>{answer}</answer>"}]


def test_spec_values_are_typed():
    assert gym.parse_spec("gym:basic_arithmetic:max_digits=2,allow_negation=False,operators=+-,x=0.5") == (
        "basic_arithmetic",
        {"max_digits": 2, "allow_negation": False, "operators": "+-", "x": 0.5},
    )
    assert gym.parse_spec("gym:leg_counting") == ("leg_counting", {})


@pytest.mark.parametrize("split,size", [("train", 200), ("test", 50)])
def test_rows_have_the_gsm8k_columns(split, size, needs_gym):
    rows = load_gsm8k(CHAIN, split=split)
    assert sorted(rows.column_names) == ["answer", "prompt", "question", "solution"]
    assert len(rows) == size
    for row in rows:
        assert re.fullmatch(r"-?\d+", row["answer"]), row
        assert row["solution"] and row["question"] in row["prompt"][-1]["content"]


def test_every_spelling_of_a_task_gives_disjoint_splits(needs_gym):
    # whether a question is held out is a property of its text: no size or test_size can make the splits meet
    task = "gym:chain_sum:min_terms=2,max_terms=2,min_digits=1,max_digits=2"
    train = {p.question for size in (300, 3000) for p in load_problems(f"{task},size={size}", "train")}
    test = {p.question for size in (50, 5000) for p in load_problems(f"{task},size={size},test_size=300", "test")}
    assert len(train) > 1000 and len(test) > 100
    assert not train & test
    assert all(gym.held_out(q) for q in test) and not any(gym.held_out(q) for q in train)
    assert gym.SEEDS["test"] - gym.SEEDS["train"] > 10**9  # item i is seeded with seed + i: streams never meet


def test_held_out_problems_follow_the_training_distribution(needs_gym):
    # a small question space: two one-digit terms are ~200 questions, a quarter of all rows. Held out by a hash of
    # the question, the test split keeps that share (excluding train's questions would leave it ~2%)
    name = "gym:chain_sum:min_terms=2,max_terms=3,min_digits=1,max_digits=2,size=2000,test_size=1000"

    def shares(split):
        problems = load_problems(name, split)
        terms = [len(p.solution.splitlines()) + 1 for p in problems]
        small = [t == 2 and all(len(n) == 1 for n in re.findall(r"\d+", p.question)) for t, p in zip(terms, problems)]
        return terms.count(2) / len(terms), sum(small) / len(small)

    (two_train, small_train), (two_test, small_test) = shares("train"), shares("test")
    assert abs(two_train - two_test) < 0.05 and abs(small_train - small_test) < 0.05
    assert small_test > 0.15


@pytest.mark.parametrize("name", [CHAIN, "gym:basic_arithmetic:size=300", "gym:decimal_chain_sum:size=200"])
def test_arithmetic_rows_carry_exact_worked_steps(name, needs_gym):
    # one `a op b = c` line per operation, every line true for the steps reward, the last result the gold
    from grpo_math.rewards import _analyse
    from grpo_math.steps import find_steps

    problems = load_problems(name, "train")
    with_steps = [p for p in problems if p.solution]
    assert len(with_steps) >= 0.95 * len(problems)
    for p in with_steps:
        lines = p.solution.splitlines()
        assert all(re.fullmatch(r"-?[\d.]+ [-+*/] -?[\d.]+ = -?[\d.]+", line) for line in lines), p.solution
        assert gym.Fraction(lines[-1].rsplit("= ", 1)[1]) == gym.Fraction(p.answer), p.where
        assert all(step.ok for step in find_steps(p.solution)), p.solution
        counted, true, _ = _analyse(p.solution, p.question)  # what the steps reward counts holds, every line
        assert counted == true, p.solution


def test_worked_steps_follow_precedence_and_refuse_inexact_decimals():
    assert gym.worked_steps("( 56 + -33 ) - 84") == "56 + -33 = 23\n23 - 84 = -61"
    assert gym.worked_steps("2 + 3 * 4") == "3 * 4 = 12\n2 + 12 = 14"
    assert gym.worked_steps("-(7 - 9) / 8") == "7 - 9 = -2\n-1 * -2 = 2\n2 / 8 = 0.25"
    with pytest.raises(ValueError, match="no exact decimal"):
        gym.worked_steps("10 / 3")


def test_difficulty_keys_reach_the_generator(needs_gym):
    def operands(name):
        return [[int(n) for n in re.findall(r"\d+", p.question)] for p in load_problems(f"{name},size=100", "train")]

    small = operands("gym:chain_sum:min_terms=2,max_terms=2,min_digits=1,max_digits=1")
    assert all(len(ns) == 2 and max(ns) < 10 for ns in small)
    large = operands("gym:chain_sum:min_terms=4,max_terms=4,min_digits=3,max_digits=3")
    assert all(len(ns) == 4 and min(ns) >= 100 for ns in large)


@pytest.mark.parametrize(
    "name,split",
    [
        (CHAIN, "train"),
        ("gym:basic_arithmetic:size=100", "train"),
        ("gym:leg_counting:size=100", "train"),
        ("gym:decimal_chain_sum:size=100", "train"),
        ("gym:gsm_symbolic:test_size=100", "test"),
    ],
)
def test_gold_answers_score_one_and_wrong_ones_zero(name, split, needs_gym):
    problems = load_problems(name, split)
    golds = [p.answer for p in problems]
    assert correct([tagged(g) for g in golds], answer=golds) == [1.0] * len(golds)
    wrong = [str(float(g) + 1) for g in golds]
    assert correct([tagged(w) for w in wrong], answer=golds) == [0.0] * len(golds)


def test_basic_arithmetic_golds_equal_their_expression(needs_gym):
    # reasoning-gym floors some divisions (0.7% of rows at default settings): those rows are dropped
    for p in load_problems("gym:basic_arithmetic:size=1000", "train"):
        expression = p.question.removeprefix("Calculate ").removesuffix(".")
        assert gym._exact(gym.ast.parse(expression, mode="eval").body) == gym.Fraction(p.answer), p.where


def test_gsm_symbolic_is_held_out_only(needs_gym):
    with pytest.raises(UserError, match="GSM8K test") as err:
        load_problems("gym:gsm_symbolic", "train")
    assert "\n" not in str(err.value)
    problems = load_problems("gym:gsm_symbolic:test_size=20", "test")
    assert len(problems) == 20 and all(p.solution and "####" not in p.solution for p in problems)


@pytest.mark.parametrize(
    "name,split,pieces",
    [
        ("gym:no_such_task", "train", ["'no_such_task' is unknown", "chain_sum, circuit_logic"]),
        ("gym:caesar_cipher", "train", ["'caesar_cipher'", "not plain numbers", "leg_counting"]),
        ("gym:chain_sum:max_digts=2", "train", ["unknown setting 'max_digts'", "valid: min_terms", "test_size"]),
        ("gym:chain_sum:max_digits", "train", ["bad setting 'max_digits'", "key=value"]),
        ("gym:chain_sum:min_terms=5,max_terms=2", "train", ["'chain_sum'", "max_terms must be >= min_terms"]),
        ("gym:chain_sum:size=0", "train", ["size must be a whole number > 0"]),
        ("gym:chain_sum", "validation", ["splits train and test, not 'validation'"]),
        ("gym:chain_sum:max_terms=2,max_digits=1,size=2000", "test", ["few distinct questions", "test_size"]),
        ("gym:basic_arithmetic:allow_parentheses=false,size=100", "train", ["disagree with their own expression"]),
        ("gym:products:min_digits=9,max_digits=9,size=50", "train", ["reach 10^15"]),  # beyond exact checking
    ],
)
def test_bad_names_raise_one_line(name, split, pieces, needs_gym):
    with pytest.raises(UserError) as err:
        load_problems(name, split)
    message = str(err.value)
    assert "\n" not in message and all(piece in message for piece in pieces), message


def test_missing_reasoning_gym_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # import fails as when it is not installed
    gym._read.cache_clear()
    with pytest.raises(UserError, match=r"pip install 'grpo-math\[gym\]'") as err:
        load_problems("gym:chain_sum:size=5", "train")
    assert "\n" not in str(err.value)


def test_correctness_preset_from_a_recipe(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"reward_preset: correctness\ndataset_name: {CHAIN}\noutput_dir: {tmp_path / 'run'}\n")
    script, grpo, _ = parse_train_args(["--config", str(recipe)])
    assert script.reward_funcs == ["correct", "format_soft"] and grpo.reward_weights == [1.0, 0.1]
    assert script.dataset_name == CHAIN
    rows = [
        {
            "question": "What is 2 + 3?",
            "answer": "5",
            "completion": f"<think>\n2 + 3 = 5\n</think>\n<answer>{a}</answer>",
        }
        for a in ("5", "6")
    ]
    right, wrong = (r["total"] for r in score_rows(rows, list(PRESETS["correctness"]), grpo.reward_weights))
    assert right == pytest.approx(1.1) and wrong == pytest.approx(0.1)
