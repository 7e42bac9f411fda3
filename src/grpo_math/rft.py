"""``grpo-math rft``: rejection-sampling fine-tuning (RFT, Yuan et al. 2023), the baseline a GRPO stage must beat.

From a starting checkpoint, sample K completions per training problem (``passrate.sample_problems``: the GRPO
prompt, ``eval``'s strict check, resumable), keep the correct ones that ended before ``max_completion_length``,
drop identical ones per problem, and fine-tune on them with TRL's ``SFTTrainer`` (``train.sft_stage``: prompt = the
GRPO prompt, completion = the model's own correct completion; the recipe's ``sft_*`` settings). Same problems and
budget as GRPO: K defaults to ``num_generations``, the number of problems to what a GRPO stage of the recipe samples
on one process (``max_steps x per_device_train_batch_size x gradient_accumulation_steps / num_iterations``
completions) / K, and the problems are the first ones GRPO's sampler visits (``grpo_order``: TRL's
``RepeatSampler`` with the recipe's seed over the training problems after ``sft_examples``). ``output_dir`` ends as
a plain HF checkpoint with ``grpo_math_config.yaml``, ``rft_data.jsonl`` (one line per problem: passes and the kept
completions; a rerun reuses it) and ``rft.json`` (settings, budget, counts, seconds, versions)::

    grpo-math rft --config recipes/cpu.yaml --dataset_name ../shared/data/gsm8k --model runs/cpu/sft \\
        --output_dir runs/cpu-rft

>>> rft_line({"completions": [{"text": t, "correct": {"strict": ok}, "truncated": cut} for t, ok, cut in
...     [("A ", True, False), ("A", True, False), ("B", True, True), ("C", False, False)]]})["completions"]
['A']
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from . import UserError
from .passrate import check_settings, histogram, pass_line, sample_problems, sampling_settings
from .runfiles import RFT_DATA_FILE, RFT_FILE, versions, write_json


@dataclass
class RFTConfig:
    """The RFT flags (recipe keys of the same names); the fine-tune itself uses the recipe's ``sft_*`` keys."""

    rft_samples: int | None = field(
        default=None, metadata={"help": "Completions sampled per problem (K); default num_generations (GRPO's group)."}
    )
    rft_problems: int | None = field(
        default=None,
        metadata={
            "help": "Problems to sample; default a GRPO stage's budget / K (max_steps x per_device_train_batch_size "
            "x gradient_accumulation_steps x processes / num_iterations), all of dataset_limit without max_steps."
        },
    )
    rft_batch_size: int = field(default=16, metadata={"help": "Sequences generated at once while sampling."})

    def __post_init__(self):
        for name in ("rft_samples", "rft_problems", "rft_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be >= 1, not {value}")


def rft_line(record: dict) -> dict:
    """One ``rft_data.jsonl`` line: pass counts, and the correct completions that ended (not cut by the token
    limit), stripped and deduplicated, in sampling order."""
    kept, truncated = [], 0
    for c in record["completions"]:
        if c["correct"]["strict"] and c["truncated"]:
            truncated += 1
        elif c["correct"]["strict"] and c["text"].strip() not in kept:
            kept.append(c["text"].strip())
    return pass_line(record) | {"truncated_correct": truncated, "completions": kept}


def grpo_budget(args) -> int | None:
    """Completions a GRPO stage with these settings samples on one process (None without ``max_steps``: it runs
    epochs). RFT runs on one process, so a GRPO run on N processes samples N times this: give ``--rft_problems``."""
    if args.max_steps <= 0:
        return None
    return args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps // args.num_iterations


def grpo_order(count: int, args, k: int) -> list[int]:
    """The indices of the first ``count`` distinct problems GRPO's sampler visits, in order: TRL's
    ``RepeatSampler`` as ``GRPOTrainer._get_train_sampler`` builds it (shuffled with ``args.seed``, groups of ``k``).

    >>> from types import SimpleNamespace
    >>> args = SimpleNamespace(generation_batch_size=8, num_iterations=1, steps_per_generation=1, seed=42)
    >>> grpo_order(3, args, 4) == grpo_order(3, args, 4) and sorted(grpo_order(10, args, 4)) == list(range(10))
    True
    """
    from trl.trainer.utils import RepeatSampler

    sampler = RepeatSampler(
        data_source=range(count),
        mini_repeat_count=k,
        batch_size=args.generation_batch_size // k,
        repeat_count=args.num_iterations * args.steps_per_generation,
        shuffle=True,
        seed=args.seed,
    )
    return list(dict.fromkeys(sampler))


def model_flag(argv: list[str]) -> list[str]:
    """``--model X`` (as ``eval`` and ``filter`` take it) is ``--model_name_or_path X``.

    >>> model_flag(["--model", "runs/sft", "--model=embedded", "--max_steps", "2"])
    ['--model_name_or_path', 'runs/sft', '--model_name_or_path=embedded', '--max_steps', '2']
    """
    return [
        "--model_name_or_path" + a.removeprefix("--model") if a == "--model" or a.startswith("--model=") else a
        for a in argv
    ]


def rft_command(argv: list[str]) -> int:
    """``grpo-math rft``: sample from ``--model``, keep the correct completions, fine-tune on them."""
    from .config import parse_train_args, to_dict
    from .console import setup_logging
    from .evaluate import Sampling
    from .models import load_tokenizer, resolve_model
    from .prompts import PromptSettings
    from .train import sft_stage

    setup_logging(main_process=True)
    argv = model_flag(argv)
    if not any(a in ("--output_dir", "-h", "--help") or a.startswith("--output_dir=") for a in argv):
        raise UserError("give --output_dir DIR for the RFT checkpoint (a recipe's output_dir is its GRPO run)")
    script, args, model_args, rft = parse_train_args(argv, prog="grpo-math rft", extra=(RFTConfig,))
    output, start_model = Path(args.output_dir), model_args.model_name_or_path
    path = resolve_model(start_model)  # a missing model fails before anything is sampled
    if Path(path).resolve() == output.resolve():
        raise UserError(f"--output_dir {output} is the starting model's folder: give another one")
    k = rft.rft_samples or args.num_generations
    problems, budget = training_problems(script, args, rft, k)
    prompt = PromptSettings.prompt_of(script)
    sampling = Sampling(k, args.temperature, args.top_p, args.max_completion_length, rft.rft_batch_size)
    settings = sampling_settings(start_model, prompt, sampling, args.seed)
    check_settings(output / RFT_FILE, settings)
    output.mkdir(parents=True, exist_ok=True)
    source = {
        "dataset_name": script.dataset_name,
        "split": script.dataset_train_split,
        "shuffle_seed": script.dataset_shuffle_seed,
        "skip": script.sft_examples,
        "order": f"GRPO's sampler (seed {args.seed})",
        "num_problems": len(problems),
    }
    info = {"complete": False, "model": start_model, "source": source, "settings": settings, "grpo_budget": budget}
    write_json(output / RFT_FILE, info)
    began = time.perf_counter()
    data_file = output / RFT_DATA_FILE
    lines = sample_problems(start_model, "auto", problems, prompt, sampling, data_file, rft_line, args.seed)
    sampled = time.perf_counter()
    counts = kept_counts(lines, k)
    tokenizer = load_tokenizer(path)
    dataset = rft_dataset(problems, lines, prompt, tokenizer)
    what = f"RFT (SFT) on {counts['kept']} correct completions of {counts['problems_with_kept']} problems"
    sft_stage(script, args, model_args, path, tokenizer, dataset, output, what, to_dict(script, model_args, args, rft))
    times = {
        "sampling_seconds": round(sampled - began, 1),
        "training_seconds": round(time.perf_counter() - sampled, 1),
    }
    write_json(output / RFT_FILE, info | {"complete": True, "counts": counts, **times, "versions": versions()})
    print(f"checkpoint: {output}")
    return 0


def training_problems(script, args, rft: RFTConfig, k: int):
    """``(problems, GRPO's budget)``: ``rft_problems`` or budget / K problems, the first ones GRPO's sampler visits
    among the problems GRPO trains on (after ``sft_examples``, at most ``dataset_limit``); prints what it took."""
    from .data import load_problems

    budget = grpo_budget(args)
    pool = load_problems(
        script.dataset_name,
        script.dataset_train_split,
        script.dataset_limit,
        script.dataset_shuffle_seed,
        script.skip_bad_rows,
        skip=script.sft_examples,
    )
    wanted = min(rft.rft_problems or (max(1, budget // k) if budget else len(pool)), len(pool))
    problems = [pool[i] for i in grpo_order(len(pool), args, k)[:wanted]]
    grpo = f"{budget} ({args.max_steps} steps of {budget // args.max_steps})" if budget else "K per problem and epoch"
    print(
        f"RFT budget: {len(problems)} problems x {k} samples = {len(problems) * k} completions, the first problems "
        f"GRPO's sampler visits (seed {args.seed}); a GRPO stage of these settings samples {grpo} on one process"
    )
    return problems, budget


def kept_counts(lines: list[dict], k: int) -> dict:
    """Counts over the ``rft_data.jsonl`` lines (sampled, correct, truncated and duplicate ones dropped, kept),
    printed; no kept completion is an error."""
    counts = summarize(lines, k)
    print(
        f"kept {counts['kept']} correct completions of {counts['sampled']} on {counts['problems_with_kept']} of "
        f"{len(lines)} problems ({counts['duplicates']} duplicates and {counts['truncated_correct']} truncated "
        f"dropped)\npasses per problem: {histogram([line['passed'] for line in lines], k)}"
    )
    if not counts["kept"]:
        raise UserError(
            f"no correct completion among {counts['sampled']} samples: nothing to fine-tune on; start from a "
            "stronger checkpoint (e.g. the cold start, runs/<recipe>/sft) or raise --rft_samples / the temperature"
        )
    return counts


def summarize(lines: list[dict], k: int) -> dict:
    """Counts over the ``rft_data.jsonl`` lines: sampled, correct, truncated and duplicate ones dropped, kept."""
    correct = sum(line["passed"] for line in lines)
    truncated = sum(line["truncated_correct"] for line in lines)
    kept = sum(len(line["completions"]) for line in lines)
    return {
        "problems": len(lines),
        "sampled": len(lines) * k,
        "correct": correct,
        "truncated_correct": truncated,
        "duplicates": correct - truncated - kept,
        "kept": kept,
        "problems_with_kept": sum(bool(line["completions"]) for line in lines),
        "histogram": {str(j): sum(line["passed"] == j for line in lines) for j in range(k + 1)},
    }


def rft_dataset(problems, lines: list[dict], prompt, tokenizer):
    """Prompt-completion rows for ``SFTTrainer``: the GRPO prompt of each problem with each kept completion."""
    from datasets import Dataset

    from .data import build_prompt, few_shot_examples
    from .train import prompt_completion

    shots = few_shot_examples(prompt.num_few_shot)
    rows = [
        {"prompt": build_prompt(p.question, prompt.answer_format, prompt.system_prompt, shots), "text": text}
        for p, line in zip(problems, lines)
        for text in line["completions"]
    ]
    return prompt_completion(Dataset.from_list(rows), tokenizer, lambda row: row["text"])
