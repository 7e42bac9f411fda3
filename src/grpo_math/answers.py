"""Find the final answer in a completion and decide whether it equals the gold number.

One extractor serves both the training reward (`rewards.correct`) and the reported accuracy, so the
two cannot drift apart.

Rules, chosen so that a policy cannot collect credit without answering:

* Strict extraction (`extract_strict`) reads only the asked format: `<answer>N</answer>` ("tags"),
  a `#### N` line ("hash") or `\\boxed{N}` ("boxed"). When several markers hold different answers the
  result is None: hedging over many answers earns nothing. Repeating the same answer is allowed here;
  the format rewards penalise it.
* Numbers (`parse_number`) are plain decimals in ASCII digits: an optional sign (the Unicode minus
  too), thousands commas in groups of three, a decimal part, a simple fraction `a/b` or
  `\\frac{a}{b}`. `$`, `\\$`, `%` and `\\%` are units and are dropped, so `50%` reads as 50 (GSM8K
  writes percentages that way), not 0.5. Exponents, scientific notation, `inf`/`nan`, non-ASCII
  digits and strings longer than `MAX_ANSWER_CHARS` are not numbers.
* Only LaTeX that `parse_number` cannot read (`\\sqrt{16}`, `18 \\text{ dollars}`) goes to math_verify,
  and only after input guards (length, no powers, factorials or big operators, shallow braces). It
  runs in one spawned child process that is killed after `VERIFY_TIMEOUT_S`; math_verify's own
  timeout uses signals, which do nothing outside the main thread. `stats` counts these calls.
"""

from __future__ import annotations

import math
import multiprocessing
import re
import threading
from collections import Counter

from . import UserError

ANSWER_FORMATS = ("tags", "hash", "boxed")
MAX_ANSWER_CHARS = 100
VERIFY_TIMEOUT_S = 2.0
VERIFY_START_TIMEOUT_S = 120.0
REL_TOL = 1e-15  # float rounding of a fraction (3/4 vs 0.75) only: distinct integers below 10^15 never match

stats: Counter[str] = Counter()  # math_verify fallback: "verify_calls", "verify_timeouts", "verify_crashes"

_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_PLAIN = re.compile(rf"([-+]?)({_NUM})(?:/({_NUM}))?", re.ASCII)
_FRAC = re.compile(rf"([-+]?)\\[dt]?frac\{{({_NUM})\}}\{{({_NUM})\}}", re.ASCII)
_UNITS = re.compile(r"\\?\$|\\[!,;]|\\?%\.?$|\.$")
_FLEXIBLE = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?", re.ASCII)
_BRACE = re.compile(r"[{}]")
_HASH = re.compile(r"####[ \t]*([^\n]*)")
_RISKY = re.compile(r"\^|\*\*|!|\\(?:binom|choose|sum|prod|int|lim|infty)")


def check_answer_format(answer_format: str) -> None:
    """Raise a ``UserError`` (a ``ValueError``) naming the valid formats unless `answer_format` is one of them; the
    one check that config, data, rewards and extraction share.

    >>> check_answer_format("tags")
    >>> check_answer_format("xml")
    Traceback (most recent call last):
    grpo_math.UserError: unknown answer_format 'xml'; valid: tags, hash, boxed
    """
    if answer_format not in ANSWER_FORMATS:
        raise UserError(f"unknown answer_format {answer_format!r}; valid: {', '.join(ANSWER_FORMATS)}")


def parse_number(text: str) -> float | None:
    """Value of a plain number (see the module rules), or None when `text` is anything else.

    >>> [parse_number(s) for s in ["42", "$1,000.50", "\\u22123", "3/4", "\\\\frac{3}{4}", "50%", "1e3"]]
    [42.0, 1000.5, -3.0, 0.75, 0.75, 50.0, None]
    """
    if len(text) > MAX_ANSWER_CHARS:
        return None
    s = _UNITS.sub("", text.strip().replace("\u2212", "-").replace("{,}", ",")).strip()
    m = _PLAIN.fullmatch(s) or _FRAC.fullmatch(s)
    if m is None:
        return None
    sign, num, den = m.groups()
    value = float(num.replace(",", ""))
    if den is not None:
        d = float(den.replace(",", ""))
        if d == 0:
            return None
        value /= d
    value = -value if sign == "-" else value
    return value if math.isfinite(value) else None


def find_answers(text: str, answer_format: str = "tags") -> list[tuple[int, int, str]]:
    """Every answer marker of the format in `text`, as (start, end, stripped content), in order.

    Unclosed markers are skipped. Linear in the length of `text`, whatever it holds.

    >>> find_answers("<think>2+2=4</think>\\n<answer> 4 </answer>")
    [(21, 41, '4')]
    >>> [c for _, _, c in find_answers("so \\\\boxed{\\\\frac{1}{2}} and #### 7", "boxed")]
    ['\\\\frac{1}{2}']
    """
    check_answer_format(answer_format)
    found = []
    if answer_format == "hash":
        return [(m.start(), m.end(), m.group(1).strip()) for m in _HASH.finditer(text)]
    if answer_format == "tags":
        i = 0
        while (start := text.find("<answer>", i)) != -1:
            end = text.find("</answer>", start)
            if end == -1:
                break
            found.append((start, end + 9, text[start + 8 : end].strip()))
            i = end + 9
        return found
    opens = [m.end() - 1 for m in re.finditer(r"\\boxed\{", text)]  # positions of the "{"
    close, stack = {}, []
    for m in _BRACE.finditer(text, opens[0] if opens else len(text)):  # one pass matches every brace
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            close[stack.pop()] = m.start()
    end = 0
    for i in opens:
        if i > end and i in close:  # a \boxed nested inside the previous one is part of its content
            found.append((i - 6, close[i] + 1, text[i + 1 : close[i]].strip()))
            end = close[i]
    return found


def answer_closed(text: str, answer_format: str = "tags") -> bool:
    """Whether `text` already holds a complete answer marker: where generation may stop (`AnswerStop`).

    A `#### N` line counts once its line ends. A stray `</answer>` with no `<answer>` before it does not count.

    >>> answer_closed("<think>2+2=4</think>\\n<answer>4"), answer_closed("<think>2+2=4</think>\\n<answer>4</answer>")
    (False, True)
    >>> answer_closed("#### 4", "hash"), answer_closed("#### 4\\n", "hash"), answer_closed("</answer>")
    (False, True, False)
    """
    if answer_format == "hash":
        return any(text[end : end + 1] == "\n" for _, end, _ in find_answers(text, "hash"))
    return bool(find_answers(text, answer_format))


def _same(a: str, b: str) -> bool:
    x, y = parse_number(a), parse_number(b)
    return math.isclose(x, y, rel_tol=REL_TOL, abs_tol=1e-9) if x is not None and y is not None else a == b


def extract_strict(text: str, answer_format: str = "tags") -> str | None:
    """The answer written in the asked format; None when missing or when several markers disagree.

    >>> extract_strict("<think>48/2=24</think>\\n<answer>24</answer>")
    '24'
    >>> extract_strict("<answer>24</answer> or maybe <answer>25</answer>") is None
    True
    >>> extract_strict("Half of 48 is 24.\\n#### 24", "hash"), extract_strict("so $\\\\boxed{24}$", "boxed")
    ('24', '24')
    """
    answers = [content for _, _, content in find_answers(text, answer_format)]
    if not answers or any(not _same(a, answers[0]) for a in answers[1:]):
        return None
    return answers[0]


def extract_flexible(text: str) -> str | None:
    """The last number anywhere in `text`, with `$` and thousands commas removed (GSM8K "flexible").

    >>> extract_flexible("She pays $1,200 in total. Next year: 5.")
    '5'
    >>> extract_flexible("The loss is -3.5 dollars"), extract_flexible("no digits") is None
    ('-3.5', True)
    """
    matches = _FLEXIBLE.findall(text)
    return matches[-1].replace("$", "").replace(",", "") if matches else None


def gold_from_solution(text: str) -> str:
    """The gold number after the last `####` of a GSM8K solution, without commas or `$`.

    >>> gold_from_solution("5 - 8 = <<5-8=-3>>-3\\n#### -3"), gold_from_solution("#### $1,200")
    ('-3', '1200')
    """
    if "####" not in text:
        raise ValueError(f"GSM8K solution has no '####' line: ...{text[-80:]!r}")
    raw = text.rsplit("####", 1)[1].strip()
    gold = raw.replace(",", "").replace("$", "")
    if "/" in gold or parse_number(gold) is None:
        raise ValueError(f"GSM8K solution's '####' is not followed by a plain number: {raw!r}")
    return gold


def split_solution(text: str) -> tuple[str, str]:
    """(reasoning without the `####` line, gold number) of a GSM8K solution.

    >>> split_solution("Half of 48 is 48/2=<<48/2=24>>24\\n#### 24")
    ('Half of 48 is 48/2=<<48/2=24>>24', '24')
    """
    return text.rsplit("####", 1)[0].rstrip(), gold_from_solution(text)


def _verifiable(s: str) -> bool:
    """Input guards for math_verify: short, plain or LaTeX, no operators that can explode in sympy."""
    if parse_number(s) is not None:
        return True
    if len(s) > MAX_ANSWER_CHARS or "\\" not in s or _RISKY.search(s):
        return False
    depth = deepest = 0
    for ch in s:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        deepest = max(deepest, depth)
    return deepest <= 4


def answers_match(pred: str | None, gold: str | None) -> bool:
    """Whether `pred` and `gold` are the same number; math_verify (bounded in time) only for LaTeX.

    >>> answers_match("42", "42.0"), answers_match("$1,000", "1000"), answers_match("3/4", "0.75")
    (True, True, True)
    >>> answers_match("41", "42"), answers_match(None, "42"), answers_match("9^9^9^9^9", "1")
    (False, False, False)
    """
    if pred is None or gold is None:
        return False
    p, g = parse_number(pred), parse_number(gold)
    if p is not None and g is not None:
        return math.isclose(p, g, rel_tol=REL_TOL, abs_tol=1e-9)
    if not (_verifiable(pred) and _verifiable(gold)):
        return False
    return _SANDBOX.verify(pred, gold)


def _serve(conn) -> None:  # runs in the child process
    from math_verify import parse, verify

    verify(parse("$1$"), parse("$\\frac{2}{2}$"))  # warm up sympy's lazy imports before saying ready
    conn.send("ready")
    while True:
        try:
            pred, gold = conn.recv()
        except EOFError:
            return
        conn.send(bool(verify(parse(f"${gold.strip('$')}$"), parse(f"${pred.strip('$')}$"))))


class _Sandbox:
    """One spawned math_verify worker; killed (and restarted on the next call) when it overruns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork: the trainer runs threads and CUDA
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), daemon=True, name="grpo-math-verify")
        self._proc.start()
        child.close()
        if not self._conn.poll(VERIFY_START_TIMEOUT_S):
            self._stop()
            raise RuntimeError(f"math_verify worker did not start within {VERIFY_START_TIMEOUT_S} s")
        try:
            self._conn.recv()
        except EOFError:  # it died while starting: its traceback is on stderr above
            proc = self._proc
            self._stop()
            raise RuntimeError(
                f"math_verify worker exited while starting (exit code {proc.exitcode}, its error is "
                "above); a script that scores answers needs an `if __name__ == '__main__':` guard "
                "(the worker is spawned and re-imports the main module)"
            ) from None

    def _stop(self) -> None:
        self._proc.kill()
        self._proc.join()
        self._conn.close()
        self._proc = self._conn = None

    def verify(self, pred: str, gold: str, timeout: float = VERIFY_TIMEOUT_S) -> bool:
        with self._lock:
            if self._proc is None:
                self._start()
            stats["verify_calls"] += 1
            try:
                self._conn.send((pred, gold))
                if self._conn.poll(timeout):
                    return self._conn.recv()
                stats["verify_timeouts"] += 1
            except (EOFError, BrokenPipeError):  # the worker died (e.g. out of memory)
                stats["verify_crashes"] += 1
            self._stop()
            return False


_SANDBOX = _Sandbox()
