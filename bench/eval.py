"""Benchmark (not a test): ``grpo-math eval`` against lm-eval-harness's HF backend in one run.

Both tools evaluate the same model on the same first N GSM8K test problems, greedy, with the same
max new tokens and batch size, one after the other on this machine; each runs as its own process, so
the wall clock covers start-up and model loading for both (each tool's own timer is printed too).

lm-eval runs its own ``gsm8k`` task (5-shot "Question: ... Answer:", stop at "Question:", strict-match
and flexible-extract), read from the installed lm_eval package and pointed at the local
``test.jsonl``/``train.jsonl`` (``dataset_path: json``), fully offline, with its ``first_n`` few-shot sampler
(the first 5 train problems for every question). By default (``--prompt lm-eval``) grpo-math runs
``eval --lm_eval_prompt``: the same prompt text and stop sequences, so both do the same token work and lm-eval's
own extractions (``lm_eval_strict`` / ``lm_eval_flexible``) must agree within one problem; the number of problems
whose completions differ is printed. ``--prompt chat`` gives grpo-math its own prompt (chat template, 0-shot)
instead: then the prompts differ by design and mean prompt and generated tokens show by how much.

    pip install lm-eval            # developed against lm_eval 0.4.13
    python bench/eval.py           # embedded model, 64 problems, 256 new tokens, batch 16 (minutes)
    python bench/eval.py --limit 4 --max_new_tokens 32   # quick check that both sides run

GSM8K files: ``$GRPO_MATH_GSM8K_DIR`` or ``../shared/data/gsm8k`` next to the project (``--data_dir``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import GSM8K_DIR, ROOT

TASK = "gsm8k_grpo_math_local"
# Environment of both tools' processes: offline, plus the thread count of --threads.
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded", help="hub id, folder, .gguf or embedded (as grpo-math takes)")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--prompt", choices=("lm-eval", "chat"), default="lm-eval", help="grpo-math's prompt")
    parser.add_argument(
        "--data_dir",
        help="folder with GSM8K's test.jsonl and train.jsonl",
        default=GSM8K_DIR,
    )
    parser.add_argument("--output", help="keep both tools' outputs here (default: a temporary folder)")
    parser.add_argument(
        "--threads",
        type=int,
        help="OMP/MKL threads for both tools (default: torch's choice); on a "
        "busy machine 1 can be many times faster than oversubscribed cores",
    )
    args = parser.parse_args()
    if args.threads:
        CHILD_ENV.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    data = Path(args.data_dir).resolve()
    if not (data / "test.jsonl").is_file() or not (data / "train.jsonl").is_file():
        parser.error(f"{data} needs test.jsonl and train.jsonl (official GSM8K files); set --data_dir")

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        out = Path(args.output or tmp)
        out.mkdir(parents=True, exist_ok=True)
        model = prepare_model(args.model)
        dtype = model_dtype()
        print(
            f"model {args.model} -> {Path(model).name} ({dtype}); {args.limit} problems, "
            f"max_new_tokens {args.max_new_tokens}, batch {args.batch_size}",
            flush=True,
        )
        ours = run_grpo_math(model, dtype, data, args, out / "grpo-math")
        theirs = run_lm_eval(model, dtype, data, args, out / "lm-eval")
        if args.output:
            print(f"outputs kept in {out}")
        report(ours, theirs, model, data, args)
    return 0


def prepare_model(name: str) -> str:
    """Resolve (and convert once) the model outside the timed runs; both tools get the same local folder."""
    done = subprocess.run(
        [sys.executable, "-m", "grpo_math", "prepare-model", "--model", name],
        capture_output=True,
        text=True,
        env={**os.environ, **CHILD_ENV},
    )
    if done.returncode:
        sys.exit(f"prepare-model failed: {done.stderr.strip()}")
    return done.stdout.strip().splitlines()[-1]


def model_dtype() -> str:
    """The dtype grpo-math's "auto" picks here; lm-eval is given the same."""
    from grpo_math.models import torch_dtype

    return str(torch_dtype("auto")).removeprefix("torch.")


def timed(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **CHILD_ENV}, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(
            f"{' '.join(cmd[:4])} ... failed (exit {done.returncode}); last lines of {log}:\n"
            + "\n".join(log.read_text().splitlines()[-15:])
        )
    return seconds


def run_grpo_math(model: str, dtype: str, data: Path, args, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "grpo_math",
        "eval",
        "--model",
        model,
        "--dataset_name",
        str(data),
        "--split",
        "test",
        "--limit",
        str(args.limit),
        "--max_new_tokens",
        str(args.max_new_tokens),
        "--batch_size",
        str(args.batch_size),
        "--dtype",
        dtype,
        "--output",
        str(out),
        *(["--lm_eval_prompt"] if args.prompt == "lm-eval" else []),
    ]
    print("running grpo-math eval ...", flush=True)
    wall = timed(cmd, out / "log.txt")
    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return {
        "questions": [r["question"] for r in records],
        "texts": [r["completions"][0]["text"] for r in records],
        "wall": wall,
        "own_seconds": results.get("seconds"),
        "metrics": metrics,
        "new_tokens": metrics.get("mean_completion_tokens"),
        "prompt_tokens": grpo_math_prompt_tokens(model, data, args.limit, args.prompt),
        "strict": metrics.get("strict_accuracy"),
        "flexible": metrics.get("flexible_accuracy"),
    }


def grpo_math_prompt_tokens(model: str, data: Path, limit: int, style: str) -> float:
    """Mean prompt length of grpo-math eval's prompts (lm-eval's, or the default recipe's), in tokens."""
    from grpo_math.config import PromptSettings
    from grpo_math.data import build_prompt, few_shot_examples, lm_eval_prompt, load_problems
    from grpo_math.models import apply_template, load_tokenizer

    tokenizer, prompt = load_tokenizer(model), PromptSettings()
    shots = few_shot_examples(prompt.num_few_shot)
    train = load_problems(str(data), "train", 5)
    texts = [
        lm_eval_prompt(p.question, train)
        if style == "lm-eval"
        else apply_template(tokenizer, build_prompt(p.question, prompt.answer_format, prompt.system_prompt, shots))
        for p in load_problems(str(data), "test", limit)
    ]
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) / len(texts)


def write_task(folder: Path, data: Path, max_new_tokens: int) -> None:
    """lm-eval's own gsm8k.yaml (from the installed package), reading the local files instead of the hub."""
    import lm_eval
    import yaml

    spec = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks/gsm8k/gsm8k.yaml").read_text())
    spec.pop("tag", None)
    spec.update(
        task=TASK,
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {"train": str(data / "train.jsonl"), "test": str(data / "test.jsonl")}},
        fewshot_config={**spec.get("fewshot_config", {}), "sampler": "first_n"},
        num_fewshot=5,
    )
    spec["generation_kwargs"]["max_gen_toks"] = max_new_tokens
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def run_lm_eval(model: str, dtype: str, data: Path, args, out: Path) -> dict:
    import torch

    write_task(out / "tasks", data, args.max_new_tokens)
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "run",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model},dtype={dtype}",
        "--tasks",
        TASK,
        "--include_path",
        str(out / "tasks"),
        "--limit",
        str(args.limit),
        "--batch_size",
        str(args.batch_size),
        "--device",
        "cuda" if torch.cuda.is_available() else "cpu",
        "--output_path",
        str(out),
        "--log_samples",
    ]
    print("running lm-eval ...", flush=True)
    wall = timed(cmd, out / "log.txt")
    results = json.loads(newest(out, "results_*.json").read_text())
    scores = results["results"][TASK]
    samples = lm_eval_samples(newest(out, f"samples_{TASK}_*.jsonl"))
    prompt_tokens, new_tokens = lm_eval_tokens(model, samples)
    return {
        "questions": [samples[i]["doc"]["question"] for i in sorted(samples)],
        "texts": [samples[i]["resps"][0][0] for i in sorted(samples)],
        "prompts": [samples[i]["arguments"]["gen_args_0"]["arg_0"] for i in sorted(samples)],
        "wall": wall,
        "own_seconds": float(results.get("total_evaluation_time_seconds", "nan")),
        "strict": scores.get("exact_match,strict-match"),
        "flexible": scores.get("exact_match,flexible-extract"),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
    }


def newest(folder: Path, pattern: str) -> Path:
    """lm-eval names its files by model and time: the latest match under ``folder``."""
    return max(map(Path, glob.glob(str(folder / "**" / pattern), recursive=True)), key=lambda p: p.stat().st_mtime)


def lm_eval_samples(samples_file: Path) -> dict[int, dict]:
    """lm-eval's logged samples by document (it logs each document once per filter)."""
    return {s["doc_id"]: s for s in map(json.loads, samples_file.read_text().splitlines())}


def lm_eval_tokens(model: str, samples: dict[int, dict]) -> tuple[float, float]:
    """Mean prompt and generated tokens of lm-eval's logged samples."""
    from grpo_math.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    prompts = [s["arguments"]["gen_args_0"]["arg_0"] for s in samples.values()]
    outputs = [s["resps"][0][0] for s in samples.values()]

    def mean_tokens(texts):
        return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) / len(texts)

    return mean_tokens(prompts), mean_tokens(outputs)


def report(ours: dict, theirs: dict, model: str, data: Path, args) -> None:
    def num(v, spec=".3f"):
        return "n/a" if v is None else format(v, spec)

    rows = [
        ("wall seconds (process start to exit)", num(ours["wall"], ".1f"), num(theirs["wall"], ".1f")),
        ("problems/s (wall)", num(args.limit / ours["wall"]), num(args.limit / theirs["wall"])),
        ("own timer, seconds", num(ours["own_seconds"], ".1f"), num(theirs["own_seconds"], ".1f")),
        ("mean prompt tokens", num(ours["prompt_tokens"], ".0f"), num(theirs["prompt_tokens"], ".0f")),
        ("mean generated tokens", num(ours["new_tokens"], ".0f"), num(theirs["new_tokens"], ".0f")),
        ("strict accuracy", num(ours["strict"]), num(theirs["strict"])),
        ("flexible accuracy", num(ours["flexible"]), num(theirs["flexible"])),
    ]
    import lm_eval
    import torch

    print(
        f"\nmodel {Path(model).name}, {args.limit} GSM8K test problems from {os.path.relpath(data, ROOT)}, "
        f"max_new_tokens {args.max_new_tokens}, "
        f"batch {args.batch_size}, lm_eval {getattr(lm_eval, '__version__', '?')}, torch {torch.__version__}, "
        f"{'cuda' if torch.cuda.is_available() else f'cpu, threads {args.threads or torch.get_num_threads()}'}"
    )
    print(f"{'':40}{'grpo-math eval':>16}{'lm-eval hf':>14}")
    for name, a, b in rows:
        print(f"{name:40}{a:>16}{b:>14}")
    extra = {k: v for k, v in ours["metrics"].items() if k.startswith("lm_eval_")}
    if extra:
        print("lm-eval's extractions on grpo-math's outputs: " + ", ".join(f"{k} {v:.3f}" for k, v in extra.items()))
    same = [q.strip() for q in ours["questions"]] == [q.strip() for q in theirs["questions"]]
    print(f"same {args.limit} problems in the same order: {'yes' if same else 'NO: the comparison is not valid'}")
    if args.prompt == "lm-eval":
        from grpo_math.data import lm_eval_prompt, load_problems

        train = load_problems(str(data), "train", 5)
        prompts = [lm_eval_prompt(q.strip(), train) for q in ours["questions"]]
        print(f"same prompt text as lm-eval: {sum(a == b for a, b in zip(prompts, theirs['prompts']))}/{args.limit}")
        differ = sum(a.strip() != b.strip() for a, b in zip(ours["texts"], theirs["texts"]))
        print(f"problems whose greedy completions differ (stripped): {differ}/{args.limit}")
    own = theirs["own_seconds"] / ours["own_seconds"] if ours["own_seconds"] and theirs["own_seconds"] else None
    print(
        f"ratio of problems/s, grpo-math / lm-eval: {theirs['wall'] / ours['wall']:.2f} (wall), "
        f"{num(own, '.2f')} (own timers)"
    )


if __name__ == "__main__":
    sys.exit(main())
