"""A run's curves as PNG files (matplotlib, no pyplot: no global state, no GUI backend).

``write_plots`` writes into a folder, leaving out a plot the run has no data for::

    reward.png  reward_parts.png  completion_length.png  zero_std.png  kl.png  sft.png  eval_accuracy.png
    before_after.png
"""

from __future__ import annotations

import re
from pathlib import Path

from .metrics import is_rate
from .rundata import Eval, Run, is_number, series

_PART = re.compile(r"rewards/(.+)/mean$")


def write_plots(run: Run, out: Path) -> list[tuple[str, Path]]:
    """Write every plot the run has data for; return ``(title, path)`` pairs in display order."""
    m = run.metrics
    keys = list(dict.fromkeys(k for row in m for k in row))
    parts = {_PART.match(k).group(1): series(m, k) for k in keys if _PART.match(k)}
    evals = {k[len("eval/") :]: series(m, k) for k in keys if k.startswith("eval/") and is_rate(k[len("eval/") :])}
    evals = {k: v for k, v in evals.items() if all(0 <= x <= 1 for x in v[1])}
    plots = [
        (
            "Total reward (mean ± std over completions)",
            "reward.png",
            _lines({"reward": series(m, "reward")}, "reward", band=_band(m, "reward", "reward_std")),
        ),
        ("Reward parts (unweighted means)", "reward_parts.png", _lines(parts, "reward part")),
        (
            "Completion length (tokens; band: min-max)",
            "completion_length.png",
            _lines(
                {
                    "mean": series(m, "completions/mean_length"),
                    "mean (terminated)": series(m, "completions/mean_terminated_length"),
                },
                "tokens",
                band=_range(m, "completions/min_length", "completions/max_length"),
            ),
        ),
        (
            "Groups whose completions all scored the same (no GRPO signal)",
            "zero_std.png",
            _lines({"frac_reward_zero_std": series(m, "frac_reward_zero_std")}, "fraction of groups", ylim=(0, 1)),
        ),
        ("KL to the reference model", "kl.png", _lines({"kl": series(m, "kl")}, "KL")),
        (
            "Cold start (SFT) on formatted solutions",
            "sft.png",
            _lines(
                {
                    "loss": series(run.sft_metrics, "loss"),
                    "token accuracy": series(run.sft_metrics, "mean_token_accuracy"),
                },
                "loss / accuracy",
            ),
        ),
        ("In-training evaluation", "eval_accuracy.png", _lines(evals, "rate", ylim=(0, 1))),
        ("Before / after (95% CI)", "before_after.png", _before_after(run.evals)),
    ]
    written = []
    for title, name, fig in plots:
        if fig is not None:
            fig.suptitle(title, fontsize=11)
            fig.savefig(out / name, dpi=100)
            written.append((title, out / name))
    return written


def _figure():
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps and bar positions are whole numbers
    return fig, ax


def _lines(curves: dict, ylabel: str, band=None, ylim=None):
    """One line per curve (plus a moving average when noisy); None when no curve has a point."""
    curves = {label: xy for label, xy in curves.items() if xy[0]}
    if not curves:
        return None
    fig, ax = _figure()
    for label, (xs, ys) in curves.items():
        window = len(ys) // 20
        if window > 1:  # long noisy runs: faint raw values, solid moving average
            (line,) = ax.plot(xs, ys, alpha=0.3, linewidth=0.8)
            avg = [sum(ys[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(ys))]
            ax.plot(xs, avg, color=line.get_color(), label=f"{label} (avg of {window})")
        else:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
    if band and band[0]:
        ax.fill_between(band[0], band[1], band[2], alpha=0.15, color="C0", linewidth=0)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return fig


def _band(m: list[dict], key: str, std_key: str):
    rows = [r for r in m if is_number(r.get(key)) and is_number(r.get(std_key)) and is_number(r.get("step"))]
    return ([r["step"] for r in rows], [r[key] - r[std_key] for r in rows], [r[key] + r[std_key] for r in rows])


def _range(m: list[dict], low: str, high: str):
    rows = [r for r in m if is_number(r.get(low)) and is_number(r.get(high)) and is_number(r.get("step"))]
    return ([r["step"] for r in rows], [r[low] for r in rows], [r[high] for r in rows])


def rate_metrics(evals: dict[str, Eval]) -> list[str]:
    """Rates (accuracies, format and truncation rates) that every eval has, in the order of the first."""
    tables = [e.results["metrics"] for e in evals.values()]
    return [k for k in (tables[0] if tables else []) if is_rate(k) and all(is_number(t.get(k)) for t in tables)]


def eval_ci(ev: Eval) -> dict:
    return ev.results.get("ci95") or {}


def _before_after(evals: dict[str, Eval]):
    names = rate_metrics(evals)
    if len(evals) < 2 or not names:
        return None
    fig, ax = _figure()
    width = 0.8 / len(evals)
    for i, (side, ev) in enumerate(evals.items()):
        values = [ev.results["metrics"][k] for k in names]
        ci = eval_ci(ev)
        errors = [
            [v - ci[k][0] if k in ci else 0 for k, v in zip(names, values)],
            [ci[k][1] - v if k in ci else 0 for k, v in zip(names, values)],
        ]
        xs = [j + (i - (len(evals) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, values, width, yerr=errors, capsize=3, label=side)
    ax.set_xticks(range(len(names)), [n.replace("_", "\n", 1) for n in names], fontsize=7)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return fig
