"""A run folder read back: training metrics, the saved config, TRL's sampled completions and the evaluations.

What a run folder holds is named in ``runfiles``: ``metrics.jsonl`` (TRL's log lines), ``grpo_math_config.yaml``,
sampled completions (TRL's ``completions/*.parquet``), the cold start's ``sft/metrics.jsonl`` and the evaluations
``eval/base``, ``eval/sft`` and ``eval/final`` (``results.json`` + ``samples.jsonl`` of ``grpo-math eval``).

>>> series([{"step": 1, "kl": 0.5}, {"step": 2}, {"step": 3, "kl": 0.25}], "kl")
([1, 3], [0.5, 0.25])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from . import UserError, data
from .rewards import completion_text
from .runfiles import COMPLETIONS_DIR, CONFIG_FILE, METRICS_FILE, RESULTS_FILE, SFT_DIR, load_results, read_config


@dataclass
class Eval:
    """One ``grpo-math eval`` output folder."""

    folder: Path
    results: dict
    samples: list[dict]


@dataclass
class Run:
    folder: Path
    metrics: list[dict]
    config: dict
    completions: list[dict]  # {"step", "question", "completion", "answer", "rewards": {name: value}}
    evals: dict[str, Eval] = field(default_factory=dict)  # "before" / "cold start" / "after"
    sft_metrics: list[dict] = field(default_factory=list)  # the cold start's metrics.jsonl (output_dir/sft)


def load_run(run_dir: str | Path, before: str | None = None, after: str | None = None, sft: str | None = None) -> Run:
    """Everything the report shows, read and checked (bad input raises ``UserError`` naming the file)."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise UserError(f"run folder not found: {folder}")
    if not (folder / METRICS_FILE).is_file():
        raise UserError(f"{folder} has no {METRICS_FILE}: not a training run folder (grpo-math train writes one)")
    config = read_config(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
    run = Run(folder, _rows(folder / METRICS_FILE), config, load_completions(folder, config))
    if (folder / SFT_DIR / METRICS_FILE).is_file():
        run.sft_metrics = _rows(folder / SFT_DIR / METRICS_FILE)
    for side, given, default in (
        ("before", before, "eval/base"),
        ("cold start", sft, "eval/sft"),
        ("after", after, "eval/final"),
    ):
        path = Path(given) if given else folder / default
        if given or (path / RESULTS_FILE).is_file():
            run.evals[side] = load_eval(path)
    return run


def _rows(path: Path) -> list[dict]:
    return [row for row, _ in data.read_jsonl(path)]


def load_eval(folder: Path) -> Eval:
    """An eval folder: ``results.json`` (required) and ``samples.jsonl`` (optional)."""
    return Eval(folder, *load_results(folder, need_samples=False))


def load_completions(folder: Path, config: dict) -> list[dict]:
    """Training completions from TRL's ``completions/*.parquet`` (``log_completions``): step, prompt, completion,
    one column per reward, advantage."""
    paths = sorted((folder / COMPLETIONS_DIR).glob("*.parquet"))
    if not paths:
        return []
    import pyarrow.parquet as pq

    names, rows = config.get("reward_funcs"), []
    for path in paths:
        for r in pq.read_table(path).to_pylist():
            parts = numbers({k: v for k, v in r.items() if (k in names if names else k not in ("step", "advantage"))})
            rows.append(
                {
                    "step": r.get("step"),
                    "question": _question(r.get("question") or r.get("prompt")),
                    "completion": completion_text(r.get("completion") or ""),
                    "answer": r.get("answer"),
                    "rewards": parts,
                    "advantage": r.get("advantage"),
                }
            )
    return rows


def _question(prompt) -> str:
    """The last user message of a chat prompt, or a plain prompt as is."""
    if isinstance(prompt, list):
        return completion_text([m for m in prompt if isinstance(m, dict) and m.get("role") == "user"][-1:])
    return str(prompt or "")


def numbers(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if is_number(v)}


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, skipping lines without a step or a finite value."""
    points = [(m["step"], float(m[key])) for m in metrics if is_number(m.get(key)) and is_number(m.get("step"))]
    return [s for s, _ in points], [v for _, v in points]
