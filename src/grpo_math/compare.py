"""``grpo-math compare``: two evaluations side by side, with a paired exact test on the problems they share.

Problems are matched by index and question; each metric gets an exact two-sided sign test on its per-problem
values (for 0/1 outcomes, McNemar's exact test on the discordant pairs), and the problems whose value changed
are listed. A problem set that repeats questions (a gym task's test split keeps the generator's repeats) counts a
question once per copy; ``--distinct`` pairs the first copy of each question only (the A/B columns then average
over those), and without it the repeats are counted in a warning.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import ArgumentParser, UserError
from .metrics import format_value, sign_test
from .runfiles import load_results

ALPHA = 0.05


def paired_interval(differences: list[float], z: float = 1.96) -> list[float] | None:
    """95% interval of the mean paired difference B - A (normal approximation over problems; for 0/1 outcomes
    the Wald interval for paired proportions), None without pairs.

    >>> paired_interval([1.0] * 24 + [-1.0] * 20 + [0.0] * 1275)  # GSM8K, 24 gained, 20 lost of 1,319
    [-0.006827, 0.012892]
    """
    n = len(differences)
    if not n:
        return None
    mean = sum(differences) / n
    spread = z * math.sqrt(sum((d - mean) ** 2 for d in differences) / max(n - 1, 1) / n)
    return [round(mean - spread, 6), round(mean + spread, 6)]


def compare_results(a, b, flip_metric: str = "strict_accuracy", distinct: bool = False) -> dict:
    """Every metric of two eval folders side by side with a paired exact test on the shared problems (with
    ``distinct``, on the first copy of each question only)."""
    (results_a, records_a), (results_b, records_b) = load_results(a), load_results(b)
    if flip_metric not in results_a["metrics"] and flip_metric not in results_b["metrics"]:
        raise UserError(f"unknown metric '{flip_metric}'; valid: {', '.join(results_a['metrics'])}")
    by_key_b = {(r["index"], r["question"]): r for r in records_b}
    pairs = [(r, by_key_b[(r["index"], r["question"])]) for r in records_a if (r["index"], r["question"]) in by_key_b]
    firsts = list({ra["question"]: (ra, rb) for ra, rb in reversed(pairs)}.values())[::-1]
    repeats, pairs = len(pairs) - len(firsts), firsts if distinct else pairs
    rows = []
    for metric in dict.fromkeys([*results_a["metrics"], *results_b["metrics"]]):
        value_a, value_b = results_a["metrics"].get(metric), results_b["metrics"].get(metric)
        paired = [
            (ra["scores"][metric], rb["scores"][metric])
            for ra, rb in pairs
            if metric in ra["scores"] and metric in rb["scores"]
        ]
        if distinct and paired:
            value_a, value_b = (round(sum(v) / len(paired), 6) for v in zip(*paired))
        b_better = sum(y > x for x, y in paired)
        a_better = sum(x > y for x, y in paired)
        p = sign_test(b_better, a_better) if paired else None
        differences = [y - x for x, y in paired]
        rows.append(
            {
                "metric": metric,
                "a": value_a,
                "b": value_b,
                "difference": None if value_a is None or value_b is None else round(value_b - value_a, 6),
                "paired_problems": len(paired),
                "difference_ci95": paired_interval(differences),
                "b_better": b_better,
                "a_better": a_better,
                "p_value": p,
                "significant": p is not None and p < ALPHA,
            }
        )
    flips = [
        {
            "index": ra["index"],
            "question": ra["question"],
            "a": ra["scores"][flip_metric],
            "b": rb["scores"][flip_metric],
        }
        for ra, rb in pairs
        if ra["scores"].get(flip_metric) != rb["scores"].get(flip_metric)
    ]
    settings_a, settings_b = results_a.get("settings", {}), results_b.get("settings", {})
    differing = [
        f"{key}: {settings_a.get(key)!r} vs {settings_b.get(key)!r}"
        for key in (
            "eval_version",
            "prompt_style",
            "answer_format",
            "system_prompt",
            "num_few_shot",
            "samples",
            "temperature",
            "top_p",
            "max_new_tokens",
        )
        if settings_a.get(key) != settings_b.get(key)
    ]
    if results_a["data"].get("problems_sha1") != results_b["data"].get("problems_sha1"):
        differing.append("the problem sets differ; tests use the shared problems only")
    if repeats and not distinct:
        differing.append(f"{repeats} shared problems repeat an earlier question; --distinct tests each question once")
    return {
        "a": str(a),
        "b": str(b),
        "model_a": results_a.get("model"),
        "model_b": results_b.get("model"),
        "shared_problems": len(pairs) + (repeats if distinct else 0),
        "distinct": distinct,
        "tested_problems": len(pairs),
        "only_a": len(records_a) - len(pairs) - (repeats if distinct else 0),
        "only_b": len(records_b) - len(pairs) - (repeats if distinct else 0),
        "alpha": ALPHA,
        "test": "exact two-sided sign test on per-problem values (McNemar's exact test for 0/1)",
        "settings_differ": differing,
        "rows": rows,
        "flip_metric": flip_metric,
        "flips": flips,
    }


def format_comparison(c: dict) -> str:
    """The side-by-side table, the settings that differ and the problems that flipped."""
    lines = [
        f"A = {c['a']} ({c['model_a']})",
        f"B = {c['b']} ({c['model_b']})",
        f"{c['shared_problems']} shared problems (only in A: {c['only_a']}, only in B: {c['only_b']})"
        + (f"; tested: the first copy of each of {c['tested_problems']} distinct questions" if c["distinct"] else ""),
        "",
        f"{'metric':<24} {'A':>8} {'B':>8} {'B-A':>8} {'95% CI of B-A':>19} {'A>B':>5} {'B>A':>5} {'p':>9}",
    ]
    for row in c["rows"]:
        metric = row["metric"]
        a, b, diff = (format_value(metric, row[key], sign=key == "difference") for key in ("a", "b", "difference"))
        ci = row.get("difference_ci95")
        ci = "-" if ci is None else f"[{format_value(metric, ci[0], True)}, {format_value(metric, ci[1], True)}]"
        p = "-" if row["p_value"] is None else f"{row['p_value']:.2g}"
        star = "  *" if row["significant"] else ""
        counts = f"{row['a_better']:>5} {row['b_better']:>5}"
        lines.append(f"{metric:<24} {a:>8} {b:>8} {diff:>8} {ci:>19} {counts} {p:>9}{star}")
    lines.append(
        f"\n* significant at {c['alpha']} ({c['test']}; A>B / B>A count problems where one side scored higher; the "
        "interval is the mean paired difference's, normal approximation)"
    )
    for line in c["settings_differ"]:
        lines.append(f"warning: {line}" if "repeat" in line else f"warning: settings differ: {line}")
    flips, metric = c["flips"], c["flip_metric"]
    up = sum(f["b"] > f["a"] for f in flips)
    lines.append(f"\n{len(flips)} problems changed on {metric}: {up} better in B, {len(flips) - up} better in A")
    for f in flips:
        change = (
            f"{'right' if f['a'] else 'wrong'} -> {'right' if f['b'] else 'wrong'}"
            if {f["a"], f["b"]} <= {0.0, 1.0}
            else f"{f['a']:.2f} -> {f['b']:.2f}"
        )
        question = " ".join(f["question"].split())
        lines.append(f"  #{f['index']:<5} {change:<15} {question[:70]}{'...' if len(question) > 70 else ''}")
    return "\n".join(lines)


def compare_command(argv: list[str]) -> int:
    """``grpo-math compare A B``: two eval folders side by side, paired significance and flipped problems."""
    parser = ArgumentParser(prog="grpo-math compare", description=compare_command.__doc__)
    parser.add_argument("a", help="eval folder A (results.json + samples.jsonl), e.g. the base model's")
    parser.add_argument("b", help="eval folder B, e.g. the trained model's")
    parser.add_argument("--output", help="also write the comparison: .json as JSON, anything else as the text table")
    parser.add_argument("--metric", default="strict_accuracy", help="metric whose per-problem changes are listed")
    parser.add_argument(
        "--distinct", action="store_true", help="test each question once (its first copy): for sets with repeats"
    )
    args = parser.parse_args(argv)
    comparison = compare_results(args.a, args.b, args.metric, args.distinct)
    text = format_comparison(comparison)
    print(text)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(comparison, indent=1) + "\n" if out.suffix == ".json" else text + "\n", encoding="utf-8"
        )
    return 0
