"""Benchmark (not a test): seconds per GRPO step of plain TRL and of ``grpo-math train``, same settings, one run.

Three paths, each in its own process one after the other (so each peak RSS is its own), with the same model
(the embedded SmolLM2-135M), prompts (the smoke recipe's: builtin problems with 2 worked examples), rewards (the
default preset and weights), group size, batch, completion length, temperature, beta, learning rate and seed:

- ``trl-fp32``: TRL's ``GRPOTrainer`` as a user writes it (``GRPOConfig(use_cpu=True)``, defaults otherwise);
- ``trl-bf16``: the same with ``bf16=True`` (on a CPU without native bf16 it is emulated, and slow);
- ``grpo-math``: ``grpo-math train``'s own trainer (``train.build_trainer`` from ``recipes/smoke.yaml``).

Each runs ``--warmup`` untimed steps, then ``--steps`` timed ones, and reports seconds per step with a breakdown:
generation (``generate``), reward scoring, log-prob forwards without gradients (reference model, old policy),
the rest of the step (the policy's forward with gradients, backward, optimizer), and one ``save_model``. Peak RSS
is sampled every 0.1 s. The CPU model and flags are printed next to the ratios ``vs TRL fp32`` / ``vs TRL bf16``.

    python bench/grpo_step.py                       # 1 warm-up + 3 timed steps per path (about 12 min on 2 cores)
    python bench/grpo_step.py --steps 1 --warmup 0  # a quick check that every path runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from common import ROOT, cpu, limits, malloc

PATHS = ("trl-fp32", "trl-bf16", "grpo-math")
RECIPE = ROOT / "recipes" / "smoke.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--max_completion_length", type=int, default=64)
    parser.add_argument("--recipe", default=str(RECIPE), help="recipe whose settings every path uses")
    parser.add_argument("--model", help="model for every path instead of the recipe's (e.g. a local folder)")
    parser.add_argument(
        "--flags",
        nargs=argparse.REMAINDER,
        default=[],
        help="extra grpo-math train flags for the grpo-math path (last option: takes the rest)",
    )
    parser.add_argument("--one", choices=PATHS, help=argparse.SUPPRESS)  # internal: run one path, print JSON
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)))
        return 0
    results = {}
    for path in args.paths:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            path,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--max_completion_length",
            str(args.max_completion_length),
            "--recipe",
            args.recipe,
            *(["--model", args.model] if args.model else []),
            "--flags",
            *args.flags,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if out.returncode or line is None:
            print(f"{path} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[path] = json.loads(line[len("RESULT ") :])
        print(f"{path}: {results[path]['seconds_per_step']:.1f} s/step", file=sys.stderr)
    print(table(results, args))
    return 0


def table(results: dict, args) -> str:
    model, flags = cpu()
    gpu = next(iter(results.values())).get("peak_gpu_gb") is not None
    base = {name: results[name]["seconds_per_step"] for name in ("trl-fp32", "trl-bf16") if name in results}
    lines = [
        f"CPU: {model}, {os.cpu_count()} cores, flags: {' '.join(flags) or 'none of avx2/avx512/amx'}; "
        f"kernel limits: {limits()}; malloc: {malloc()}",
        *([f"GPU: {next(iter(results.values()))['device']}"] if gpu else []),
        "settings: "
        + json.dumps(
            {
                k: v
                for k, v in next(iter(results.values()))["settings"].items()
                if k not in ("bf16", "activation_checkpointing")
            }
        ),
        f"{args.warmup} warm-up + {args.steps} timed steps per path, each path in its own process",
        "",
        f"{'path':<10} {'bf16':>5} {'ckpt':>5} {'tokens':>6} {'s/step':>7} {'generate':>9} {'rewards':>8} "
        f"{'logp fwd':>9} {'fwd+bwd+opt':>12} {'save':>6} {'peak RSS':>9} {'vs TRL fp32':>12} {'vs TRL bf16':>12}",
    ]
    for name, r in results.items():
        b = r["breakdown"]
        ratios = [f"{base[k] / r['seconds_per_step']:.2f}x" if k in base else "-" for k in ("trl-fp32", "trl-bf16")]
        lines.append(
            f"{name:<10} {str(r['settings']['bf16']):>5} {str(r['settings']['activation_checkpointing']):>5} "
            f"{r['mean_completion_tokens']:>6.1f} "
            f"{r['seconds_per_step']:>7.1f} {b['generate']:>9.1f} {b['rewards']:>8.3f} "
            f"{b['logp_no_grad']:>9.1f} {b['rest']:>12.1f} {r['save_seconds']:>6.1f} "
            f"{r['peak_rss_gb']:>7.1f}GB {ratios[0]:>12} {ratios[1]:>12}"
            + (f"  GPU peak {r['peak_gpu_gb']:.1f}GB" if gpu else "")
        )
    lines.append(
        "\nbreakdown columns are seconds per timed step (tokens: mean completion length); save is one "
        "save_model after the steps\npeak RSS (GB) by phase:"
    )
    for name, r in results.items():
        lines.append(f"  {name:<10} " + "  ".join(f"{k} {v:.1f}" for k, v in r["peak_rss_gb_by_phase"].items()))
    return "\n".join(lines)


# ---- one path, in its own process ------------------------------------------------------------------------


class Timers:
    """Seconds spent in wrapped callables, summed per name while ``on`` is set, and the peak RSS seen in each
    (sampled every 0.1 s; outside any wrapped callable counts as ``rest``)."""

    def __init__(self):
        import psutil

        self.total, self.on, self.current, self.peak = {}, False, "setup", {}
        proc = psutil.Process()

        def sample():
            while True:
                rss = proc.memory_info().rss
                self.peak[self.current] = max(self.peak.get(self.current, 0), rss)
                time.sleep(0.1)

        threading.Thread(target=sample, daemon=True).start()

    def wrap(self, name, fn, when=None):
        def timed(*a, **k):
            if not self.on or (when is not None and not when()):
                return fn(*a, **k)
            start, outer, self.current = time.perf_counter(), self.current, name
            try:
                return fn(*a, **k)
            finally:
                self.current = outer
                self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - start

        timed.__name__ = getattr(fn, "__name__", name)
        return timed


def run_one(path: str, args) -> dict:
    """One path's timed steps; its run folder (model, optimizer, completions: about 2 GB) is deleted afterwards."""
    out = tempfile.mkdtemp(prefix=f"grpo-step-{path}-")
    try:
        return timed_run(path, args, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def timed_run(path: str, args, out: str) -> dict:
    import torch
    from transformers import TrainerCallback

    from grpo_math.config import parse_train_args
    from grpo_math.console import setup_logging
    from grpo_math.models import load_tokenizer, load_weights, resolve_model
    from grpo_math.rewards import get_reward_funcs
    from grpo_math.train import build_trainer, load_train_data

    setup_logging()
    timers = Timers()
    total_steps = args.warmup + args.steps
    flags = [
        "--config",
        args.recipe,
        *(["--model_name_or_path", args.model] if args.model else []),
        "--output_dir",
        out,
        "--max_steps",
        str(total_steps),
        "--save_steps",
        "100000",
        "--max_completion_length",
        str(args.max_completion_length),
    ]
    script, grpo, model_args = parse_train_args(flags + (args.flags if path == "grpo-math" else []))
    model_path = resolve_model(model_args.model_name_or_path)
    tokenizer = load_tokenizer(model_path)
    dataset = load_train_data(script, tokenizer, grpo.max_prompt_length)
    rewards = [timers.wrap("rewards", f) for f in get_reward_funcs(script.reward_funcs, script.answer_format)]
    settings = {
        "model": model_args.model_name_or_path,
        "problems": len(dataset),
        "num_generations": grpo.num_generations,
        "per_device_train_batch_size": grpo.per_device_train_batch_size,
        "gradient_accumulation_steps": grpo.gradient_accumulation_steps,
        "max_completion_length": grpo.max_completion_length,
        "temperature": grpo.temperature,
        "beta": grpo.beta,
        "learning_rate": grpo.learning_rate,
        "seed": grpo.seed,
        "reward_funcs": script.reward_funcs,
        "reward_weights": grpo.reward_weights,
    }
    if path == "grpo-math":
        trainer = build_trainer(script, grpo, model_args, load_weights(model_path, "float32"), tokenizer, dataset)
        trainer.reward_funcs = rewards
    else:
        from trl import GRPOConfig, GRPOTrainer

        config = GRPOConfig(
            output_dir=out,
            use_cpu=not torch.cuda.is_available(),
            bf16=path == "trl-bf16",
            gradient_accumulation_steps=grpo.gradient_accumulation_steps,
            max_steps=total_steps,
            save_strategy="no",
            report_to=[],
            logging_steps=1,
            seed=grpo.seed,
            learning_rate=grpo.learning_rate,
            beta=grpo.beta,
            num_generations=grpo.num_generations,
            per_device_train_batch_size=grpo.per_device_train_batch_size,
            max_completion_length=grpo.max_completion_length,
            temperature=grpo.temperature,
            reward_weights=grpo.reward_weights,
        )
        trainer = GRPOTrainer(
            model=model_path, reward_funcs=rewards, args=config, train_dataset=dataset, processing_class=tokenizer
        )
    settings["bf16"] = bool(trainer.args.bf16)
    settings["activation_checkpointing"] = bool(trainer.args.activation_checkpointing)
    trainer._generate_single_turn = timers.wrap("generate", trainer._generate_single_turn)
    trainer._get_per_token_logps_and_entropies = timers.wrap(
        "logp_no_grad", trainer._get_per_token_logps_and_entropies, when=lambda: not torch.is_grad_enabled()
    )

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, a, state, control, **kwargs):
            timers.on = state.global_step >= args.warmup
            timers.current = "rest" if timers.on else "warm-up"
            self.start = time.perf_counter()

        def on_step_end(self, a, state, control, **kwargs):
            if timers.on:
                self.times.append(time.perf_counter() - self.start)

    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    timers.on, timers.current = False, "save"
    start = time.perf_counter()
    trainer.save_model(out)
    save = time.perf_counter() - start
    time.sleep(0.2)
    logged = [log for log in trainer.state.log_history if "completions/mean_length" in log][args.warmup :]
    n = len(clock.times)
    per_step = sum(clock.times) / n
    breakdown = {k: timers.total.get(k, 0.0) / n for k in ("generate", "rewards", "logp_no_grad")}
    breakdown["rest"] = per_step - sum(breakdown.values())
    return {
        "path": path,
        "seconds_per_step": per_step,
        "step_times": clock.times,
        "breakdown": breakdown,
        "save_seconds": save,
        "peak_rss_gb": max(timers.peak.values()) / 1e9,
        "peak_rss_gb_by_phase": {k: round(v / 1e9, 2) for k, v in timers.peak.items()},
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu()[0],
        "mean_completion_tokens": sum(log["completions/mean_length"] for log in logged) / max(len(logged), 1),
        "settings": settings,
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    sys.exit(main())
