"""Gold check of the rewards on GSM8K reference solutions (a report, not a test; tests/test_rewards.py asserts it).

Every reference solution of a split is rewritten into the tags format (``data.format_solution``) and scored:
``correct`` must be 1 for all and 0 for all with the gold answer changed; the ``steps`` distribution is printed,
with the annotations (``<<a op b=c>>``) that do not verify.

    python bench/gold_check.py [--split test] [--strip_annotations]
"""

import argparse
from collections import Counter

from common import GSM8K_DIR

from grpo_math.data import format_solution, load_problems
from grpo_math.rewards import find_steps, get_reward_funcs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default=GSM8K_DIR)
    parser.add_argument("--split", default="test")
    parser.add_argument("--strip_annotations", action="store_true", help="remove <<...>> as models write")
    args = parser.parse_args()
    problems = load_problems(str(args.data_dir), args.split)
    texts = [format_solution(p.solution, p.answer, "tags", not args.strip_annotations) for p in problems]
    wrong = [
        t.replace(f"<answer>{p.answer}</answer>", f"<answer>{p.answer}1</answer>") for t, p in zip(texts, problems)
    ]
    kwargs = {"answer": [p.answer for p in problems], "question": [p.question for p in problems]}
    correct, steps = (f(texts, **kwargs) for f in get_reward_funcs(["correct", "steps"]))
    print(
        f"{len(problems)} {args.split} references: correct = 1 for {sum(correct):.0f}, "
        f"correct with the answer changed = 1 for {sum(get_reward_funcs(['correct'])[0](wrong, **kwargs)):.0f}"
    )
    print(
        f"steps: mean {sum(steps) / len(steps):.3f}; distribution "
        + ", ".join(f"{v:.2f}: {n}" for v, n in sorted(Counter(round(s, 2) for s in steps).items()))
    )
    failing = [
        (p.where, line)
        for p in problems
        for line in p.solution.splitlines()
        if any(not s.ok for s in find_steps(line))
    ]
    print(f"reference lines with an equation that does not verify: {len(failing)}")
    for where, line in failing[:60]:
        print(f"  {where}: {line.strip()[:110]}")
    empty = sum(
        1 for s, p in zip(steps, problems) if s == 0 and not any(x.ok is False for x in find_steps(p.solution))
    )
    print(
        f"references with steps = 0 and no false line (nothing countable: algebra, world-knowledge numbers, "
        f"only 0/1/2 operands): {empty}"
    )


if __name__ == "__main__":
    main()
