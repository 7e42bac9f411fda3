"""``grpo-math eval`` and ``ask``: generate for GSM8K problems as training prompts them, score every completion
with the extractors the rewards use, and write one JSONL line per problem plus ``results.json``.

Prompts are built exactly as in training (``data.build_prompt`` with the recipe's answer format, system prompt
and few-shot count, ``config.PromptSettings``); completions are scored by ``metrics.score_problem`` with
``answers.extract_strict`` / ``extract_flexible`` / ``answers_match``, so the reported accuracy and the training
signal cannot drift apart. Under ``torch.distributed`` (torchrun) each rank evaluates every world_size-th
problem; rank 0 gathers and writes.

>>> Sampling(samples=4, temperature=0.0)  # doctest: +ELLIPSIS
Traceback (most recent call last):
grpo_math.UserError: --samples 4 needs --temperature > 0 (greedy decoding gives 4 identical completions), ...
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from . import ArgumentParser, UserError
from .compare import compare_results, format_comparison
from .data import LM_EVAL_STOP, build_prompt, few_shot_examples, lm_eval_prompt, load_problems, problem_source
from .metrics import LM_EVAL_REGEX, format_value, score_problem, summarize
from .models import torchrun_env
from .prompts import PromptSettings
from .runfiles import COMPARE_FILE, CONFIG_FILE, RESULTS_FILE, SAMPLES_FILE, read_config, versions, write_results

EVAL_VERSION = 2  # bump when prompts, extraction or metric definitions change (2: generation stops at the answer)


@dataclass
class Sampling:
    """How completions are generated: ``samples`` per problem (K > 1 adds pass@k, maj@K and needs temperature > 0),
    ``temperature`` (0 = greedy), ``top_p``, ``max_new_tokens`` and ``batch_size`` (sequences at once)."""

    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 16

    def __post_init__(self):
        if self.samples < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise UserError("--samples, --max_new_tokens and --batch_size must be >= 1")
        if self.samples > 1 and self.temperature <= 0:
            raise UserError(
                f"--samples {self.samples} needs --temperature > 0 (greedy decoding gives "
                f"{self.samples} identical completions), e.g. --temperature 0.7"
            )
        if self.temperature < 0:
            raise UserError("--temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise UserError("--top_p must be in (0, 1]")


# ---- generation ------------------------------------------------------------------------------------------


def evaluate_model(
    model, tokenizer, problems, prompt, sampling: Sampling | None = None, progress: bool = False
) -> tuple[dict, list[dict]]:
    """Generate for ``problems`` (``data.Problem``s) and score them: ``(metrics, samples)``.

    ``prompt`` has ``config.PromptSettings``' fields (answer format, system prompt, few-shot count, and reward
    names and weights: each reward part is added per completion when ``reward_funcs`` is not empty). ``samples``
    are the ``samples.jsonl`` records in problem order. Under ``torch.distributed`` every rank must call this with
    the same problems; each generates its share, rank 0 receives all records (the others get ``[]``) and every
    rank gets the metrics.
    """
    from . import models

    sampling = sampling or Sampling()
    rank, world, dist = _distributed()
    mine = list(range(rank, len(problems), world))
    if prompt.lm_eval_shots is not None:
        prompts = [lm_eval_prompt(problems[i].question, prompt.lm_eval_shots) for i in mine]
        stop = {"stop_strings": LM_EVAL_STOP}
    else:
        shots = few_shot_examples(prompt.num_few_shot)
        prompts = [build_prompt(problems[i].question, prompt.answer_format, prompt.system_prompt, shots) for i in mine]
        stop = {"stop_format": prompt.answer_format}
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        with _ProgressBar(len(prompts), enabled=progress and rank == 0) as on_batch:
            outputs = models.generate(
                model,
                tokenizer,
                prompts,
                sampling.max_new_tokens,
                sampling.temperature,
                sampling.samples,
                sampling.batch_size,
                sampling.top_p,
                progress=on_batch,
                **stop,
            )
    finally:
        tokenizer.padding_side = padding_side
    records = [
        {
            **score_problem(i, problems[i], out, prompt.answer_format, prompt.reward_funcs, prompt.reward_weights),
            "rank": rank,
        }
        for i, out in zip(mine, outputs)
    ]
    if dist is None:
        return summarize(records)[0], records
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(records, gathered, dst=0)
    records = sorted((r for part in gathered for r in part), key=lambda r: r["index"]) if rank == 0 else []
    box = [summarize(records)[0] if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0], records


def _distributed():
    """``(rank, world_size, torch.distributed or None)``; None when not running with several processes."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size(), dist
    return 0, 1, None


def _init_distributed():
    """Join the process group when launched by torchrun with several processes (no-op otherwise)."""
    import torch

    _, local_rank, world = torchrun_env()
    if world > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return _distributed()


class _ProgressBar:
    """tqdm bar over problems showing generated tokens/s; yields ``models.generate``'s progress callback."""

    def __init__(self, total: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="problem", desc="eval", disable=not enabled, dynamic_ncols=True)
        self.tokens, self.start = 0, time.perf_counter()

    def __enter__(self):
        return self.update

    def update(self, problems_done: int, new_tokens: int) -> None:
        self.tokens += new_tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)
        self.bar.update(problems_done)

    def __exit__(self, *exc):
        self.bar.close()


# ---- grpo-math eval --------------------------------------------------------------------------------------


def add_problem_flags(parser: ArgumentParser, split: str) -> None:
    """``--dataset_name``, ``--split`` and ``--limit``: which problems a command reads (eval, filter)."""
    import os

    default, where = os.environ.get("GRPO_MATH_GSM8K_DIR") or "openai/gsm8k", f"a folder with {split}.jsonl"
    help = f"openai/gsm8k, {where}, builtin or gym:<task> (default: $GRPO_MATH_GSM8K_DIR, else openai/gsm8k)"
    parser.add_argument("--dataset_name", default=default, help=help)
    parser.add_argument("--split", default=split)
    parser.add_argument("--limit", type=int, help="first N problems (file order, so every run sees the same ones)")


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="grpo-math eval", description="GSM8K accuracy of a model (strict/flexible, lm-eval, pass@k, maj@k)."
    )
    parser.add_argument(
        "--model",
        help="hub id, HF folder, checkpoint, .gguf file or 'embedded' (default: embedded; "
        "with --before-after: the base model, default the trained run's model_name_or_path)",
    )
    add_problem_flags(parser, "test")
    parser.add_argument(
        "--samples", type=int, default=1, help="completions per problem (K); K > 1 adds pass@k, maj@K, mean@K"
    )
    parser.add_argument("--temperature", type=float, help="0 = greedy (default for K=1); K > 1 needs a value > 0")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16, help="sequences generated at once")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    parser.add_argument(
        "--config",
        help="recipe whose prompt and reward settings to use (default: the settings saved "
        "with a trained model, else the defaults)",
    )
    parser.add_argument("--skip_bad_rows", action="store_true", help="skip rows without a parseable gold answer")
    parser.add_argument(
        "--lm_eval_prompt",
        action="store_true",
        help="lm-eval-harness's gsm8k prompt: 5-shot 'Question: ...\\nAnswer:' from the first 5 train problems (its "
        "first_n sampler), plain text, stop at 'Question:'; answers read as '#### N'",
    )
    parser.add_argument("--output", help="result folder (default: runs/eval/<model>)")
    parser.add_argument(
        "--before-after",
        "--before_after",
        dest="before_after",
        metavar="TRAINED",
        help="evaluate --model (base) and TRAINED on the same problems: OUTPUT/base, OUTPUT/final, "
        "OUTPUT/compare.json with per-problem differences",
    )
    return parser


def eval_command(argv: list[str]) -> int:
    """``grpo-math eval``: evaluate one model (or a base and a trained one), write and print the results."""
    args = make_parser().parse_args(argv)
    sampling = sampling_from(args)
    rank, _, _ = _init_distributed()
    prompt = PromptSettings.load(args.config, args.before_after or args.model)
    problems = load_problems(args.dataset_name, args.split, args.limit, None, args.skip_bad_rows)
    if args.lm_eval_prompt:
        prompt.answer_format, prompt.system_prompt, prompt.num_few_shot = "hash", None, 5
        prompt.lm_eval_shots = load_problems(args.dataset_name, "train", 5)
    data = problem_source(args, problems)
    if args.before_after:
        eval_before_after(args, problems, data, prompt, sampling, rank == 0)
    else:
        eval_one(args, problems, data, prompt, sampling, rank == 0)
    return 0


def sampling_from(args) -> Sampling:
    """The eval flags as ``Sampling``; temperature defaults to greedy for one sample."""
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be >= 1")
    temperature = 0.0 if args.temperature is None else args.temperature  # K > 1 then asks for --temperature
    return Sampling(args.samples, temperature, args.top_p, args.max_new_tokens, args.batch_size)


def eval_one(args, problems, data: dict, prompt, sampling: Sampling, main_process: bool) -> None:
    model = args.model or "embedded"
    output = Path(args.output or Path("runs") / "eval" / slug(model))
    results = run_eval(model, problems, data, prompt, sampling, args, output)
    if main_process:
        print(format_results(results))
        print(f"\nwrote {output / RESULTS_FILE} and {output / SAMPLES_FILE}")


def eval_before_after(args, problems, data: dict, prompt, sampling: Sampling, main_process: bool) -> None:
    """The base model and the trained one on the same problems, then their paired comparison."""
    trained = args.before_after
    saved = Path(trained) / CONFIG_FILE
    base = args.model or (read_config(saved).get("model_name_or_path") if saved.is_file() else None)
    if not base:
        raise UserError(
            f"--before-after {trained}: give the base model with --model (no {CONFIG_FILE} "
            f"with model_name_or_path in {trained})"
        )
    output = Path(args.output or Path("runs") / "eval" / f"{slug(trained)}-before-after")
    for name, folder in ((base, "base"), (trained, "final")):
        results = run_eval(name, problems, data, prompt, sampling, args, output / folder)
        if main_process:
            print(f"\n{folder}: {name}\n{format_results(results)}")
    if main_process:
        comparison = compare_results(output / "base", output / "final")
        (output / COMPARE_FILE).write_text(json.dumps(comparison, indent=1) + "\n")
        print("\n" + format_comparison(comparison))
        print(f"\nwrote {output}/base, {output}/final and {output / COMPARE_FILE}")


def run_eval(model_name: str, problems, data: dict, prompt, sampling: Sampling, args, output: Path) -> dict:
    """Evaluate ``model_name`` on ``problems`` and (rank 0) write ``output``; return the results (``{}`` elsewhere)."""
    import torch

    model, tokenizer, path = load_for_eval(model_name, args.dtype)
    metrics, records, seconds = timed_evaluation(model, tokenizer, problems, prompt, sampling, args.seed)
    dtype = str(model.dtype).removeprefix("torch.")
    del model  # freed before before-after loads the second model (a helper's `del` would free nothing)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if not records:
        return {}
    results = results_record(model_name, path, dtype, data, prompt, sampling, args, metrics, records, seconds)
    write_results(output, results, records)
    return results


def load_for_eval(model_name: str, dtype: str):
    """``models.load_model`` on this process's GPU (its LOCAL_RANK under torchrun), else the CPU."""
    import torch

    from .models import load_model

    device = f"cuda:{torchrun_env()[1]}" if torch.cuda.is_available() else None
    return load_model(model_name, dtype, device)


def timed_evaluation(model, tokenizer, problems, prompt, sampling: Sampling, seed: int):
    """``evaluate_model`` with the sampling seed set per rank: ``(metrics, records, seconds)``."""
    import torch

    torch.manual_seed(seed + _distributed()[0])
    start = time.perf_counter()
    metrics, records = evaluate_model(model, tokenizer, problems, prompt, sampling, progress=True)
    return metrics, records, time.perf_counter() - start


def results_record(model_name, path, dtype, data, prompt, sampling, args, metrics, records, seconds) -> dict:
    """The ``results.json`` object: metrics, intervals, the model, the data, every setting and the timing."""
    import torch

    tokens = sum(c["tokens"] for r in records for c in r["completions"])
    return {
        "metrics": metrics,
        "ci95": summarize(records)[1],
        "model": model_name,
        "model_path": str(path),
        "data": data,
        "settings": {
            "eval_version": EVAL_VERSION,
            "prompt_style": "chat" if prompt.lm_eval_shots is None else "lm-eval",
            **prompt.as_dict(),
            "prompt_settings_from": prompt.source,
            "samples": sampling.samples,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_new_tokens": sampling.max_new_tokens,
            "batch_size": sampling.batch_size,
            "seed": args.seed,
            "dtype": args.dtype,
            "extraction": {
                "strict": f"answers.extract_strict(answer_format={prompt.answer_format!r})",
                "flexible": "answers.extract_flexible (last number)",
                "lm_eval_strict": LM_EVAL_REGEX["strict"].pattern + " (first match)",
                "lm_eval_flexible": LM_EVAL_REGEX["flexible"].pattern + " (last match)",
            },
        },
        "versions": versions(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "dtype": dtype,
        "world_size": _distributed()[1],
        "seconds": round(seconds, 2),
        "generated_tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 1),
        "problems_per_second": round(len(records) / seconds, 3),
    }


# ---- grpo-math ask --------------------------------------------------------------------------------------


def ask_command(argv: list[str]) -> int:
    """Print the model's completion for one question and the answer extracted from it."""
    parser = ArgumentParser(prog="grpo-math ask", description=ask_command.__doc__)
    parser.add_argument("question")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--config", help="recipe whose answer_format/system_prompt/num_few_shot to use")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args(argv)
    from .answers import extract_flexible, extract_strict
    from .models import generate, load_model

    prompt = PromptSettings.load(args.config, args.model)  # the recipe's, else those saved with a trained model
    shots = few_shot_examples(prompt.num_few_shot)
    model, tokenizer, _ = load_model(args.model)
    messages = build_prompt(args.question, prompt.answer_format, prompt.system_prompt, shots)
    [[out]] = generate(model, tokenizer, [messages], args.max_new_tokens, args.temperature)
    print(out["text"])
    print(f"\nanswer (strict, {prompt.answer_format}): {extract_strict(out['text'], prompt.answer_format)}")
    print(f"answer (flexible): {extract_flexible(out['text'])}")
    return 0


def slug(model: str) -> str:
    """A folder name for a model.

    >>> slug("runs/grpo/checkpoint-50"), slug("Qwen/Qwen2.5-0.5B-Instruct"), slug("embedded")
    ('grpo-checkpoint-50', 'Qwen-Qwen2.5-0.5B-Instruct', 'embedded')
    """
    return re.sub(r"[^\w.-]+", "-", "-".join(Path(model.rstrip("/")).parts[-2:])).strip("-.") or "model"


def format_results(results: dict) -> str:
    """The metrics table printed at the end of ``grpo-math eval``."""
    m, ci, data = results["metrics"], results["ci95"], results["data"]
    lines = [f"{'metric':<24} {'value':>8}   95% CI (n={data['num_problems']} problems)"]
    for key, value in m.items():
        interval = f"[{format_value(key, ci[key][0])}, {format_value(key, ci[key][1])}]" if key in ci else ""
        lines.append(f"{key:<24} {format_value(key, value):>8}   {interval}")
    s = results["settings"]
    lines.append(
        f"\n{data['dataset_name']} [{data['split']}], {results['model']}, answer_format={s['answer_format']}, "
        f"samples={s['samples']}, temperature={s['temperature']}, max_new_tokens={s['max_new_tokens']}; "
        f"{results['seconds']:.0f} s, {results['tokens_per_second']:.0f} generated tokens/s"
    )
    return "\n".join(lines)
