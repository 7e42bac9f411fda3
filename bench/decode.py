"""Benchmark (not a test): decoding speed of today's ``rollouts.generate_grouped`` against an earlier revision's,
side by side in one process on one model, with the machine's ceiling.

Three configurations, each run by both versions in turn (same prompts, same seeds):

- ``rollouts``: GRPO rollouts as ``recipes/learning.yaml`` samples them: its zero-shot prompt on its training
  problems, 2 problems x 8 samples at T = 1, 64 new tokens, stop at the closed answer, sampler log-probs;
- ``eval``: greedy ``models.generate`` (eval's scheduler) on GSM8K test problems with the learning recipe's prompt,
  256 new tokens, batch 64: the two versions must give the same tokens (the line says so);
- ``sampled``: ``models.generate`` with 8 samples at T = 1 of 8 held-out task problems, 64 tokens, batch 64.

Useful tokens are the completions' own tokens (what a row wrote before it ended). The ceiling of a decode step of
R rows is the larger of two bounds: reading every weight once (parameter bytes over the measured memory read
bandwidth) and its arithmetic (2 x parameters x R FLOPs over a measured large matmul in the model's dtype);
tokens/s at the ceiling is R over that bound, shown for the batch size each configuration decodes at.

    python bench/decode.py --model runs/learning   # the learning recipe's checkpoint (it stops at its answer)
    python bench/decode.py --batches 1 --eval_problems 16   # a quick check that both paths run
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import GSM8K_DIR, ROOT, cpu, limits, malloc

BEFORE = "920516c"  # the last revision whose rollouts decoded through transformers' generate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded", help="hub id, folder, .gguf or embedded")
    parser.add_argument(
        "--dtype", default="auto", help="auto: bf16 where the CPU has it natively, as training's rollouts"
    )
    parser.add_argument("--before", default=BEFORE, help="git revision whose rollouts.py to compare with")
    parser.add_argument("--batches", type=int, default=4, help="rollout batches (16 rows each) per version")
    parser.add_argument("--eval_problems", type=int, default=64)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "learning.yaml"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from grpo_math import rollouts
    from grpo_math.models import cpu_has_bf16, load_model

    before = load_revision(args.before)
    model, tokenizer, _ = load_model(args.model, args.dtype)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    name, flags = cpu()
    print(
        f"CPU: {name} ({' '.join(flags)}), {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"native bf16 {cpu_has_bf16()}; model {args.model} ({params / 1e6:.0f}M parameters, {model.dtype}); "
        f"before = {args.before}, after = working tree; kernel limits: {limits()}; malloc: {malloc()}"
    )
    bandwidth, peak = measure_machine(model.dtype)
    print(f"machine: memory read {bandwidth / 1e9:.1f} GB/s, matmul {peak / 1e9:.0f} GFLOP/s ({model.dtype})\n")
    print(
        f"{'config':<9} {'version':<7} {'seconds':>8} {'tokens':>7} {'tokens/s':>9} {'rows':>5} "
        f"{'ceiling tokens/s':>17} {'speed-up':>9}"
    )
    for name, run in (("rollouts", rollout_run), ("eval", eval_run), ("sampled", sampled_run)):
        results = {}
        for label, module in (("before", before), ("after", rollouts)):
            results[label] = run(module, model, tokenizer, args)
        rows = results["after"]["rows"]
        ceiling = rows / max(params * model.dtype.itemsize / bandwidth, 2 * params * rows / peak)
        for label, r in results.items():
            speed = results["before"]["seconds"] / r["seconds"]
            print(
                f"{name:<9} {label:<7} {r['seconds']:>8.1f} {r['tokens']:>7} {r['tokens'] / r['seconds']:>9.1f} "
                f"{rows:>5} {ceiling:>17.0f} {speed:>8.2f}x"
            )
        if name == "sampled":
            print("sampled: eval --samples 8 --temperature 1.0 (sampled: the two versions draw differently)")
        elif name == "eval":
            pairs = list(zip(results["before"]["outputs"], results["after"]["outputs"], strict=True))
            print(f"eval: greedy completions identical before/after: {sum(a == b for a, b in pairs)}/{len(pairs)}")
        else:
            lengths = {k: r["tokens"] / r["completions"] for k, r in results.items()}
            print(
                f"rollouts: mean completion tokens before {lengths['before']:.1f}, after {lengths['after']:.1f} "
                "(sampled: the two versions draw differently)"
            )
    return 0


def load_revision(revision: str):
    """``rollouts.py`` as it was at ``revision``, imported as a module of the package (its relative imports work)."""
    source = subprocess.run(
        ["git", "show", f"{revision}:src/grpo_math/rollouts.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "rollouts_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("grpo_math.rollouts_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def messages_of(recipe: str, dataset: str | None, split: str, limit: int, seed: int | None = None):
    """``(answer_format, chat messages)`` of ``limit`` problems of ``dataset`` (default: the recipe's) asked with the
    recipe's prompt."""
    from grpo_math.data import build_prompt, load_problems
    from grpo_math.prompts import PromptSettings
    from grpo_math.runfiles import read_config

    prompt = PromptSettings.load(recipe, None)
    problems = load_problems(dataset or read_config(recipe)["dataset_name"], split, limit=limit, seed=seed)
    return prompt.answer_format, [
        build_prompt(p.question, prompt.answer_format, prompt.system_prompt) for p in problems
    ]


def rollout_run(module, model, tokenizer, args) -> dict:
    import torch
    from transformers import GenerationConfig

    from grpo_math.models import apply_template, eos_token_ids

    _, messages = messages_of(args.recipe, None, "train", 2 * args.batches, seed=0)
    problems = [tokenizer(apply_template(tokenizer, m), add_special_tokens=False).input_ids for m in messages]
    ends = eos_token_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=64, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=ends,
    )  # fmt: skip
    seconds = tokens = completions = 0
    for b in range(args.batches):
        rows = [p for p in problems[2 * b : 2 * b + 2] for _ in range(8)]
        torch.manual_seed(b)
        start = time.perf_counter()
        out, _ = module.generate_grouped(
            model, rows, config, tokenizer.pad_token_id, ends, True, (tokenizer, "tags"), sampler_logps=True
        )
        seconds += time.perf_counter() - start
        tokens += sum(len(r) - (r[-1] in ends) for r in out)
        completions += len(out)
    return {"seconds": seconds, "tokens": tokens, "completions": completions, "rows": 16}


def timed_generate(module, model, tokenizer, messages, answer_format: str, **settings) -> dict:
    """``models.generate`` (eval's scheduler) decoding through ``module``'s ``generate_grouped``: seconds, tokens
    and each completion's ``(text, tokens)``."""
    import torch

    from grpo_math import kernels, models, rollouts

    saved = rollouts.generate_grouped, kernels.packed_linears  # imported at each call
    rollouts.generate_grouped = module.generate_grouped
    kernels.packed_linears = getattr(module, "packed_linears", lambda *_: contextlib.nullcontext())
    try:
        torch.manual_seed(0)
        start = time.perf_counter()
        out = models.generate(model, tokenizer, messages, stop_format=answer_format, **settings)
        seconds = time.perf_counter() - start
    finally:
        rollouts.generate_grouped, kernels.packed_linears = saved
    outputs = [[(c["text"], c["tokens"]) for c in o] for o in out]
    return {"seconds": seconds, "tokens": sum(n for o in outputs for _, n in o), "outputs": outputs, "rows": 64}


def eval_run(module, model, tokenizer, args) -> dict:
    """Greedy, 256 tokens, batch 64, on GSM8K test problems with the recipe's prompt."""
    data = GSM8K_DIR if (GSM8K_DIR / "test.jsonl").is_file() else ROOT / "tests" / "fixtures" / "gsm8k"
    answer_format, messages = messages_of(args.recipe, str(data), "test", args.eval_problems)
    return timed_generate(module, model, tokenizer, messages, answer_format, max_new_tokens=256, batch_size=64)


def sampled_run(module, model, tokenizer, args) -> dict:
    """``eval --samples 8 --temperature 1.0 --max_new_tokens 64 --batch_size 64`` on 8 held-out problems of the
    learning recipe's task (64 rows), the evaluation the issue measured at 28 tokens/s on an AVX2-only EPYC."""
    answer_format, messages = messages_of(args.recipe, None, "test", 8)
    settings = {"max_new_tokens": 64, "temperature": 1.0, "num_samples": 8, "batch_size": 64}
    return timed_generate(module, model, tokenizer, messages, answer_format, **settings)


def measure_machine(dtype) -> tuple[float, float]:
    """(memory read bytes/s, matmul FLOP/s in ``dtype``), best of a few runs on all of torch's threads."""
    import torch

    big = torch.ones(128 * 1024 * 1024, dtype=torch.float32)  # 512 MB, far past any cache
    a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
    read = matmul = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        big.sum()
        read = min(read, time.perf_counter() - start)
        start = time.perf_counter()
        a @ b
        matmul = min(matmul, time.perf_counter() - start)
    return big.numel() * 4 / read, 2 * 2048**3 / matmul


if __name__ == "__main__":
    raise SystemExit(main())
