"""GSM8K evaluation: accuracy with confidence intervals, lm-eval-harness's extractions, and paired comparison.

``grpo-math eval`` prompts exactly as training does (``data.build_prompt`` with the recipe's answer format,
system prompt and few-shot count), generates with ``models.generate`` and scores every completion with the
extractors the rewards use (``answers.extract_strict`` / ``extract_flexible`` / ``answers_match``), so the
reported accuracy and the training signal cannot drift apart.

Metrics (``results.json`` ``metrics``; each is the mean over problems of the per-problem value stored in
``samples.jsonl`` ``scores``, which is what ``compare`` tests pairwise):

* ``strict_accuracy``: answer in the asked format and correct; ``flexible_accuracy``: last number correct;
  ``format_rate``: an answer could be read in the asked format (one marker, or several that agree);
  ``truncation_rate``: stopped by ``max_new_tokens`` before EOS; ``mean_completion_tokens``.
* ``lm_eval_strict`` / ``lm_eval_flexible``: lm-evaluation-harness's gsm8k "strict-match" (first
  ``#### N``) and "flexible-extract" (last number-like match) filters with its exact-match normalisation,
  on the same outputs (cut at its stop sequences), so numbers compare with published ones. Strict-match
  only fires on ``####`` lines, i.e. with ``answer_format: hash``.
* With ``--samples K`` (K > 1, temperature > 0), on strict correctness: ``pass@k`` (unbiased estimator of
  Chen et al. 2021, k = 2, 4, ..., K), ``maj@K`` (majority vote over the strict answers) and ``mean@K``
  (mean correctness = pass@1 = strict_accuracy). The other rates are then means over all K*N completions.
* ``reward`` and ``reward/<name>``: the recipe's reward parts averaged (``samples.jsonl`` keeps them per
  completion).

``ci95`` holds a 95% Wilson interval for every rate, with n = number of problems (exact for one sample per
problem; conservative for averages over K samples, which vary less than a 0/1 outcome with the same mean).

``compare`` matches problems by index and question and runs an exact two-sided sign test on the per-problem
values of each metric; for 0/1 outcomes this is McNemar's exact test on the discordant pairs.

Under ``torch.distributed`` each rank evaluates every world_size-th problem; rank 0 gathers and writes.

>>> wilson(8, 10)
(0.4902, 0.9433)
>>> pass_at_k(n=5, c=2, k=2), lm_eval_extract("so 7 + 8 = 15.\\n#### 15", "strict")
(0.7, '15')
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
from collections import Counter
from math import comb
from pathlib import Path

from . import UserError, __version__
from .answers import answers_match, extract_flexible, extract_strict, parse_number
from .data import SYSTEM_PROMPT, build_prompt, load_problems
from .runfiles import COMPARE_FILE, CONFIG_FILE, RESULTS_FILE, SAMPLES_FILE

EVAL_VERSION = 1  # bump when prompts, extraction or metric definitions change
ALPHA = 0.05

# lm-evaluation-harness lm_eval/tasks/gsm8k/gsm8k.yaml (version 3.0): filters, exact_match settings, stop sequences.
LM_EVAL_REGEX = {"strict": re.compile(r"#### (\-?[0-9\.\,]+)"), "flexible": re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")}
LM_EVAL_TAKE = {"strict": 0, "flexible": -1}  # group_select: first match / last match
LM_EVAL_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")  # regexes_to_ignore, then ignore_case
LM_EVAL_UNTIL = ("Question:", "</s>", "<|im_end|>")

CORRECTNESS = ("strict", "flexible", "lm_eval_strict", "lm_eval_flexible")
ACCURACY_KEY = {"strict": "strict_accuracy", "flexible": "flexible_accuracy",
                "lm_eval_strict": "lm_eval_strict", "lm_eval_flexible": "lm_eval_flexible"}
NOT_RATES = ("mean_completion_tokens", "reward")


# ---- statistics ------------------------------------------------------------------------------------------

def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (rounded to 4 places); (0, 1) when n is 0."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (round(max(0.0, center - half), 4), round(min(1.0, center + half), 4))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test (McNemar's exact test when the pairs are 0/1 outcomes).

    >>> sign_test(0, 0), round(sign_test(1, 9), 4)
    (1.0, 0.0215)
    """
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def majority(answers: list[str | None]) -> str | None:
    """The most frequent answer (numbers compared by value; ties go to the earliest); None when none given.

    >>> majority(["12", None, "12.0", "7", "7"])
    '12'
    """
    first, votes = {}, Counter()
    for answer in answers:
        if answer is not None:
            value = parse_number(answer)
            key = ("number", round(value, 6)) if value is not None else ("text", answer.strip())
            first.setdefault(key, answer)
            votes[key] += 1
    return first[max(votes, key=votes.get)] if votes else None


# ---- lm-evaluation-harness gsm8k ----------------------------------------------------------------------

def lm_eval_extract(text: str, mode: str) -> str | None:
    """What lm-eval's gsm8k filter keeps: "strict" = first ``#### N``, "flexible" = last number-like match.

    None where lm-eval would keep "[invalid]".

    >>> lm_eval_extract("She has 3 apples, so $1,200.", "flexible"), lm_eval_extract("no answer", "strict")
    ('$1,200.', None)
    """
    for stop in LM_EVAL_UNTIL:
        text = text.split(stop, 1)[0]
    matches = LM_EVAL_REGEX[mode].findall(text)
    if not matches:
        return None
    match = matches[LM_EVAL_TAKE[mode]]
    if isinstance(match, tuple):
        match = [group for group in match if group][0]
    return match.strip()


def lm_eval_normalize(text: str) -> str:
    """lm-eval's exact_match preprocessing for gsm8k (applied to prediction and reference alike).

    >>> lm_eval_normalize("$1,200."), lm_eval_normalize("48/2 = <<48/2=24>>24\\n#### 24")
    ('1200', '24')
    """
    for pattern in LM_EVAL_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def lm_eval_correct(pred: str | None, gold: str) -> bool:
    """lm-eval's exact match of a filtered prediction against the gold answer (string equality)."""
    return pred is not None and lm_eval_normalize(pred) == lm_eval_normalize(gold)


# ---- scoring ---------------------------------------------------------------------------------------------

def score_completion(text: str, gold: str, answer_format: str) -> dict:
    """Extracted answers and their correctness for one completion, under all four extractions.

    >>> c = score_completion("<think>6*4 = 24</think>\\n<answer>24</answer>", "24", "tags")
    >>> c["answers"]["strict"], c["correct"]
    ('24', {'strict': True, 'flexible': True, 'lm_eval_strict': False, 'lm_eval_flexible': True})
    """
    answers = {"strict": extract_strict(text, answer_format), "flexible": extract_flexible(text),
               "lm_eval_strict": lm_eval_extract(text, "strict"), "lm_eval_flexible": lm_eval_extract(text, "flexible")}
    correct = {name: answers_match(answers[name], gold) for name in ("strict", "flexible")}
    correct.update({name: lm_eval_correct(answers[name], gold) for name in ("lm_eval_strict", "lm_eval_flexible")})
    return {"answers": answers, "correct": correct}


def score_problem(index: int, problem, outputs: list[dict], answer_format: str, reward_funcs=None,
                  reward_weights=None) -> dict:
    """One ``samples.jsonl`` record: the problem, its completions (answers, correctness, reward parts), scores.

    ``outputs`` are ``models.generate``'s dicts ``{"text", "tokens", "truncated"}`` for this problem.
    """
    completions = [{**out, **score_completion(out["text"], problem.answer, answer_format)} for out in outputs]
    if reward_funcs:
        from .rewards import score_rows

        rows = [{"question": problem.question, "answer": problem.answer, "solution": problem.solution,
                 "completion": out["text"]} for out in outputs]
        try:
            scored = score_rows(rows, reward_funcs, reward_weights, answer_format)
        except ValueError as err:  # unknown reward name, weights of the wrong length
            raise UserError(str(err)) from None
        for completion, result in zip(completions, scored):
            completion["reward"], completion["rewards"] = result["total"], result["parts"]
    record = {"index": index, "question": problem.question, "gold": problem.answer, "where": problem.where,
              "completions": completions}
    if len(completions) > 1:
        record["majority"] = majority([c["answers"]["strict"] for c in completions])
    record["scores"] = problem_scores(record)
    return record


def problem_scores(record: dict) -> dict:
    """Per-problem values whose mean over problems is each metric (so ``compare`` can pair them)."""
    completions, k = record["completions"], len(record["completions"])

    def mean(values) -> float:
        return sum(values) / k

    scores = {ACCURACY_KEY[name]: mean(c["correct"][name] for c in completions) for name in CORRECTNESS}
    scores["format_rate"] = mean(c["answers"]["strict"] is not None for c in completions)
    scores["truncation_rate"] = mean(c["truncated"] for c in completions)
    scores["mean_completion_tokens"] = mean(c["tokens"] for c in completions)
    if k > 1:
        correct = sum(c["correct"]["strict"] for c in completions)
        for j in sorted({*(2**i for i in range(1, k.bit_length()) if 2**i < k), k}):
            scores[f"pass@{j}"] = pass_at_k(k, correct, j)
        scores[f"maj@{k}"] = float(answers_match(record["majority"], record["gold"]))
        scores[f"mean@{k}"] = correct / k
    if "rewards" in completions[0]:
        scores["reward"] = mean(c["reward"] for c in completions)
        for name in completions[0]["rewards"]:
            scores[f"reward/{name}"] = mean(c["rewards"][name] for c in completions)
    return {key: float(value) for key, value in scores.items()}


def summarize(records: list[dict]) -> tuple[dict, dict]:
    """``(metrics, ci95)``: means of the per-problem scores and a Wilson interval for every rate."""
    n = len(records)
    if n == 0:
        raise UserError("no problems were evaluated")
    metrics = {key: round(sum(r["scores"][key] for r in records) / n, 6) for key in records[0]["scores"]}
    ci = {key: wilson(value * n, n) for key, value in metrics.items() if is_rate(key)}
    return metrics, ci


def is_rate(metric: str) -> bool:
    """Whether a metric is a proportion in [0, 1] (those get confidence intervals and are shown in %)."""
    return not metric.startswith(NOT_RATES)


# ---- generation ------------------------------------------------------------------------------------------

def evaluate_model(model, tokenizer, problems, answer_format: str = "tags", system_prompt: str | None = SYSTEM_PROMPT,
                   num_few_shot: int = 0, samples: int = 1, temperature: float = 0.0, max_new_tokens: int = 256,
                   batch_size: int = 16, reward_funcs: list[str] | None = None, reward_weights: list[float] | None = None,
                   top_p: float = 1.0, progress: bool = False) -> tuple[dict, list[dict]]:
    """Generate for ``problems`` (``data.Problem``s) and score them: ``(metrics, samples)``.

    ``samples`` are the ``samples.jsonl`` records in problem order. ``reward_funcs`` (registry names) adds
    each reward part per completion. Under ``torch.distributed`` every rank must call this with the same
    problems; each generates its share, rank 0 receives all records (the others get ``[]``) and every rank
    gets the metrics.
    """
    from . import models

    if samples > 1 and temperature <= 0:
        raise UserError(f"samples={samples} needs temperature > 0: greedy decoding gives {samples} identical completions")
    rank, world, dist = _distributed()
    shots = load_problems("builtin")[:num_few_shot] if num_few_shot else []
    mine = list(range(rank, len(problems), world))
    prompts = [build_prompt(problems[i].question, answer_format, system_prompt, shots) for i in mine]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        with _ProgressBar(len(prompts), enabled=progress and rank == 0) as on_batch:
            outputs = models.generate(model, tokenizer, prompts, max_new_tokens, temperature, samples, batch_size,
                                      top_p, progress=on_batch)
    finally:
        tokenizer.padding_side = padding_side
    records = [{**score_problem(i, problems[i], out, answer_format, reward_funcs, reward_weights), "rank": rank}
               for i, out in zip(mine, outputs)]
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
        self.bar.set_postfix_str(f"{self.tokens / max(time.perf_counter() - self.start, 1e-9):.0f} tok/s", refresh=False)
        self.bar.update(problems_done)

    def __exit__(self, *exc):
        self.bar.close()


# ---- in-training evaluation ------------------------------------------------------------------------------

def __getattr__(name: str):
    # AccuracyCallback subclasses transformers' TrainerCallback, whose import takes ~10 s on a small CPU:
    # it is built on first access so that `grpo-math compare` and this module's import stay fast.
    if name == "AccuracyCallback":
        globals()[name] = cls = _accuracy_callback_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _accuracy_callback_class():
    import torch
    from transformers import TrainerCallback

    class AccuracyCallback(TrainerCallback):
        """Evaluate the policy on held-out ``problems`` every ``every_steps`` optimizer steps during training.

        ``settings`` are ``evaluate_model``'s keyword arguments (answer_format, system_prompt, num_few_shot,
        samples, temperature, max_new_tokens, batch_size, ...). Every metric is logged as ``eval/<metric>``
        in the same log line as the step's training metrics (so it reaches metrics.jsonl, TensorBoard and
        W&B). Set ``callback.trainer = trainer`` after building a TRL trainer: the values are then queued in
        the trainer's metrics, which TRL averages into its next log call; without it they are added to the
        logs in ``on_log`` (seen by callbacks registered after this one). Sampling (temperature > 0) does
        not disturb the training random streams. ``history`` keeps ``{"step", **metrics}`` per evaluation.
        """

        def __init__(self, problems, every_steps: int, **settings):
            if every_steps <= 0:
                raise UserError(f"every_steps must be > 0, got {every_steps}")
            self.problems, self.every_steps, self.settings = list(problems), every_steps, settings
            self.trainer, self.pending, self.history = None, {}, []

        def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
            if state.global_step % self.every_steps:
                return control
            was_training = model.training
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices):
                metrics, _ = evaluate_model(model, processing_class, self.problems, **self.settings)
            model.train(was_training)
            self.history.append({"step": state.global_step, **metrics})
            logged = {f"eval/{key}": value for key, value in metrics.items()}
            queue = getattr(self.trainer, "_metrics", None)  # TRL trainers: averaged into the next log call
            if queue is not None and "train" in queue:
                for key, value in logged.items():
                    queue["train"][key].append(value)
            else:
                self.pending.update(logged)
            control.should_log = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.pending and logs is not None:
                logs.update(self.pending)
                if state.log_history:
                    state.log_history[-1].update(self.pending)
                self.pending = {}

    AccuracyCallback.__module__ = __name__
    return AccuracyCallback


# ---- grpo-math eval --------------------------------------------------------------------------------------

def _eval_parser():
    import os

    from .cli import Parser

    parser = Parser(prog="grpo-math eval", description="GSM8K accuracy of a model (strict/flexible, lm-eval, pass@k, maj@k).")
    parser.add_argument("--model", help="hub id, HF folder, checkpoint, .gguf file or 'embedded' (default: embedded; "
                        "with --before-after: the base model, default the trained run's model_name_or_path)")
    parser.add_argument("--dataset_name", default=os.environ.get("GRPO_MATH_GSM8K_DIR") or "openai/gsm8k",
                        help="openai/gsm8k, a folder with test.jsonl, or builtin (default: $GRPO_MATH_GSM8K_DIR, else openai/gsm8k)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, help="first N problems (file order, so every run sees the same ones)")
    parser.add_argument("--samples", type=int, default=1, help="completions per problem (K); K > 1 adds pass@k, maj@K, mean@K")
    parser.add_argument("--temperature", type=float, help="0 = greedy (default for K=1); K > 1 needs a value > 0")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16, help="sequences generated at once")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    parser.add_argument("--config", help="recipe whose prompt and reward settings to use (default: the settings saved "
                        "with a trained model, else the defaults)")
    parser.add_argument("--skip_bad_rows", action="store_true", help="skip rows without a parseable gold answer")
    parser.add_argument("--output", help="result folder (default: runs/eval/<model>)")
    parser.add_argument("--before-after", "--before_after", dest="before_after", metavar="TRAINED",
                        help="evaluate --model (base) and TRAINED on the same problems: OUTPUT/base, OUTPUT/final, "
                        "OUTPUT/compare.json with per-problem differences")
    return parser


def eval_command(argv: list[str]) -> int:
    """``grpo-math eval``: evaluate one model (or a base and a trained one), write and print the results."""
    from .config import PromptSettings, read_recipe  # the config module imports TRL: slow, and compare needs none of it

    args = _eval_parser().parse_args(argv)
    _check_eval_args(args)
    rank, _, _ = _init_distributed()
    trained = args.before_after
    prompt = PromptSettings.load(args.config, trained or args.model)
    problems = load_problems(args.dataset_name, args.split, args.limit, None, args.skip_bad_rows)
    data = {"dataset_name": args.dataset_name, "split": args.split, "limit": args.limit, "num_problems": len(problems),
            "skipped_rows": getattr(load_problems, "skipped", 0), "problems_sha1": problems_sha1(problems)}
    if not trained:
        model = args.model or "embedded"
        output = Path(args.output or Path("runs") / "eval" / slug(model))
        results = run_eval(model, problems, data, prompt, args, output)
        if rank == 0:
            print(format_results(results))
            print(f"\nwrote {output / RESULTS_FILE} and {output / SAMPLES_FILE}")
        return 0
    saved = Path(trained) / CONFIG_FILE
    base = args.model or (read_recipe(str(saved)).get("model_name_or_path") if saved.is_file() else None)
    if not base:
        raise UserError(f"--before-after {trained}: give the base model with --model (no {CONFIG_FILE} "
                        f"with model_name_or_path in {trained})")
    output = Path(args.output or Path("runs") / "eval" / f"{slug(trained)}-before-after")
    for name, folder in ((base, "base"), (trained, "final")):
        results = run_eval(name, problems, data, prompt, args, output / folder)
        if rank == 0:
            print(f"\n{folder}: {name}\n{format_results(results)}")
    if rank == 0:
        comparison = compare_results(output / "base", output / "final")
        (output / COMPARE_FILE).write_text(json.dumps(comparison, indent=1) + "\n")
        print("\n" + format_comparison(comparison))
        print(f"\nwrote {output}/base, {output}/final and {output / COMPARE_FILE}")
    return 0


def _check_eval_args(args) -> None:
    if args.samples < 1 or args.max_new_tokens < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise UserError("--samples, --max_new_tokens, --batch_size and --limit must be >= 1")
    if args.temperature is None:
        if args.samples > 1:
            raise UserError(f"--samples {args.samples} needs --temperature > 0 (greedy decoding gives "
                            f"{args.samples} identical completions), e.g. --temperature 0.7")
        args.temperature = 0.0
    if args.temperature < 0 or (args.samples > 1 and args.temperature == 0):
        raise UserError("--temperature must be >= 0, and > 0 when --samples > 1")
    if not 0 < args.top_p <= 1:
        raise UserError("--top_p must be in (0, 1]")


def _init_distributed():
    """Join the process group when launched by torchrun with several processes (no-op otherwise)."""
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return _distributed()


def run_eval(model_name: str, problems, data: dict, prompt, args, output: Path) -> dict:
    """Load ``model_name``, evaluate it on ``problems`` with ``prompt`` (``config.PromptSettings``) and (rank 0)
    write ``output``; return the results."""
    import os

    import torch

    from .models import load_model

    rank, world, _ = _distributed()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else None
    model, tokenizer, path = load_model(model_name, args.dtype, device)
    torch.manual_seed(args.seed + rank)
    start = time.perf_counter()
    metrics, records = evaluate_model(
        model, tokenizer, problems, prompt.answer_format, prompt.system_prompt, prompt.num_few_shot,
        args.samples, args.temperature, args.max_new_tokens, args.batch_size, prompt.reward_funcs,
        prompt.reward_weights, args.top_p, progress=True)
    seconds = time.perf_counter() - start
    dtype = str(model.dtype).removeprefix("torch.")
    del model  # before-after loads the second model next
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if rank != 0:
        return {}
    tokens = sum(c["tokens"] for r in records for c in r["completions"])
    results = {
        "metrics": metrics,
        "ci95": summarize(records)[1],
        "model": model_name,
        "model_path": str(path),
        "data": data,
        "settings": {"eval_version": EVAL_VERSION, **prompt.as_dict(),
                     "prompt_settings_from": prompt.source, "samples": args.samples,
                     "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
                     "batch_size": args.batch_size, "seed": args.seed, "dtype": args.dtype,
                     "extraction": {"strict": f"answers.extract_strict(answer_format={prompt.answer_format!r})",
                                    "flexible": "answers.extract_flexible (last number)",
                                    "lm_eval_strict": LM_EVAL_REGEX["strict"].pattern + " (first match)",
                                    "lm_eval_flexible": LM_EVAL_REGEX["flexible"].pattern + " (last match)"}},
        "versions": versions(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "dtype": dtype,
        "world_size": world,
        "seconds": round(seconds, 2),
        "generated_tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 1),
        "problems_per_second": round(len(records) / seconds, 3),
    }
    write_results(output, results, records)
    return results


def write_results(folder: Path, results: dict, records: list[dict]) -> None:
    """``samples.jsonl`` then ``results.json`` (a folder with results.json is complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / SAMPLES_FILE, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    (folder / RESULTS_FILE).write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "grpo_math": __version__}
    for package in ("torch", "transformers", "trl"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def problems_sha1(problems) -> str:
    """Fingerprint of the evaluated questions and golds (same value = same problems in the same order)."""
    digest = hashlib.sha1()
    for p in problems:
        digest.update(f"{p.question}\0{p.answer}\n".encode())
    return digest.hexdigest()[:16]


def slug(model: str) -> str:
    """A folder name for a model.

    >>> slug("runs/grpo/checkpoint-50"), slug("Qwen/Qwen2.5-0.5B-Instruct"), slug("embedded")
    ('grpo-checkpoint-50', 'Qwen-Qwen2.5-0.5B-Instruct', 'embedded')
    """
    return re.sub(r"[^\w.-]+", "-", "-".join(Path(model.rstrip("/")).parts[-2:])).strip("-.") or "model"


def _fmt(metric: str, value) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if is_rate(metric) else f"{value:.3g}"


def format_results(results: dict) -> str:
    """The metrics table printed at the end of ``grpo-math eval``."""
    m, ci, data = results["metrics"], results["ci95"], results["data"]
    lines = [f"{'metric':<24} {'value':>8}   95% CI (n={data['num_problems']} problems)"]
    for key, value in m.items():
        interval = f"[{_fmt(key, ci[key][0])}, {_fmt(key, ci[key][1])}]" if key in ci else ""
        lines.append(f"{key:<24} {_fmt(key, value):>8}   {interval}")
    s = results["settings"]
    lines.append(f"\n{data['dataset_name']} [{data['split']}], {results['model']}, answer_format={s['answer_format']}, "
                 f"samples={s['samples']}, temperature={s['temperature']}, max_new_tokens={s['max_new_tokens']}; "
                 f"{results['seconds']:.0f} s, {results['tokens_per_second']:.0f} generated tokens/s")
    return "\n".join(lines)


# ---- grpo-math compare -----------------------------------------------------------------------------------

def load_results(folder) -> tuple[dict, list[dict]]:
    """``(results.json, samples.jsonl records)`` of an eval folder."""
    folder = Path(folder)
    try:
        results = json.loads((folder / RESULTS_FILE).read_text(encoding="utf-8"))
        with open(folder / SAMPLES_FILE, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except OSError as err:
        raise UserError(f"{folder} is not an eval folder: cannot read {err.filename} ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{folder}: invalid JSON ({err.msg})") from None
    if "metrics" not in results or any("scores" not in r or "index" not in r for r in records):
        raise UserError(f"{folder} was not written by grpo-math eval (results.json without metrics or samples without scores)")
    return results, records


def compare_results(a, b, flip_metric: str = "strict_accuracy") -> dict:
    """Every metric of two eval folders side by side with a paired exact test on the shared problems."""
    (results_a, records_a), (results_b, records_b) = load_results(a), load_results(b)
    if flip_metric not in results_a["metrics"] and flip_metric not in results_b["metrics"]:
        raise UserError(f"unknown metric '{flip_metric}'; valid: {', '.join(results_a['metrics'])}")
    by_key_b = {(r["index"], r["question"]): r for r in records_b}
    pairs = [(r, by_key_b[(r["index"], r["question"])]) for r in records_a if (r["index"], r["question"]) in by_key_b]
    rows = []
    for metric in dict.fromkeys([*results_a["metrics"], *results_b["metrics"]]):
        value_a, value_b = results_a["metrics"].get(metric), results_b["metrics"].get(metric)
        paired = [(ra["scores"][metric], rb["scores"][metric]) for ra, rb in pairs
                  if metric in ra["scores"] and metric in rb["scores"]]
        b_better = sum(y > x for x, y in paired)
        a_better = sum(x > y for x, y in paired)
        p = sign_test(b_better, a_better) if paired else None
        rows.append({"metric": metric, "a": value_a, "b": value_b,
                     "difference": None if value_a is None or value_b is None else round(value_b - value_a, 6),
                     "paired_problems": len(paired), "b_better": b_better, "a_better": a_better,
                     "p_value": p, "significant": p is not None and p < ALPHA})
    flips = [{"index": ra["index"], "question": ra["question"], "a": ra["scores"][flip_metric], "b": rb["scores"][flip_metric]}
             for ra, rb in pairs if ra["scores"].get(flip_metric) != rb["scores"].get(flip_metric)]
    settings_a, settings_b = results_a.get("settings", {}), results_b.get("settings", {})
    differing = [f"{key}: {settings_a.get(key)!r} vs {settings_b.get(key)!r}"
                 for key in ("eval_version", "answer_format", "system_prompt", "num_few_shot", "samples", "temperature",
                             "top_p", "max_new_tokens") if settings_a.get(key) != settings_b.get(key)]
    if results_a["data"].get("problems_sha1") != results_b["data"].get("problems_sha1"):
        differing.append("the problem sets differ; tests use the shared problems only")
    return {"a": str(a), "b": str(b), "model_a": results_a.get("model"), "model_b": results_b.get("model"),
            "shared_problems": len(pairs), "only_a": len(records_a) - len(pairs), "only_b": len(records_b) - len(pairs),
            "alpha": ALPHA, "test": "exact two-sided sign test on per-problem values (McNemar's exact test for 0/1)",
            "settings_differ": differing, "rows": rows, "flip_metric": flip_metric, "flips": flips}


def format_comparison(c: dict) -> str:
    """The side-by-side table, the settings that differ and the problems that flipped."""
    lines = [f"A = {c['a']} ({c['model_a']})", f"B = {c['b']} ({c['model_b']})",
             f"{c['shared_problems']} shared problems (only in A: {c['only_a']}, only in B: {c['only_b']})", "",
             f"{'metric':<24} {'A':>8} {'B':>8} {'B-A':>8} {'A>B':>5} {'B>A':>5} {'p':>9}"]
    for row in c["rows"]:
        diff = row["difference"]
        diff_text = "-" if diff is None else (f"{100 * diff:+.1f}%" if is_rate(row["metric"]) else f"{diff:+.3g}")
        p = "-" if row["p_value"] is None else f"{row['p_value']:.2g}"
        lines.append(f"{row['metric']:<24} {_fmt(row['metric'], row['a']):>8} {_fmt(row['metric'], row['b']):>8} "
                     f"{diff_text:>8} {row['a_better']:>5} {row['b_better']:>5} {p:>9}{'  *' if row['significant'] else ''}")
    lines.append(f"\n* significant at {c['alpha']} ({c['test']}; A>B / B>A count problems where one side scored higher)")
    for line in c["settings_differ"]:
        lines.append(f"warning: settings differ: {line}")
    flips, metric = c["flips"], c["flip_metric"]
    up = sum(f["b"] > f["a"] for f in flips)
    lines.append(f"\n{len(flips)} problems changed on {metric}: {up} better in B, {len(flips) - up} better in A")
    for f in flips:
        change = (f"{'right' if f['a'] else 'wrong'} -> {'right' if f['b'] else 'wrong'}"
                  if {f["a"], f["b"]} <= {0.0, 1.0} else f"{f['a']:.2f} -> {f['b']:.2f}")
        question = " ".join(f["question"].split())
        lines.append(f"  #{f['index']:<5} {change:<15} {question[:70]}{'...' if len(question) > 70 else ''}")
    return "\n".join(lines)


def compare_command(argv: list[str]) -> int:
    """``grpo-math compare A B``: two eval folders side by side, paired significance and flipped problems."""
    from .cli import Parser

    parser = Parser(prog="grpo-math compare", description=compare_command.__doc__)
    parser.add_argument("a", help="eval folder A (results.json + samples.jsonl), e.g. the base model's")
    parser.add_argument("b", help="eval folder B, e.g. the trained model's")
    parser.add_argument("--output", help="also write the comparison: .json as JSON, anything else as the text table")
    parser.add_argument("--metric", default="strict_accuracy", help="metric whose per-problem changes are listed")
    args = parser.parse_args(argv)
    comparison = compare_results(args.a, args.b, args.metric)
    text = format_comparison(comparison)
    print(text)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(comparison, indent=1) + "\n" if out.suffix == ".json" else text + "\n", encoding="utf-8")
    return 0
