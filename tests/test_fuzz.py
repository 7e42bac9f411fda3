"""Property tests (hypothesis) over every reward and the extractor: random and hostile text never raises, never
hangs and always scores a finite number in the reward's documented range, also from worker threads.

tests/test_rewards.py and tests/test_answers.py pin fixed hostile strings and exploits; this file generates them:
huge numbers, power towers, deep nesting, unclosed markers, 100k-character lines, Unicode digits, LaTeX that
sympy finds slow, many answer markers. Examples are derandomized (same inputs every run, ~30 s on 2 cores);
``GRPO_MATH_FUZZ_SCALE=20 pytest tests/test_fuzz.py`` runs 20x as many, random ones.
"""

import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import JANET
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from grpo_math import answers
from grpo_math.answers import (
    ANSWER_FORMATS,
    VERIFY_TIMEOUT_S,
    answers_match,
    extract_flexible,
    extract_strict,
    find_answers,
    parse_number,
)
from grpo_math.data import format_solution
from grpo_math.rewards import MAX_STEP_CHARS, RANGES, REWARDS, get_reward_funcs  # RANGES: each reward's range

SCALE = int(os.environ.get("GRPO_MATH_FUZZ_SCALE", "1"))
CALL_LIMIT_S = 1.0  # one reward call on one completion (or one extractor call), math_verify not involved
VERIFY_LIMIT_S = VERIFY_TIMEOUT_S + 1.0  # a call that reached math_verify: its timeout plus slack
RESTART_S = 5.0  # starting a fresh math_verify worker after a timeout (~1-2 s measured on 2 busy cores)
FUNCS = {fmt: get_reward_funcs(list(REWARDS), fmt) for fmt in ANSWER_FORMATS}


def fuzz(examples: int):
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        derandomize=SCALE == 1,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- strategies ---------------------------------------------------------------------------------------------------

BIG = st.one_of(st.sampled_from([1_000, 20_000]), st.integers(100, 20_000))  # sizes of the hostile families
UNICODE_DIGITS = st.text(st.characters(categories=["Nd"]), min_size=1, max_size=12)  # Arabic-Indic, full-width...
NUMBERS = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.integers().map(str),
    st.integers(-(10**12), 10**12).map(lambda n: f"{n:,}"),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.fractions(max_denominator=1000).map(str),
    st.integers(1, 400).map(lambda n: "9" * n),
    st.integers(2, 8).map(lambda n: "^".join(["9"] * n)),
    UNICODE_DIGITS,
    st.sampled_from(
        [
            "-0",
            "+.5",
            "1e308",
            "1e-400",
            "inf",
            "-inf",
            "nan",
            "1/0",
            "0/0",
            "$1,000.50",
            "\u22123",
            "50%",
            "\\frac{1}{0}",
            "\\frac{3}{4}",
            "1{,}000",
            "1,00",
            "3.",
            "100000!",
            ".",
            "-",
            "$",
        ]
    ),
)
FRAGMENTS = st.sampled_from(
    [
        "<answer>",
        "</answer>",
        "<think>",
        "</think>",
        "####",
        "\\boxed{",
        "{",
        "}",
        "(",
        ")",
        "[",
        "]",
        "=",
        " = ",
        "+",
        "-",
        "*",
        "/",
        " x ",
        "\u00d7",
        "\u00f7",
        "\u2212",
        "%",
        "$",
        "\\$",
        ",",
        ".",
        ":",
        "\n",
        " ",
        "\t",
        "<<",
        ">>",
        "\\frac{",
        "}{",
        "\\sqrt{",
        "\\sum_{i=1}^{n}",
        "\\int",
        "\\left(",
        "\\right)",
        "\\times",
        "\\cdot",
        "^",
        "!",
        " equals ",
        " times ",
        " percent",
        " dozen",
        " eggs",
        "half",
        "three",
        "\\text{",
        "$$",
        "\u0664",
        "\uff14",
        "\u200b",
    ]
)
MATHY = st.lists(st.one_of(FRAGMENTS, NUMBERS, st.text(max_size=4)), max_size=80).map("".join)
RANDOM_TEXT = st.text(max_size=400)
WORDS = st.sampled_from(
    "Tom has apples and buys more eggs per day half twice three dozen of the $ % each week "
    "sells for How many does she make in total ? . ,".split()
)
PROSE = st.lists(
    st.one_of(WORDS, WORDS, st.integers(0, 10**6).map(str), st.sampled_from(["$5", "50%", "1,200", "3.5"])),
    min_size=1,
    max_size=60,
).map(" ".join)  # question-like text without equations

PAIRS = [
    ("(", ")"),
    ("{", "}"),
    ("[", "]"),
    ("<think>", "</think>"),
    ("<answer>", "</answer>"),
    ("\\boxed{", "}"),
    ("\\frac{", "}{2}"),
    ("\\sqrt{", "}"),
    ("\\left(", "\\right)"),
    ("<<", ">>"),
    ("$", "$"),
    ("1+(", ")"),
]
TAILS = st.sampled_from(["", " = 2", " = 18", "\n#### 18", "<answer>18</answer>", "\\boxed{18}"])


@st.composite
def nested(draw, closed: bool):
    """Parentheses, braces, tags or LaTeX nested thousands deep, all closed or some left open."""
    opener, closer = draw(st.sampled_from(PAIRS))
    depth = draw(BIG)
    core = draw(st.one_of(NUMBERS, MATHY))
    closing = closer * (depth if closed else draw(st.integers(0, depth - 1)))
    return opener * depth + core + closing + draw(TAILS)


@st.composite
def long_line(draw):
    """One line of about 100k characters: a repeated piece, then maybe an equation or an answer."""
    piece = draw(st.one_of(FRAGMENTS, NUMBERS, st.sampled_from(["1+", "9*9=81 ", "ab ", "12% ", "3(", "=", "1,"])))
    piece = piece.replace("\n", " ") or "x"
    return piece * max(1, 100_000 // len(piece)) + draw(TAILS)


@st.composite
def many_answers(draw):
    """Hundreds to thousands of answer markers in every format, the gold among them or not."""
    values = draw(st.lists(st.one_of(NUMBERS, st.just("18")), min_size=2, max_size=50))
    wrap = draw(st.sampled_from(["<answer>{}</answer>", "\\boxed{{{}}}", "#### {}\n", "<answer>{}", "{}</answer>"]))
    return "".join(wrap.format(v) for v in values) * draw(st.sampled_from([1, 20, 200]))


@st.composite
def unicode_arithmetic(draw):
    """Equations and answers written with non-ASCII digits, alone or mixed with ASCII ones."""
    digits = st.one_of(UNICODE_DIGITS, st.builds(str.__add__, UNICODE_DIGITS, st.integers(0, 99).map(str)))
    a, b, c, d = (draw(digits) for _ in range(4))
    return f"<think>{a} + {b} = {c}\n{a} \u00d7 {b} = {d}</think>\n<answer>{d}</answer>\n#### {c}\n\\boxed{{{a}}}"


LATEX = st.recursive(
    st.one_of(st.integers(0, 10**6).map(str), st.sampled_from(["x", "e", "\\pi", "\\infty", "n", "18", "9"])),
    lambda inner: st.one_of(
        st.builds("\\frac{{{}}}{{{}}}".format, inner, inner),
        st.builds("\\sqrt{{{}}}".format, inner),
        st.builds("\\sqrt[{}]{{{}}}".format, inner, inner),
        st.builds("{}^{{{}}}".format, inner, inner),
        st.builds("\\sum_{{i=1}}^{{{}}} {}".format, inner, inner),
        st.builds("\\prod_{{i=1}}^{{{}}} {}".format, inner, inner),
        st.builds("\\int_0^{{{}}} {} dx".format, inner, inner),
        st.builds("\\binom{{{}}}{{{}}}".format, inner, inner),
        st.builds(
            "\\{}({})".format, st.sampled_from(["exp", "log", "ln", "sin", "cosh", "Gamma", "zeta", "tan"]), inner
        ),
        st.builds("\\left({}\\right)".format, inner),
        st.builds("{} \\cdot {}".format, inner, inner),
        st.builds("{} \\times {}".format, inner, inner),
        st.builds("{}!".format, inner),
        st.builds("\\text{{{}}}".format, inner),
        st.builds("\\{{{}, {}\\}}".format, inner, inner),
    ),
    max_leaves=12,
)

HOSTILE = {
    "huge numbers": BIG.map(lambda n: "9" * n) | st.integers(10, 4000).map(lambda n: str(7**n)),
    "power towers": st.integers(3, 500).map(lambda n: "^".join(["9"] * n))
    | st.integers(3, 200).map(lambda n: "**".join(["9"] * n)),
    "deep nesting": nested(closed=True),
    "unclosed markers": nested(closed=False),
    "100k-character lines": long_line(),
    "unicode digits": unicode_arithmetic(),
    "slow LaTeX": LATEX,
    "many answers": many_answers(),
}
TEXT = st.one_of(RANDOM_TEXT, MATHY, *HOSTILE.values())
TEMPLATES = st.sampled_from(
    [
        "{}",
        "<answer>{}</answer>",
        "<think>{}</think>\n<answer>{}</answer>",
        "<think>\n{}\n</think>\n<answer>18</answer>",
        "{}\n#### {}",
        "The answer is $\\boxed{{{}}}$.",
        "<answer>{}",
        "{}</answer>",
        "<think>{}",
    ]
)
COMPLETIONS = st.builds(lambda template, text: template.replace("{}", text), TEMPLATES, TEXT)
GOLDS = st.one_of(
    st.integers(-(10**9), 10**9).map(str),
    st.decimals(-(10**6), 10**6, places=2).map(str),
    st.sampled_from(["18", "0", "-3", "0.5", "1000", "... <<9*2=18>>18\n#### 18"]),
)
QUESTIONS = st.one_of(
    st.just(JANET), PROSE, RANDOM_TEXT, MATHY, HOSTILE["100k-character lines"], HOSTILE["huge numbers"]
)


# --- the checks ---------------------------------------------------------------------------------------------------


def note(what: str) -> None:
    """A statistic for ``pytest --hypothesis-show-statistics`` (hypothesis records them in the main thread only)."""
    if threading.current_thread() is threading.main_thread():
        event(what)


def timed(fn, *args, **kwargs):
    """(fn's result, seconds, whether math_verify ran); a worker killed on timeout is restarted outside the clock."""
    calls, killed = answers.stats["verify_calls"], answers.stats["verify_timeouts"] + answers.stats["verify_crashes"]
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    elapsed = time.perf_counter() - start
    verified = answers.stats["verify_calls"] != calls
    if answers.stats["verify_timeouts"] + answers.stats["verify_crashes"] != killed:
        answers_match("\\sqrt{4}", "2")  # the next call would pay for the restart: pay it here, untimed
    return result, elapsed, verified


def check_rewards(completion: str, gold: str, question: str, answer_format: str, slack: float = 0.0) -> None:
    """Every reward, called as TRL calls it, on the completion as a string and as chat messages.

    `slack`: extra seconds a call may wait, for a thread that shares the math_verify worker with another one.
    """
    chat = [{"role": "assistant", "content": completion}]
    note(f"completion length < 10^{len(str(len(completion)))}")
    for f in FUNCS[answer_format]:
        values, elapsed, verified = timed(f, [completion, chat], answer=[gold, gold], question=[question, question])
        if verified:
            note("reached math_verify")
        low, high = RANGES[f.__name__]
        assert len(values) == 2 and values[0] == values[1], (f.__name__, values)
        assert isinstance(values[0], float) and math.isfinite(values[0]) and low <= values[0] <= high, (
            f.__name__,
            values,
        )
        limit = 2 * (VERIFY_LIMIT_S if verified else CALL_LIMIT_S) + slack  # two completions per call
        assert elapsed < limit, (f.__name__, answer_format, f"{elapsed:.2f} s", completion[:80])


def check_extractors(text: str, slack: float = 0.0) -> None:
    for answer_format in ANSWER_FORMATS:
        found, elapsed, _ = timed(find_answers, text, answer_format)
        assert elapsed < CALL_LIMIT_S and all(0 <= s < e <= len(text) and isinstance(c, str) for s, e, c in found)
        strict, elapsed, _ = timed(extract_strict, text, answer_format)
        assert elapsed < CALL_LIMIT_S and (strict is None or strict in [c for _, _, c in found])
    flexible, elapsed, _ = timed(extract_flexible, text)
    assert elapsed < CALL_LIMIT_S and (flexible is None or flexible.lstrip("-").replace(".", "", 1).isdigit())
    value, elapsed, _ = timed(parse_number, text)
    assert elapsed < CALL_LIMIT_S and (value is None or isinstance(value, float) and math.isfinite(value))
    for pred in (text, strict, flexible):
        match, elapsed, verified = timed(answers_match, pred, "18")
        limit = (VERIFY_LIMIT_S if verified else CALL_LIMIT_S) + slack
        assert isinstance(match, bool) and elapsed < limit, (pred, elapsed)


@pytest.fixture(scope="module", autouse=True)
def math_verify_worker():
    """Start the math_verify child once, so that no timed call pays for its start-up."""
    assert answers_match("\\sqrt{4}", "2")


# --- never raises, always in range, always fast -------------------------------------------------------------------


@pytest.mark.parametrize("answer_format", ANSWER_FORMATS)
@fuzz(100)
@given(completion=COMPLETIONS, gold=GOLDS, question=QUESTIONS)
def test_every_reward_is_finite_in_range_and_fast(answer_format, completion, gold, question):
    check_rewards(completion, gold, question, answer_format)


@pytest.mark.parametrize("family", list(HOSTILE))
@fuzz(15)
@given(data=st.data(), template=TEMPLATES, question=QUESTIONS)
def test_every_reward_survives_hostile_text(family, data, template, question):
    completion = template.replace("{}", data.draw(HOSTILE[family], label=family))
    for answer_format in ANSWER_FORMATS:
        check_rewards(completion, "18", question, answer_format)


@fuzz(300)
@given(text=st.one_of(TEXT, COMPLETIONS))
def test_extractors_never_raise_and_are_fast(text):
    check_extractors(text)


@fuzz(25)
@given(completions=st.lists(st.one_of(LATEX, COMPLETIONS), min_size=2, max_size=2), gold=GOLDS)
def test_rewards_and_math_verify_are_bounded_in_worker_threads(completions, gold):
    """Two threads at once (TRL may score from a worker thread): math_verify's timeout must still hold there.
    A call may also wait for the other thread's math_verify call (and a restart of the worker) to finish."""
    wrapped = [f"<think>{c}</think>\n<answer>{c}</answer>" for c in completions]
    with ThreadPoolExecutor(2) as pool:
        jobs = [
            pool.submit(check_rewards, text, gold, JANET, fmt, VERIFY_LIMIT_S + RESTART_S)
            for text in wrapped
            for fmt in ("tags", "boxed")
        ]
        jobs += [pool.submit(check_extractors, text, VERIFY_LIMIT_S + RESTART_S) for text in completions]
        for job in jobs:
            job.result(timeout=120)


@fuzz(50)
@given(latex=LATEX)
def test_latex_answers_are_guarded_or_time_limited(latex):
    """LaTeX reaches math_verify only through the input guards, and a slow one is cut at VERIFY_TIMEOUT_S."""
    match, elapsed, verified = timed(answers_match, latex, "18")
    assert isinstance(match, bool) and elapsed < (VERIFY_LIMIT_S if verified else CALL_LIMIT_S), (latex, elapsed)
    if any(op in latex for op in ("^", "!", "\\sum", "\\prod", "\\int", "\\binom")) or len(latex) > 100:
        assert not verified  # the input guards keep power towers, factorials and big operators away from sympy


# --- properties the fixed examples cannot cover -------------------------------------------------------------------

MARKERLESS = st.text(max_size=300).filter(
    lambda s: not any(m in s for m in ("<answer>", "</answer>", "####", "\\boxed"))
)


@pytest.mark.parametrize("answer_format", ANSWER_FORMATS)
@fuzz(60)
@given(reasoning=MARKERLESS, gold=st.integers(-(10**12), 10**12))
def test_reference_rewritten_in_the_asked_format_is_correct_and_off_by_one_is_not(answer_format, reasoning, gold):
    correct, correct_pm1 = get_reward_funcs(["correct", "correct_pm1"], answer_format)
    completion = format_solution(reasoning, str(gold), answer_format)
    assert extract_strict(completion, answer_format) == str(gold)
    assert correct([completion], answer=[str(gold)]) == [1.0]
    assert correct([completion], answer=[str(gold + 1)]) == [0.0]
    assert correct_pm1([completion], answer=[str(gold + 1)]) == [-1.0]


@given(n=st.integers(-(10**15), 10**15), cents=st.integers(0, 99))
@fuzz(200)
def test_number_spellings_parse_to_the_same_value(n, cents):
    value = n + math.copysign(cents / 100, n) if n else cents / 100
    plain = f"{value:.2f}"
    for spelling in (
        plain,
        f"{value:,.2f}",
        f"${value:,.2f}".replace("$-", "-$"),
        plain.replace("-", "\u2212"),
        plain + " ",
        f" {plain}.",
    ):
        assert parse_number(spelling) == pytest.approx(float(plain), rel=1e-12), spelling
        assert answers_match(spelling, plain)


@pytest.mark.parametrize("answer_format", ANSWER_FORMATS)
@fuzz(80)
@given(
    values=st.lists(st.integers(-1000, 1000), min_size=2, max_size=30, unique=True),
    reasoning=MARKERLESS,
    data=st.data(),
)
def test_hedging_over_different_answers_never_earns_correctness(answer_format, values, reasoning, data):
    """However the gold hides among other answers (any position, any count), `correct` pays nothing."""
    gold = data.draw(st.sampled_from(values))
    marker = {"tags": "<answer>{}</answer>", "hash": "\n#### {}\n", "boxed": "\\boxed{{{}}}"}[answer_format]
    completion = reasoning + "\n" + " ".join(marker.format(v) for v in values)
    correct, correct_pm1 = get_reward_funcs(["correct", "correct_pm1"], answer_format)
    assert extract_strict(completion, answer_format) is None
    assert correct([completion], answer=[str(gold)]) == [0.0]
    assert correct_pm1([completion], answer=[str(gold)]) == [-1.0]


LINES = st.lists(
    st.one_of(
        st.builds(
            lambda a, op, b, c: f"{a} {op} {b} = {c}",
            st.integers(0, 200),
            st.sampled_from("+-*/x"),
            st.integers(1, 200),
            st.integers(-100, 40_000),
        ),
        st.builds(lambda a, b: f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}", st.integers(0, 999), st.integers(0, 999)),
        MARKERLESS,
    ),
    min_size=1,
    max_size=12,
).map("\n".join)


@pytest.mark.parametrize("answer_format", ANSWER_FORMATS)
@fuzz(40)
@given(lines=LINES, copies=st.integers(2, 30), question=st.one_of(st.just(JANET), LINES))
def test_repeating_a_completion_never_raises_any_reward(answer_format, lines, copies, question):
    """The farming the notebook allowed: repeated text may lose reward, never gain it (penalties included)."""
    completion = format_solution(lines, "18", answer_format)
    repeated = "\n".join([completion] * copies)
    for f in FUNCS[answer_format]:
        once = f([completion], answer=["18"], question=[question])[0]
        many = f([repeated], answer=["18"], question=[question])[0]
        assert many <= once, (f.__name__, once, many)


@st.composite
def derivation(draw):
    """(question, lines): true `a op b = c` lines, some with digits added to the result (wrong, true prefix)."""
    rows = draw(
        st.lists(
            st.tuples(
                st.integers(3, 999),
                st.sampled_from("+*"),
                st.integers(3, 999),
                st.sampled_from(["", "", "0", "5", ".5"]),
            ),
            min_size=1,
            max_size=8,
        )
    )
    lines = [f"{a} {op} {b} = {a + b if op == '+' else a * b}{extra}" for a, op, b, extra in rows]
    return " ".join(f"{a} and {b}" for a, _, b, _ in rows), "\n".join(lines)


@fuzz(60)
@given(problem=derivation(), data=st.data())
def test_the_length_cut_never_turns_a_wrong_line_into_a_true_one(problem, data):
    """Steps are read from the first MAX_STEP_CHARS characters; wherever that cut falls, it removes whole lines,
    so it can only lower the step count (it once cut "10 + 5 = 150" to a verified "10 + 5 = 15")."""
    question, lines = problem
    kept = data.draw(st.integers(0, len(lines)), label="characters of the lines before the cut")
    padded = "a" * (MAX_STEP_CHARS - kept - 1) + "\n" + lines
    for f in get_reward_funcs(["steps_count", "numbers_used"]):
        assert f([padded], answer=["1"], question=[question]) <= f([lines], answer=["1"], question=[question])


@fuzz(40)
@given(question=st.one_of(st.just(JANET), PROSE))
def test_copying_the_question_earns_no_steps_and_no_correctness(question):
    """Pasting the question (one without equations or answer markers) earns no step or correctness credit."""
    for answer_format in ANSWER_FORMATS:
        for f in get_reward_funcs(["correct", "steps", "steps_count", "numbers_used"], answer_format):
            assert f([question], answer=["18"], question=[question])[0] <= 0.0, f.__name__
