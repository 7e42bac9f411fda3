"""Benchmark (not a test): seconds per 100 completions for every reward, on one CPU core.

Scores 1,000 completions built from the GSM8K test set the way TRL's GRPOTrainer calls the rewards (chat
messages, batches of 16, dataset columns as keyword arguments):

* 800 reference solutions rewritten into the asked format with ``data.format_solution`` (half keep the
  ``<<a*b=c>>`` annotations, half drop them),
* 100 wrong ones (the answer and one result changed),
* 100 hostile ones cycling through the exploits of tests/test_rewards.py: the solution repeated, many answer
  markers, every number 0..1000, a power tower, deep nesting, a 100k-character line, LaTeX answers that go to
  math_verify, the bare answer, a copy of the question.

Each reward is timed alone (the step analysis cache that ``steps``, ``steps_count`` and ``numbers_used`` share is
cleared first), then all of them in sequence as one training step would call them (the cache shared). The best of
``--repeat`` runs is printed, which is what the machine can do when nothing else competes for the core. The
math_verify worker is started before timing (training pays that once per process, ~1 s).

    python bench/rewards.py                      # 1,000 completions, tags format, pinned to one core
    python bench/rewards.py --answer_format boxed --repeat 5

GSM8K files: ``$GRPO_MATH_GSM8K_DIR`` or ``../shared/data/gsm8k`` next to the project (``--data_dir``).
"""

from __future__ import annotations

import argparse
import os
import time

from common import GSM8K_DIR

from grpo_math import answers, rewards
from grpo_math.answers import ANSWER_FORMATS, answers_match
from grpo_math.data import Problem, format_solution, load_problems
from grpo_math.rewards import REWARDS, get_reward_funcs

BATCH = 16  # completions per reward call (TRL calls each reward once per generation batch)


def hostile(p: Problem, i: int, answer_format: str) -> str:
    """The i-th exploit (cycling) for problem p, in the asked format where it has one."""
    good = format_solution(p.solution, p.answer, answer_format)
    wrap = {"tags": "<answer>{}</answer>", "hash": "\n#### {}", "boxed": "\\boxed{{{}}}"}[answer_format]
    kinds = [
        lambda: "\n".join([good] * 20),
        lambda: good + "".join(wrap.format(n) for n in range(50)),
        lambda: " ".join(str(n) for n in range(1001)),
        lambda: wrap.format("^".join(["9"] * 50)),
        lambda: "(" * 5000 + "1 + 1" + ")" * 5000 + " = 2" + wrap.format(p.answer),
        lambda: "1+" * 50_000 + "1 = 2",
        lambda: format_solution(p.solution, f"\\sqrt{{{p.answer}}}", answer_format),  # math_verify
        lambda: format_solution(p.solution, f"{p.answer} \\text{{ dollars}}", answer_format),  # math_verify
        lambda: wrap.format(p.answer),
        lambda: p.question,
    ]
    return kinds[i % len(kinds)]()


def build(problems: list[Problem], n: int, answer_format: str) -> list[dict]:
    """n rows of {completion, answer, question}: 80% references, 10% wrong, 10% hostile."""
    rows = []
    for i in range(n):
        p = problems[i % len(problems)]
        kind = i % 10
        if kind < 8:
            text = format_solution(p.solution, p.answer, answer_format, keep_annotations=kind % 2 == 0)
        elif kind == 8:
            wrong = str(int(float(p.answer)) + 1)
            text = format_solution(p.solution.replace(p.answer, wrong), wrong, answer_format)
        else:
            text = hostile(p, i // 10, answer_format)
        rows.append(
            {"completion": [{"role": "assistant", "content": text}], "answer": p.answer, "question": p.question}
        )
    return rows


def best_time(funcs, rows: list[dict], repeat: int, shared_cache: bool) -> float:
    """Best of `repeat` runs: seconds to score rows with funcs, in turn and in TRL's batches.

    Without shared_cache each reward starts with the step-analysis cache cleared, so its time is its own.
    """
    times = []
    for _ in range(repeat):
        rewards._analyse.cache_clear()
        elapsed = 0.0
        for f in funcs:
            if not shared_cache:
                rewards._analyse.cache_clear()
            start = time.perf_counter()
            for i in range(0, len(rows), BATCH):
                batch = rows[i : i + BATCH]
                f(
                    [r["completion"] for r in batch],
                    answer=[r["answer"] for r in batch],
                    question=[r["question"] for r in batch],
                )
            elapsed += time.perf_counter() - start
        times.append(elapsed)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="completions to score")
    parser.add_argument("--answer_format", default="tags", choices=ANSWER_FORMATS)
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is printed")
    parser.add_argument("--cpu", type=int, help="core to pin to (default: the first one this process may use)")
    parser.add_argument(
        "--data_dir",
        help="folder with GSM8K's test.jsonl",
        default=GSM8K_DIR,
    )
    args = parser.parse_args()
    where = "unpinned"
    if hasattr(os, "sched_setaffinity"):  # one core, for this process and the math_verify worker it spawns
        os.sched_setaffinity(0, {args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))})
        where = f"pinned to core {min(os.sched_getaffinity(0))}"
    problems = load_problems(str(args.data_dir), split="test")
    rows = build(problems, args.n, args.answer_format)
    chars = sum(len(r["completion"][0]["content"]) for r in rows) / len(rows)
    assert answers_match("\\sqrt{4}", "2")  # start the math_verify worker outside the clock
    calls = answers.stats["verify_calls"]
    best_time(get_reward_funcs(["correct"], args.answer_format), rows, 1, shared_cache=False)  # one untimed pass
    hits = answers.stats["verify_calls"] - calls

    per_100 = 100 / len(rows)
    print(
        f"{len(rows)} completions ({args.answer_format}, {chars:,.0f} chars on average, {hits} reach math_verify), "
        f"{where}, best of {args.repeat}, batches of {BATCH}"
    )
    print(f"{'reward':<16} {'s / 100 completions':>20}")
    for name in REWARDS:
        seconds = best_time(get_reward_funcs([name], args.answer_format), rows, args.repeat, shared_cache=False)
        print(f"{name:<16} {seconds * per_100:>20.4f}")
    for label, names in [("all, in turn", list(REWARDS)), ("default preset", list(rewards.PRESETS["default"]))]:
        seconds = best_time(get_reward_funcs(names, args.answer_format), rows, args.repeat, shared_cache=True)
        print(f"{label:<16} {seconds * per_100:>20.4f}   ({', '.join(names)})")
    every = get_reward_funcs(list(REWARDS), args.answer_format)
    for kind, part in [("reference", range(0, 8)), ("wrong", range(8, 9)), ("hostile", range(9, 10))]:
        subset = [r for i, r in enumerate(rows) if i % 10 in part]
        seconds = best_time(every, subset, args.repeat, shared_cache=True)
        print(
            f"  {kind + ' only':<14} {seconds * 100 / len(subset):>20.4f}   (all rewards, {len(subset)} completions)"
        )
    print(f"math_verify timeouts: {answers.stats['verify_timeouts']}")
    return 0


if __name__ == "__main__":  # the math_verify worker is spawned: this module must not start it on import
    raise SystemExit(main())
