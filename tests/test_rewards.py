"""Reward functions, registry, presets and anti-farming rules: fast, no model."""

import json
import math
import pickle
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import JANET

from grpo_math import rewards
from grpo_math.answers import ANSWER_FORMATS, parse_number, split_solution
from grpo_math.rewards import PRESETS, RANGES, REWARDS, find_steps, get_reward_funcs, score_rows

ALL = list(REWARDS)

JANET_REASONING = (
    "Janet's ducks lay 16 eggs a day and she uses 3 + 4 = 7 of them.\n"
    "So she sells 16 - 7 = 9 eggs.\n"
    "At $2 per egg she makes 9 * 2 = $18 every day."
)
GOOD = f"<think>\n{JANET_REASONING}\n</think>\n<answer>18</answer>"
NATALIA = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."


def score(completion, names=ALL, question=JANET, answer="18", answer_format="tags"):
    row = {"question": question, "answer": answer, "completion": completion}
    return score_rows([row], names, answer_format=answer_format)[0]["parts"]


def default_total(completion, question=JANET, answer="18"):
    preset = PRESETS["default"]
    row = {"question": question, "answer": answer, "completion": completion}
    return score_rows([row], list(preset), list(preset.values()))[0]["total"]


# --- registry and plumbing -------------------------------------------------------------------------------------


def test_unknown_reward_lists_valid_names():
    with pytest.raises(ValueError, match="unknown reward 'nope'") as error:
        get_reward_funcs(["correct", "nope"])
    assert all(name in str(error.value) for name in REWARDS)


def test_unknown_answer_format_is_an_error():
    with pytest.raises(ValueError, match="valid: tags, hash, boxed"):
        get_reward_funcs(["correct"], answer_format="latex")


@pytest.mark.parametrize("answer_format", ["tags", "hash", "boxed"])
def test_factories_keep_registry_names_for_trl_logging(answer_format):
    assert [f.__name__ for f in get_reward_funcs(ALL, answer_format)] == ALL


def test_every_reward_has_a_documented_range_and_presets_use_known_names():
    assert set(RANGES) == set(REWARDS)
    assert all(low < high for low, high in RANGES.values())
    for answer_format in ANSWER_FORMATS:
        assert {f.__name__: f.range for f in get_reward_funcs(ALL, answer_format)} == RANGES
    assert all(set(weights) <= set(REWARDS) for weights in PRESETS.values())
    assert {"default", "notebook"} <= set(PRESETS)


@pytest.mark.parametrize("answer_format", ANSWER_FORMATS)
@pytest.mark.parametrize("name", ALL)
def test_every_reward_is_picklable(name, answer_format):
    """TRL keeps reward functions that pickle (module-level functions, partials of them, small classes): a lambda
    or a closure inside a reward fails here."""
    [f] = get_reward_funcs([name], answer_format)
    copy = pickle.loads(pickle.dumps(f))
    assert (copy.__name__, copy.range, copy.__doc__) == (f.__name__, f.range, f.__doc__)
    completions = [GOOD, GOOD.replace(">18<", ">17<"), "<think>" * 5000 + "1+" * 5000 + "1 = 2<answer>18"]
    kwargs = {"answer": ["18"] * 3, "question": [JANET] * 3}
    assert copy(completions, **kwargs) == f(completions, **kwargs)


def test_string_and_conversational_completions_score_the_same():
    funcs = get_reward_funcs(ALL)
    chat = [[{"role": "assistant", "content": GOOD}]]
    for f in funcs:
        assert f(chat, answer=["18"], question=[JANET]) == f([GOOD], answer=["18"], question=[JANET]), f.__name__


def test_trl_keyword_arguments_are_accepted():
    kwargs = {
        "prompts": [[{"role": "user", "content": JANET}]],
        "solution": ["..."],
        "completion_ids": [[1, 2]],
        "trainer_state": None,
        "question": [JANET],
    }
    assert rewards.correct([GOOD], answer=["18"], **kwargs) == [1.0]


def test_score_rows_accepts_raw_gsm8k_answers_and_weights():
    rows = [
        {"question": JANET, "answer": "... = <<9*2=18>>18\n#### 18", "completion": GOOD},
        {"question": JANET, "answer": "18", "completion": "<answer>17</answer>"},
    ]
    scored = score_rows(rows, ["correct", "format"], [2.0, 0.5])
    assert scored == [
        {"total": 2.5, "parts": {"correct": 1.0, "format": 1.0}},
        {"total": 0.0, "parts": {"correct": 0.0, "format": 0.0}},
    ]
    with pytest.raises(ValueError, match="reward_weights"):
        score_rows(rows, ["correct", "format"], [1.0])


# --- correct and format -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "answer_format", "expected"),
    [
        (GOOD, "tags", 1.0),
        (GOOD.replace(">18<", ">18.0<"), "tags", 1.0),
        (GOOD.replace(">18<", ">$18<"), "tags", 1.0),
        (GOOD.replace(">18<", ">17<"), "tags", 0.0),
        (GOOD + "\n<answer>19</answer>", "tags", 0.0),  # several different answers: no credit
        ("the answer is 18", "tags", 0.0),
        (f"{JANET_REASONING}\n#### 18", "hash", 1.0),
        (f"{JANET_REASONING}\nThe answer is $\\boxed{{18}}$.", "boxed", 1.0),
        (f"{JANET_REASONING}\nThe answer is $\\boxed{{18}}$.", "tags", 0.0),
    ],
)
def test_correct(completion, answer_format, expected):
    assert score(completion, ["correct", "correct_pm1"], answer_format=answer_format) == {
        "correct": expected,
        "correct_pm1": 1.0 if expected else -1.0,
    }


@pytest.mark.parametrize(
    ("completion", "answer_format", "soft"),
    [
        (GOOD, "tags", 1.0),
        ("<answer>18</answer>", "tags", 0.5),  # no reasoning
        ("<think></think>\n<answer>18</answer>", "tags", 0.5),  # empty reasoning
        ("<answer>18</answer>\n<think>x</think>", "tags", 0.5),  # answer before the reasoning
        (GOOD + "\nBye.", "tags", 0.75),  # text after the answer
        ("<think>x</think><answer>18</answer><answer>18</answer>", "tags", 0.25),
        ("<think>x</think><answer>eighteen</answer>", "tags", 0.75),
        (f"{JANET_REASONING}\n#### 18", "hash", 1.0),
        ("#### 18", "hash", 0.5),
        (f"{JANET_REASONING}\n#### 18\nMore text", "hash", 0.75),
        (f"{JANET_REASONING}\nSo $\\boxed{{18}}$.", "boxed", 1.0),
        (f"\\boxed{{18}}\n{JANET_REASONING}", "boxed", 0.5),
    ],
)
def test_format_and_format_soft(completion, answer_format, soft):
    parts = score(completion, ["format", "format_soft"], answer_format=answer_format)
    assert parts == {"format": float(soft == 1.0), "format_soft": soft}


# --- steps ------------------------------------------------------------------------------------------------------


def steps_parts(text, question=NATALIA):
    return score(text, ["steps", "steps_count", "numbers_used"], question=question, answer="72")


def test_gsm8k_annotations_verify_and_wrong_ones_do_not():
    right = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips in all."
    assert steps_parts(right) == {"steps": 1.0, "steps_count": 0.4, "numbers_used": 1.0}
    wrong = "Natalia sold 48/2 = <<48/2=25>>25 clips in May.\nShe sold 48+25 = <<48+25=73>>73 clips in all."
    assert steps_parts(wrong) == {"steps": 0.5, "steps_count": 0.2, "numbers_used": 1.0}
    assert steps_parts("Natalia sold <<48/2=23>>23 clips in May.")["steps"] == 0.0


def test_repeating_a_verified_line_raises_neither_steps_nor_steps_count():
    base = "48/2 = 24 clips in May.\n48 + 24 = 70 clips in all."
    assert steps_parts(base)["steps"] == 0.5
    for extra in ["\n48/2 = 24" * 20, "\n48 / 2 = 24." * 20, "\n" + base * 5]:
        assert steps_parts(base + extra) == steps_parts(base)
    reordered = "48 / 2 = 24\n48 + 24 = 72\n24 + 48 = 72\n(24) + (48) = 72"
    assert steps_parts(reordered)["steps_count"] == 0.4  # reordering the operands is repeating


def test_unrelated_true_lines_do_not_count():
    base = "48/2 = 24 clips in May.\n48 + 24 = 70 clips in all."
    filler = "\n1 + 1 = 2\n2 + 2 = 4\n3 * 3 = 9\n1000 - 1 = 999\n48 + 0 = 48\n48 * 1 = 48"
    assert steps_parts(base + filler) == steps_parts(base)
    assert steps_parts(filler) == {"steps": 0.0, "steps_count": 0.0, "numbers_used": 0.0}


def test_steps_use_number_words_percentages_and_earlier_results():
    question = "Tom has three apples and buys four more. A 150% markup applies to a $80,000 house."
    text = "3 + 4 = 7 apples.\n7 * 2 = 14.\n80,000 * 1.5 = 120,000."
    assert score(text, ["steps", "steps_count"], question=question) == {"steps": 1.0, "steps_count": 0.6}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16 - 3 - 4 = 9", [True]),
        ("$2 \\times 9 = \\$18$", [True]),
        ("3 \u00d7 4 = 12 and 12 \u00f7 4 = 3", [True, True]),
        ("\\frac{48}{2} = 24", [True]),
        ("1,000 + 500 = 1,500", [True]),
        ("(2 + 3) * 4 = 20", [True]),
        ("10/3 = 3.33", [True]),  # rounded to the decimals shown
        ("10/3 = 3.4", [False]),
        ("- 16 - 3 = 13", [True]),  # markdown bullet
        ("1. 16 - 3 = 13", [True]),  # numbered list
        ("3x + 4 = 28", []),  # algebra is not arithmetic
        ("X*4 + 240 = 1920", []),
        ("16 eggs - 3 eggs - 4 eggs = 9 eggs", [True]),  # units between numbers and operators
        ("$20/hour * 35 hours/week = $700/week", [True]),
        ("15840 feet / (440 feet/minute) = 36 minutes", [True]),
        ("60 questions x 40/100 = 24 questions", [True]),
        ("200 GB * 40% = 80 GB", [True]),
        ("100%/80% * $500 = $625", [True]),
        ("80% = $500", []),  # a lone percentage states a proportion
        ("3(16) = 48 and 220(.40) = 88", [True, True]),  # implicit multiplication
        ("2 times 5 equals 10, 83 plus 91 equals 174", [True, True]),
        ("4 pounds - 6 ounces = 58 ounces", [False]),  # known limitation: mixed units are not converted
        ("2 dozen * 12 = 288", []),  # multiplier words are not units
        ("7:50 + 30 minutes = 8:20", []),  # clock times
        ("3 / 2 = 1 1/2", []),  # mixed number on the right
        ("3 / 6 = 50%", []),
        ("x = 5", []),
        ("9^9^9 = 1", []),
        ("2 + 2 = 2 + 2", []),
    ],
)
def test_find_steps_parses_common_notations(text, expected):
    assert [s.ok for s in find_steps(text)] == expected


def test_numbers_used_counts_operands_not_mentions():
    assert steps_parts(NATALIA)["numbers_used"] == 0.0  # copying the question earns nothing
    assert steps_parts("48 / 2 = 24")["numbers_used"] == 1.0


# --- penalties ----------------------------------------------------------------------------------------------------


def test_repetition_and_length_penalties():
    assert score(GOOD, ["repetition", "length"]) == {"repetition": 0.0, "length": 0.0}
    repeated = score(GOOD * 50, ["repetition", "length"])
    assert repeated["repetition"] < -0.9 and repeated["length"] == -1.0


# --- hostile inputs -----------------------------------------------------------------------------------------------

HUGE = "1" + "0" * 10000
HOSTILE = [
    "",
    " \n\t",
    f"<answer>{HUGE}</answer>",
    f"<think>{HUGE} * 2 = 2{HUGE[1:]}0</think>\n<answer>{HUGE}</answer>",
    f"{HUGE}\n#### {HUGE}",
    "<answer>9^9^9^9^9</answer>",
    "<think>9^9^9^9^9 = 1</think><answer>\\frac{9^{9^{9^{9}}}}{1}</answer>",
    "\\boxed{9^9^9^9^9}",
    "<think>" * 5000 + "<answer>18",
    "<answer>" * 5000 + "18" + "</think>" * 5000,
    "1+" * 50000 + "1 = 2",
    "=" * 100000,
    "(" * 50000 + "1 + 1" + ")" * 50000 + " = 2",
    "\\boxed{" * 10000 + "18" + "}" * 10000,
    "{" * 100000,
    "a" * 100000,
    "<answer>\u0664\u0662</answer>",
    "<think>\u0663 + \u0664 = \u0667</think><answer>\uff11\uff18</answer>",
    "1,000,000,000,000,000,000,000,000 * 1,000,000,000,000,000,000,000 = 1" + ",000" * 16,
    "\n".join(f"{i} + {i} = {2 * i}" for i in range(5000)),
    "9" * 15000 + "x = 5",
    "16 + 2 = " + "9" * 15000 + "x",
    "1" + "a" * 30000 + " = 5",
    "1 " + "ab " * 30000 + "= 5",
    "12% " * 20000 + "= 5",
    "3(" * 20000 + "= 5",
    "<answer>\\sqrt{" * 60 + "}" * 60 + "</answer>",
]


def check_hostile(answer_format):
    funcs = get_reward_funcs(ALL, answer_format)
    for text in HOSTILE:
        for f in funcs:
            start = time.perf_counter()
            values = f(
                [text, [{"role": "assistant", "content": text}]],
                answer=["18", "#### 18"],
                question=[JANET, "1" * 50000 + " ="],
            )
            elapsed = time.perf_counter() - start
            low, high = RANGES[f.__name__]
            assert all(math.isfinite(v) and low <= v <= high for v in values), (f.__name__, text[:50], values)
            assert elapsed < 1.0, (f.__name__, text[:50], elapsed)


@pytest.mark.parametrize("answer_format", ["tags", "hash", "boxed"])
def test_hostile_inputs_give_bounded_values_fast(answer_format):
    check_hostile(answer_format)


def test_hostile_inputs_are_fast_in_worker_threads():
    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(check_hostile, fmt) for fmt in ("tags", "boxed")]:
            future.result()


# --- anti-hacking under the default preset ------------------------------------------------------------------------

HACKS = {
    "whole completion repeated 50x": "\n".join([GOOD] * 50),
    "reasoning lines repeated 50x": "<think>\n"
    + "\n".join([JANET_REASONING] * 50)
    + "\n</think>\n<answer>18</answer>",
    "many answers": f"<think>\n{JANET_REASONING}\n</think>\n" + "".join(f"<answer>{i}</answer>" for i in range(30)),
    "answers around the gold": GOOD + "\n<answer>17</answer>\n<answer>19</answer>",
    "every number 0..1000": " ".join(str(i) for i in range(1001)),
    "every number in tags": "<think>" + " ".join(str(i) for i in range(1001)) + "</think>\n<answer>18</answer>",
    "every number as answers": "".join(f"<answer>{i}</answer>" for i in range(1001)),
    "answer before reasoning": f"<answer>18</answer>\n<think>\n{JANET_REASONING}\n</think>",
    "bare gold answer": "<answer>18</answer>",
    "empty think": "<think></think>\n<answer>18</answer>",
    "token think": "<think>.</think>\n<answer>18</answer>",
    "copy of the question": JANET,
    "question as reasoning": f"<think>{JANET}</think>\n<answer>18</answer>",
    "trivial true lines": "<think>1 + 1 = 2\n2 + 2 = 4\n16 + 0 = 16\n16 * 1 = 16</think>\n<answer>18</answer>",
    "wrong answer, nice format": GOOD.replace(">18<", ">17<"),
}


@pytest.mark.parametrize("hack", list(HACKS))
def test_plain_correct_solution_beats_each_hack(hack):
    good = default_total(GOOD)
    assert good > default_total(HACKS[hack]), hack


def test_correctness_dominates_format_and_steps():
    assert default_total("<answer>18</answer>") > default_total(GOOD.replace(">18<", ">17<"))
    best = sum(w * RANGES[name][1] for name, w in PRESETS["default"].items())
    assert default_total(GOOD) == pytest.approx(best)  # the plain solution gets the maximum


# --- GSM8K references (the gold check) -----------------------------------------------------------------------------


def test_gsm8k_references_score_as_correct_and_mostly_verified(gsm8k_dir):
    """Every reference, rewritten into the tags format, is correct; off by one it is not; its lines verify."""
    rows = [json.loads(line) for line in (gsm8k_dir / "test.jsonl").read_text().splitlines()]
    assert len(rows) >= 50  # the shipped sample; bench/gold_check.py runs all 1,319
    questions, golds, completions, wrong = [], [], [], []
    for row in rows:
        reasoning, gold = split_solution(row["answer"])
        questions.append(row["question"])
        golds.append(gold)
        completions.append(f"<think>{reasoning}</think>\n<answer>{gold}</answer>")
        wrong.append(f"<think>{reasoning}</think>\n<answer>{parse_number(gold) + 1:g}</answer>")
    f = get_reward_funcs(["correct", "format", "steps"])
    correct, fmt, steps = (g(completions, answer=golds, question=questions) for g in f)
    assert correct == [1.0] * len(rows)
    assert fmt == [1.0] * len(rows)
    assert f[0](wrong, answer=golds, question=questions) == [0.0] * len(rows)
    assert sum(steps) / len(steps) >= 0.9


def test_scoring_throughput():
    """1,000 completions through every reward in well under 10 s (measured ~1-2 s on one core)."""
    rows = [
        {"question": JANET, "answer": "18", "completion": GOOD.replace("16 - 7", f"16 - 7 + {i} - {i}")}
        for i in range(1000)
    ]
    start = time.perf_counter()
    score_rows(rows, ALL)
    assert time.perf_counter() - start < 10.0
