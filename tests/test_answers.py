"""Answer extraction and comparison: fast, no model."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from grpo_math import answers
from grpo_math.answers import (
    answers_match,
    extract_flexible,
    extract_strict,
    find_answers,
    gold_from_solution,
    parse_number,
    split_solution,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", 42.0),
        ("42.0", 42.0),
        (" 42. ", 42.0),
        ("-3", -3.0),
        ("\u22123", -3.0),
        ("+7", 7.0),
        ("1,000", 1000.0),
        ("$1,000.50", 1000.5),
        ("-$5", -5.0),
        ("\\$18", 18.0),
        (".5", 0.5),
        ("3/4", 0.75),
        ("-3/4", -0.75),
        ("\\frac{3}{4}", 0.75),
        ("\\dfrac{1}{2}", 0.5),
        ("50%", 50.0),
        ("50\\%", 50.0),
        ("1{,}000", 1000.0),
    ],
)
def test_parse_number_reads_plain_numbers(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "1e3",
        "inf",
        "nan",
        "1,00",
        "3,5",
        "1 000",
        "3/0",
        "1 1/2",
        "2^10",
        "9^9^9^9^9",
        "\u0664\u0662",
        "\uff14\uff12",
        "18 dollars",
        "1" + "0" * 10000,
        "1." + "5" * 200,
    ],
)
def test_parse_number_rejects_everything_else(text):
    assert parse_number(text) is None


@pytest.mark.parametrize(
    ("text", "answer_format", "expected"),
    [
        ("<think>16-3-4=9, 9*2=18</think>\n<answer>18</answer>", "tags", "18"),
        ("<answer> $1,000 </answer>", "tags", "$1,000"),
        ("<answer>18</answer> ... <answer>18.0</answer>", "tags", "18"),  # repeating the same answer is fine
        ("<answer>18</answer> or <answer>19</answer>", "tags", None),  # disagreeing answers: no credit
        ("<answer>18", "tags", None),  # unclosed
        ("the answer is 18", "tags", None),
        ("9*2=18\n#### 18", "hash", "18"),
        ("#### 18\n#### 17", "hash", None),
        ("so the answer is $\\boxed{18}$.", "boxed", "18"),
        ("\\boxed{\\frac{3}{4}}", "boxed", "\\frac{3}{4}"),
        ("\\boxed{18} wait \\boxed{17}", "boxed", None),
        ("\\boxed{18", "boxed", None),
        ("<answer>18</answer>", "boxed", None),  # other formats do not count
    ],
)
def test_extract_strict(text, answer_format, expected):
    assert extract_strict(text, answer_format) == expected


def test_unknown_answer_format_lists_valid_ones():
    with pytest.raises(ValueError, match="tags, hash, boxed"):
        extract_strict("<answer>1</answer>", "xml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She makes 9 * 2 = $18 every day.", "18"),
        ("Total: $1,000.50.", "1000.50"),
        ("The temperature fell to -3 degrees", "-3"),
        ("first 5 then 7", "7"),
        ("no number here", None),
        ("\u0664\u0662", None),  # non-ASCII digits are not numbers
    ],
)
def test_extract_flexible_takes_the_last_number(text, expected):
    assert extract_flexible(text) == expected


@pytest.mark.parametrize(
    ("pred", "gold", "match"),
    [
        ("42", "42.0", True),
        ("42.0", "42", True),
        ("$1,000", "1000", True),
        ("-3", "-3", True),
        ("3/4", "0.75", True),
        ("\\frac{3}{4}", "0.75", True),
        ("50%", "50", True),
        ("41", "42", False),
        ("-42", "42", False),
        ("0.75", "3/5", False),
        ("18 dollars", "18", False),  # strict: the answer must be a number (or LaTeX)
        ("", "42", False),
        (None, "42", False),
        ("42", None, False),
    ],
)
def test_answers_match(pred, gold, match):
    assert answers_match(pred, gold) is match


@pytest.mark.parametrize(
    "pred",
    [
        "9^9^9^9^9",
        "9**9**9**9",
        "\\frac{9^{9^{9^{9}}}}{1}",
        "100000!",
        "1" + "0" * 10000,
        "\\sqrt{" * 60 + "4" + "}" * 60,
        "\\binom{100000000}{50000000}",
    ],
)
def test_hostile_answers_are_rejected_before_math_verify(pred):
    calls = answers.stats["verify_calls"]
    start = time.perf_counter()
    assert answers_match(pred, "1") is False
    assert time.perf_counter() - start < 0.1
    assert answers.stats["verify_calls"] == calls  # guarded out, never sent to sympy


def test_latex_goes_to_math_verify_and_a_runaway_is_killed_from_a_worker_thread():
    """Slowest test here (~2-4 s): starts the math_verify child process, times it out, restarts it."""
    assert answers_match("\\sqrt{16}", "4") is True
    assert answers_match("18 \\text{ dollars}", "18") is True
    assert answers_match("\\sqrt{16}", "5") is False
    timeouts = answers.stats["verify_timeouts"]
    start = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:  # math_verify's signal-based timeout would do nothing here
        assert pool.submit(answers._SANDBOX.verify, "9^{9^{9^{9^{9}}}}", "1", 0.5).result() is False
    assert time.perf_counter() - start < 2.0
    assert answers.stats["verify_timeouts"] == timeouts + 1
    assert answers_match("\\sqrt{9}", "3") is True  # a fresh worker takes over


def test_find_answers_is_linear_on_hostile_markers():
    for text in [
        "<answer>" * 20000,
        "\\boxed{" * 20000,
        "\\boxed{" * 10000 + "}" * 10000,
        "#" * 100000,
        "<answer>1</answer>" * 5000,
    ]:
        start = time.perf_counter()
        for answer_format in ("tags", "hash", "boxed"):
            find_answers(text, answer_format)
        assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    ("solution", "gold"),
    [
        ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n#### 18", "18"),
        ("#### 1,200", "1200"),
        ("#### $70,000", "70000"),
        ("5 - 8 = <<5-8=-3>>-3\n#### -3", "-3"),
        ("a #### 1\nb\n#### 2", "2"),
    ],
)
def test_gold_from_solution(solution, gold):
    assert gold_from_solution(solution) == gold


@pytest.mark.parametrize(
    ("solution", "message"),
    [
        ("no marker 18", "no '####'"),
        ("#### eighteen", "plain number"),
        ("#### 1/2", "plain number"),
        ("####", "plain number"),
    ],
)
def test_gold_from_solution_errors_are_clear(solution, message):
    with pytest.raises(ValueError, match=message):
        gold_from_solution(solution)


def test_split_solution():
    text = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 in all.\n#### 72"
    reasoning, gold = split_solution(text)
    assert gold == "72"
    assert reasoning.endswith("72 in all.") and "####" not in reasoning
