"""``grpo-math report RUN_DIR``: one self-contained ``report.html`` (and the PNG curves) for a training run.

Reads the run folder (``rundata.load_run``), writes the plots (``plots.write_plots``) and the page into
``RUN_DIR/report`` (or ``--output``); ``--before``/``--sft``/``--after`` name eval folders other than
``RUN_DIR/eval/{base,sft,final}``. ``report.html`` embeds the plots as data URIs and needs no server or network.
Its sample browser shows each completion's reward parts, with arithmetic lines marked by the checker of the
``steps`` reward (``steps.find_steps``): green when every equation on the line is true, red when one is false.

>>> highlight_steps("3 + 4 = 8")
'<mark class="bad" title="0 of 1 equations true">3 + 4 = 8</mark>'
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from . import ArgumentParser, UserError
from .compare import compare_results
from .metrics import format_value
from .plots import eval_ci, write_plots
from .rundata import Eval, Run, is_number, load_run, numbers, series
from .runfiles import CONFIG_FILE
from .steps import MAX_STEP_CHARS, find_steps

KEY_SETTINGS = (
    "model_name_or_path",
    "dataset_name",
    "answer_format",
    "reward_funcs",
    "reward_weights",
    "learning_rate",
    "beta",
    "num_generations",
    "per_device_train_batch_size",
    "max_completion_length",
    "temperature",
    "max_steps",
    "use_peft",
    "seed",
)


def report_command(argv: list[str]) -> int:
    """Write PNG plots and report.html for a training run folder; print the report's path."""
    parser = ArgumentParser(prog="grpo-math report", description=report_command.__doc__)
    parser.add_argument("run_dir", help="training run folder (holds metrics.jsonl)")
    parser.add_argument("--output", help="where to write the PNGs and report.html (default: RUN_DIR/report)")
    parser.add_argument("--before", help="eval folder of the base model (default: RUN_DIR/eval/base when present)")
    parser.add_argument("--after", help="eval folder of the trained model (default: RUN_DIR/eval/final when present)")
    parser.add_argument(
        "--sft", help="eval folder of the cold-start checkpoint (default: RUN_DIR/eval/sft when present)"
    )
    parser.add_argument(
        "--max_samples",
        type=int,
        default=40,
        help="show at most this many training completions and this many evaluated problems",
    )
    args = parser.parse_args(argv)
    if args.max_samples < 0:
        raise UserError("--max_samples must be >= 0")
    run = load_run(args.run_dir, args.before, args.after, args.sft)
    out = Path(args.output) if args.output else run.folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(run, out)
    (out / "report.html").write_text(render_html(run, plots, args.max_samples), encoding="utf-8")
    print(out / "report.html")
    return 0


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;border-bottom:1px solid #ddd;margin-top:1.6em}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:1em}
figure{margin:0}figure img{width:100%;border:1px solid #eee}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ddd;padding:2px 8px;text-align:left;
vertical-align:top}td.n{text-align:right;font-variant-numeric:tabular-nums}
details{margin:.25em 0}details details{margin-left:1.2em}summary{cursor:pointer}
pre{white-space:pre-wrap;background:#f7f7f7;padding:.5em;margin:.3em 0;font-size:12.5px}
mark.ok{background:#c8f0c8}mark.bad{background:#f7c6c6}.muted{color:#777}
.good{color:#1a7f37}.poor{color:#b42318}.pair{display:grid;grid-template-columns:1fr 1fr;gap:.6em}
"""

# Counts the images that decoded, so a headless browser (tests/test_report.py) can check the plots show.
_SCRIPT = """addEventListener("load", () => {
  const shown = [...document.images].filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = shown;
  document.body.dataset.imagesTotal = document.images.length;
});"""


def render_html(run: Run, plots: list[tuple[str, Path]], max_samples: int = 40) -> str:
    """The whole report as one HTML page (plots embedded as base64 PNG data URIs)."""
    e = html.escape
    body = [f"<h1>GRPO run: {e(run.folder.resolve().name)}</h1>", _summary(run)]
    body.append("<h2>Training curves</h2>")
    if plots:
        body.append(
            '<div class="plots">'
            + "".join(
                f'<figure><img alt="{e(title)}" src="data:image/png;base64,{_base64(path)}"></figure>'
                for title, path in plots
            )
            + "</div>"
        )
    else:
        body.append('<p class="muted">metrics.jsonl has no plottable values yet.</p>')
    if run.evals:
        body += ["<h2>Evaluation</h2>", _eval_table(run.evals)]
    body += [
        "<h2>Sample completions</h2>",
        '<p class="muted">Arithmetic lines: <mark class="ok">every equation true</mark> '
        '<mark class="bad">an equation false</mark> (the <code>steps</code> reward\'s checker).</p>',
        _training_samples(run, max_samples),
        _eval_samples(run.evals, max_samples),
    ]
    body += ["<h2>Configuration</h2>", _config(run.config)]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{e(run.folder.resolve().name)}: grpo-math report</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + f"\n<script>{_SCRIPT}</script>\n</body></html>\n"
    )


def _base64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _fmt(v) -> str:
    if is_number(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return "" if v is None else str(v)


def _summary(run: Run) -> str:
    steps, rewards = series(run.metrics, "reward")
    facts = [
        f"model <b>{html.escape(_fmt(run.config.get('model_name_or_path', '?')))}</b>",
        f"data <b>{html.escape(_fmt(run.config.get('dataset_name', '?')))}</b>",
        f"{len({m['step'] for m in run.metrics if is_number(m.get('step'))})} steps logged",
    ]
    if rewards:
        k = max(1, len(rewards) // 10)
        span = (
            f"steps {steps[0]}–{steps[k - 1]} → {steps[-k]}–{steps[-1]}" if k > 1 else f"step {steps[0]} → {steps[-1]}"
        )
        facts.append(f"reward {sum(rewards[:k]) / k:.3f} → {sum(rewards[-k:]) / k:.3f} ({span})")
    return "<p>" + " · ".join(facts) + "</p>"


def _eval_table(evals: dict[str, Eval]) -> str:
    """Every metric side by side, with 95% intervals, the difference and (with samples) the paired test."""
    e, sides = html.escape, list(evals)
    paired = {}
    if len(sides) == 2 and all(ev.samples for ev in evals.values()):
        try:
            comparison = compare_results(evals[sides[0]].folder, evals[sides[1]].folder)
        except KeyError as err:
            raise UserError(
                f"{evals[sides[0]].folder} or {evals[sides[1]].folder}: a samples.jsonl record has "
                f"no {err}; these are not grpo-math eval folders"
            ) from None
        paired = {row["metric"]: row for row in comparison["rows"]}
    head = "".join(
        f"<th>{e(s)}<br><span class='muted'>{e(_fmt(ev.results.get('model', ev.folder.name)))}</span></th>"
        for s, ev in evals.items()
    )
    if len(sides) == 2:
        head += "<th>Δ</th>" + ("<th>p (paired)</th>" if paired else "")
    rows = []
    for name in dict.fromkeys(k for ev in evals.values() for k in ev.results["metrics"]):
        values = [evals[s].results["metrics"].get(name) for s in sides]
        cells = []
        for s, v in zip(sides, values):
            ci = eval_ci(evals[s]).get(name)
            interval = f" <span class='muted'>[{_metric(name, ci[0])}, {_metric(name, ci[1])}]</span>" if ci else ""
            cells.append(f"<td class='n'>{_metric(name, v)}{interval}</td>")
        if len(sides) == 2:
            delta = values[1] - values[0] if all(is_number(v) for v in values) else None
            cells.append(f"<td class='n'>{'' if delta is None else _metric(name, delta, sign=True)}</td>")
            if paired:
                row = paired.get(name) or {}
                p = row.get("p_value")
                mark = " class='n good'" if row.get("significant") else " class='n'"
                cells.append(f"<td{mark}>{'' if p is None else f'{p:.2g}'}</td>")
        rows.append(f"<tr><td>{e(name)}</td>{''.join(cells)}</tr>")
    n = {ev.results.get("data", {}).get("num_problems") for ev in evals.values()} - {None}
    note = (
        f"<p class='muted'>{'/'.join(map(str, sorted(n))) or '?'} problems. Brackets: 95% Wilson intervals. "
        + ("p: exact paired sign test (McNemar) on the shared problems, green when below 0.05. " if paired else "")
        + "Details: <code>grpo-math compare</code>.</p>"
    )
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>{note}"


def _metric(name: str, v, sign: bool = False) -> str:
    if not is_number(v):
        return html.escape(_fmt(v))
    return format_value(name, v, sign)


def _verdict(score) -> str:
    if score in (0.0, 1.0):
        return f"<span class='{'good' if score else 'poor'}'>{'right' if score else 'wrong'}</span>"
    return "?" if score is None else f"{score:.2f}"


def _eval_samples(evals: dict[str, Eval], max_samples: int) -> str:
    """Evaluated problems side by side (those whose strict correctness changed first)."""
    sides = [s for s, ev in evals.items() if ev.samples]
    if not sides or max_samples == 0:
        return ""
    e = html.escape
    keyed = {s: {(r.get("index"), r.get("question")): r for r in evals[s].samples} for s in sides}
    keys = [k for k in keyed[sides[0]] if all(k in keyed[s] for s in sides)]

    def strict(side, key):
        return (keyed[side][key].get("scores") or {}).get("strict_accuracy")

    changed = [k for k in keys if len({strict(s, k) for s in sides}) > 1]
    shown = (changed + [k for k in keys if k not in changed])[:max_samples]
    items = []
    for key in shown:
        first = keyed[sides[0]][key]
        question = " ".join(str(first.get("question", "")).split())
        columns = "".join(
            f"<div><b>{e(s)}</b>"
            + "".join(_eval_completion(c) for c in keyed[s][key].get("completions", []))
            + "</div>"
            for s in sides
        )
        items.append(
            f"<details><summary>#{e(_fmt(first.get('index')))} "
            f"{' → '.join(_verdict(strict(s, key)) for s in sides)} · gold {e(_fmt(first.get('gold')))} · "
            f"{e(question[:90])}{'…' if len(question) > 90 else ''}</summary>"
            f"<p><b>Question.</b> {e(question)}</p><div class='pair'>{columns}</div></details>"
        )
    title = " vs ".join(sides)
    return (
        f"<h3>Evaluation ({e(title)}; {len(changed)} of {len(keys)} problems changed strict correctness, "
        f"{len(shown)} shown)</h3>"
        + _total_formula(_weights(evals[sides[-1]].results.get("settings") or {}))
        + "".join(items)
    )


def _eval_completion(c: dict) -> str:
    answers = c.get("answers") or {}
    facts = [
        f"strict answer {html.escape(_fmt(answers.get('strict')) or '–')}",
        f"flexible {html.escape(_fmt(answers.get('flexible')) or '–')}",
        f"{_fmt(c.get('tokens'))} tokens{' (truncated)' if c.get('truncated') else ''}",
    ]
    if is_number(c.get("reward")):
        facts.append(f"reward {c['reward']:.3g} ({_parts(numbers(c.get('rewards') or {}))})")
    return f"<p class='muted'>{' · '.join(facts)}</p><pre>{highlight_steps(str(c.get('text', '')))}</pre>"


def highlight_steps(text: str) -> str:
    """Escaped HTML of a completion with each line holding arithmetic marked as verified or not.

    >>> print(highlight_steps("48/2 = 24 eggs\\n<b>2*3 = 7</b>\\nso 24"))
    <mark class="ok" title="1 of 1 equations true">48/2 = 24 eggs</mark>
    <mark class="bad" title="0 of 1 equations true">&lt;b&gt;2*3 = 7&lt;/b&gt;</mark>
    so 24
    """
    out, seen = [], 0
    for line in text.splitlines(keepends=True):
        body = line.splitlines()[0]
        steps = find_steps(body) if seen < MAX_STEP_CHARS else []  # the reward reads this many characters
        seen += len(line)
        escaped = html.escape(body)
        if steps:
            good = sum(s.ok for s in steps)
            escaped = (
                f'<mark class="{"ok" if good == len(steps) else "bad"}" '
                f'title="{good} of {len(steps)} equations true">{escaped}</mark>'
            )
        out.append(escaped + html.escape(line[len(body) :]))
    return "".join(out)


def _parts(parts: dict[str, float]) -> str:
    return " · ".join(f"{html.escape(k)} {v:.2g}" for k, v in parts.items())


def _weights(config: dict) -> dict[str, float]:
    """``{reward name: weight}`` of a config or eval settings (TRL weighs every part 1 when none are set)."""
    names, weights = config.get("reward_funcs") or [], config.get("reward_weights")
    if isinstance(weights, list) and len(weights) == len(names):
        return {n: float(w) for n, w in zip(names, weights)}
    return dict.fromkeys(names, 1.0)


def _total_formula(weights: dict[str, float]) -> str:
    terms = " + ".join(f"{w:g}×{html.escape(n)}" for n, w in weights.items())
    return f"<p class='muted'>total = {terms}</p>" if terms else ""


def _training_samples(run: Run, max_samples: int) -> str:
    """Completions of up to 6 evenly spaced logged steps (first and last included), grouped by step and prompt."""
    rows = [r for r in run.completions if is_number(r.get("step"))]
    if not rows or max_samples == 0:
        return "<p class='muted'>No training completions logged (set log_completions to log them).</p>"
    steps = sorted({r["step"] for r in rows})
    picked = sorted({steps[round(i * (len(steps) - 1) / 5)] for i in range(6)} if len(steps) > 6 else set(steps))
    per_step = max(1, max_samples // len(picked))
    weights = _weights(run.config)
    e = html.escape
    groups = []
    for step in picked:
        shown = [r for r in rows if r["step"] == step][:per_step]
        blocks, question = [], None
        for r in shown:
            if r["question"] != question:  # TRL logs a prompt's group of completions together
                question = r["question"]
                gold = "" if r.get("answer") is None else f" <span class='muted'>(gold {e(_fmt(r['answer']))})</span>"
                blocks.append(f"<p><b>Question.</b> {e(question)}{gold}</p>")
            total = sum(weights.get(k, 1.0) * v for k, v in r["rewards"].items())
            blocks.append(
                f"<details><summary>total {total:.3g} <span class='muted'>· {_parts(r['rewards'])}</span>"
                f"</summary><pre>{highlight_steps(r['completion'])}</pre></details>"
            )
        groups.append(f"<details><summary>step {step} ({len(shown)} completions)</summary>{''.join(blocks)}</details>")
    return "<h3>During training</h3>" + _total_formula(weights) + "".join(groups)


def _config(config: dict) -> str:
    if not config:
        return f"<p class='muted'>No {CONFIG_FILE} in the run folder.</p>"
    e = html.escape

    def table(keys):
        return (
            "<table>"
            + "".join(f"<tr><td>{e(k)}</td><td>{e(json.dumps(config[k]))}</td></tr>" for k in keys)
            + "</table>"
        )

    key = [k for k in KEY_SETTINGS if k in config]
    return table(key) + f"<details><summary>all {len(config)} settings</summary>{table(config)}</details>"
