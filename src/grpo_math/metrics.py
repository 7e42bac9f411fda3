"""Evaluation metrics, no torch: per-problem scoring, accuracies, pass@k / maj@k, Wilson intervals, the sign test,
and lm-evaluation-harness's GSM8K extractions.

Metrics (``results.json`` ``metrics``; each is the mean over problems of the per-problem value stored in
``samples.jsonl`` ``scores``, which is what ``compare`` tests pairwise):

* ``strict_accuracy``: answer in the asked format and correct; ``flexible_accuracy``: last number correct;
  ``format_rate``: an answer could be read in the asked format (one marker, or several that agree);
  ``truncation_rate``: stopped by ``max_new_tokens`` before EOS; ``mean_completion_tokens``.
* ``lm_eval_strict`` / ``lm_eval_flexible``: lm-evaluation-harness's gsm8k "strict-match" (first
  ``#### N``) and "flexible-extract" (last number-like match) filters with its exact-match normalisation,
  on the same outputs (cut at its stop sequences), so numbers compare with published ones. Strict-match
  only fires on ``####`` lines, i.e. with ``answer_format: hash``.
* With ``--samples K`` (K > 1, temperature > 0), on strict correctness: ``pass@k`` (unbiased estimator of
  Chen et al. 2021, k = 2, 4, ..., K), ``maj@K`` (majority vote over the strict answers) and ``mean@K``
  (mean correctness = pass@1 = strict_accuracy). The other rates are then means over all K*N completions.
* ``reward`` and ``reward/<name>``: the recipe's reward parts averaged (``samples.jsonl`` keeps them per
  completion).

``ci95`` holds a 95% Wilson interval for every rate, with n = number of problems (exact for one sample per
problem; conservative for averages over K samples, which vary less than a 0/1 outcome with the same mean).

>>> wilson(8, 10)
(0.4902, 0.9433)
>>> pass_at_k(n=5, c=2, k=2), lm_eval_extract("so 7 + 8 = 15.\\n#### 15", "strict")
(0.7, '15')
"""

from __future__ import annotations

import math
import re
from collections import Counter
from math import comb

from . import UserError
from .answers import answers_match, extract_flexible, extract_strict, parse_number

# lm-evaluation-harness lm_eval/tasks/gsm8k/gsm8k.yaml (version 3.0): filters, exact_match settings, stop sequences.
LM_EVAL_REGEX = {"strict": re.compile(r"#### (\-?[0-9\.\,]+)"), "flexible": re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")}
LM_EVAL_TAKE = {"strict": 0, "flexible": -1}  # group_select: first match / last match
LM_EVAL_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")  # regexes_to_ignore, then ignore_case
LM_EVAL_UNTIL = ("Question:", "</s>", "<|im_end|>")

CORRECTNESS = ("strict", "flexible", "lm_eval_strict", "lm_eval_flexible")
ACCURACY_KEY = {
    "strict": "strict_accuracy",
    "flexible": "flexible_accuracy",
    "lm_eval_strict": "lm_eval_strict",
    "lm_eval_flexible": "lm_eval_flexible",
}
NOT_RATES = ("mean_completion_tokens", "reward")


# ---- statistics ------------------------------------------------------------------------------------------


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (rounded to 4 places); (0, 1) when n is 0."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (round(max(0.0, center - half), 4), round(min(1.0, center + half), 4))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test (McNemar's exact test when the pairs are 0/1 outcomes).

    >>> sign_test(0, 0), round(sign_test(1, 9), 4)
    (1.0, 0.0215)
    """
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def majority(answers: list[str | None]) -> str | None:
    """The most frequent answer (numbers compared by value; ties go to the earliest); None when none given.

    >>> majority(["12", None, "12.0", "7", "7"])
    '12'
    """
    first, votes = {}, Counter()
    for answer in answers:
        if answer is not None:
            value = parse_number(answer)
            key = ("number", round(value, 6)) if value is not None else ("text", answer.strip())
            first.setdefault(key, answer)
            votes[key] += 1
    return first[max(votes, key=votes.get)] if votes else None


# ---- lm-evaluation-harness gsm8k ----------------------------------------------------------------------


def lm_eval_extract(text: str, mode: str) -> str | None:
    """What lm-eval's gsm8k filter keeps: "strict" = first ``#### N``, "flexible" = last number-like match.

    None where lm-eval would keep "[invalid]".

    >>> lm_eval_extract("She has 3 apples, so $1,200.", "flexible"), lm_eval_extract("no answer", "strict")
    ('$1,200.', None)
    """
    for stop in LM_EVAL_UNTIL:
        text = text.split(stop, 1)[0]
    matches = LM_EVAL_REGEX[mode].findall(text)
    if not matches:
        return None
    match = matches[LM_EVAL_TAKE[mode]]
    if isinstance(match, tuple):
        match = [group for group in match if group][0]
    return match.strip()


def lm_eval_normalize(text: str) -> str:
    """lm-eval's exact_match preprocessing for gsm8k (applied to prediction and reference alike).

    >>> lm_eval_normalize("$1,200."), lm_eval_normalize("48/2 = <<48/2=24>>24\\n#### 24")
    ('1200', '24')
    """
    for pattern in LM_EVAL_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def lm_eval_correct(pred: str | None, gold: str) -> bool:
    """lm-eval's exact match of a filtered prediction against the gold answer (string equality)."""
    return pred is not None and lm_eval_normalize(pred) == lm_eval_normalize(gold)


# ---- scoring ---------------------------------------------------------------------------------------------


def score_completion(text: str, gold: str, answer_format: str) -> dict:
    """Extracted answers and their correctness for one completion, under all four extractions.

    >>> c = score_completion("<think>6*4 = 24</think>\\n<answer>24</answer>", "24", "tags")
    >>> c["answers"]["strict"], c["correct"]
    ('24', {'strict': True, 'flexible': True, 'lm_eval_strict': False, 'lm_eval_flexible': True})
    """
    answers = {
        "strict": extract_strict(text, answer_format),
        "flexible": extract_flexible(text),
        "lm_eval_strict": lm_eval_extract(text, "strict"),
        "lm_eval_flexible": lm_eval_extract(text, "flexible"),
    }
    correct = {name: answers_match(answers[name], gold) for name in ("strict", "flexible")}
    correct.update({name: lm_eval_correct(answers[name], gold) for name in ("lm_eval_strict", "lm_eval_flexible")})
    return {"answers": answers, "correct": correct}


def score_problem(
    index: int, problem, outputs: list[dict], answer_format: str, reward_funcs=None, reward_weights=None
) -> dict:
    """One ``samples.jsonl`` record: the problem, its completions (answers, correctness, reward parts), scores.

    ``outputs`` are ``models.generate``'s dicts ``{"text", "tokens", "truncated"}`` for this problem.
    """
    completions = [{**out, **score_completion(out["text"], problem.answer, answer_format)} for out in outputs]
    if reward_funcs:
        from .rewards import score_rows

        rows = [
            {
                "question": problem.question,
                "answer": problem.answer,
                "solution": problem.solution,
                "completion": out["text"],
            }
            for out in outputs
        ]
        try:
            scored = score_rows(rows, reward_funcs, reward_weights, answer_format)
        except ValueError as err:  # unknown reward name, weights of the wrong length
            raise UserError(str(err)) from None
        for completion, result in zip(completions, scored):
            completion["reward"], completion["rewards"] = result["total"], result["parts"]
    record = {
        "index": index,
        "question": problem.question,
        "gold": problem.answer,
        "where": problem.where,
        "completions": completions,
    }
    if len(completions) > 1:
        record["majority"] = majority([c["answers"]["strict"] for c in completions])
    record["scores"] = problem_scores(record)
    return record


def problem_scores(record: dict) -> dict:
    """Per-problem values whose mean over problems is each metric (so ``compare`` can pair them)."""
    completions, k = record["completions"], len(record["completions"])

    def mean(values) -> float:
        return sum(values) / k

    scores = {ACCURACY_KEY[name]: mean(c["correct"][name] for c in completions) for name in CORRECTNESS}
    scores["format_rate"] = mean(c["answers"]["strict"] is not None for c in completions)
    scores["truncation_rate"] = mean(c["truncated"] for c in completions)
    scores["mean_completion_tokens"] = mean(c["tokens"] for c in completions)
    if k > 1:
        correct = sum(c["correct"]["strict"] for c in completions)
        for j in sorted({*(2**i for i in range(1, k.bit_length()) if 2**i < k), k}):
            scores[f"pass@{j}"] = pass_at_k(k, correct, j)
        scores[f"maj@{k}"] = float(answers_match(record["majority"], record["gold"]))
        scores[f"mean@{k}"] = correct / k
    if "rewards" in completions[0]:
        scores["reward"] = mean(c["reward"] for c in completions)
        for name in completions[0]["rewards"]:
            scores[f"reward/{name}"] = mean(c["rewards"][name] for c in completions)
    return {key: float(value) for key, value in scores.items()}


def summarize(records: list[dict]) -> tuple[dict, dict]:
    """``(metrics, ci95)``: means of the per-problem scores and a Wilson interval for every rate."""
    n = len(records)
    if n == 0:
        raise UserError("no problems were evaluated")
    metrics = {key: round(sum(r["scores"][key] for r in records) / n, 6) for key in records[0]["scores"]}
    ci = {key: wilson(value * n, n) for key, value in metrics.items() if is_rate(key)}
    return metrics, ci


def is_rate(metric: str) -> bool:
    """Whether a metric is a proportion in [0, 1] (those get confidence intervals and are shown in %)."""
    return not metric.startswith(NOT_RATES)


def format_value(metric: str, value, sign: bool = False) -> str:
    """A metric as printed everywhere (eval, compare, report): rates in percent with one decimal, other values with
    3 significant digits; ``sign`` for differences.

    >>> format_value("strict_accuracy", 0.0467), format_value("reward", 0.27512), format_value("reward", None)
    ('4.7%', '0.275', '-')
    >>> format_value("flexible_accuracy", 0.0123, sign=True)
    '+1.2%'
    """
    if value is None:
        return "-"
    plus = "+" if sign else ""
    return f"{100 * value:{plus}.1f}%" if is_rate(metric) else f"{value:{plus}.3g}"
