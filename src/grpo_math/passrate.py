"""Pass rates: K completions per training problem, sampled and scored as ``eval`` does, saved as they come (so an
interrupted run resumes); ``grpo-math filter`` keeps the problems a model solves sometimes but not always.

Filtering by pass rate is open-r1's pass-rate filtering and DAPO's dynamic sampling done once, offline: a problem
whose K completions are all right or all wrong gives every completion of a GRPO group the same reward, so zero
advantage and no update. ``sample_problems`` is shared with ``grpo-math rft`` (which keeps the correct completions):
each problem goes through ``evaluate.evaluate_model`` (the prompt of training, ``answers``' extractor, the same
strict check as the ``correct`` reward) and becomes one JSON line, appended a chunk of problems at a time; a rerun
reads those lines back (matched by index and question hash) and samples only the rest.

The output folder is a GSM8K dataset (``dataset_name: DIR`` reads it): ``train.jsonl`` with the kept problems in the
official format (``question``, ``answer`` = solution ending in ``#### N``), ``passrates.jsonl`` (one line per
problem: index, question hash, where it came from, passes, samples, pass rate) and ``filter.json`` (model, source,
settings, counts, seconds, versions)::

    grpo-math filter --model runs/cpu/sft --dataset_name ../shared/data/gsm8k --limit 512 --samples 8 \\
        --temperature 0.8 --max_new_tokens 192 --output runs/filtered

>>> keep(0.25, 0.0, 1.0), keep(1.0, 0.0, 1.0), histogram([0, 0, 1, 4], samples=4)
(True, False, '0/4: 2  1/4: 1  2/4: 0  3/4: 0  4/4: 1')
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from . import ArgumentParser, UserError
from .data import load_problems, problem_source
from .evaluate import Sampling, add_problem_flags, evaluate_model, load_for_eval, slug
from .models import resolve_model, torchrun_env
from .prompts import PromptSettings
from .runfiles import CONFIG_FILE, FILTER_FILE, PASSRATES_FILE, read_config, versions, write_json

CHUNK = 32  # problems sampled between two appends to the progress file (what an interruption can lose)
RESUME_KEYS = ("model", "answer_format", "system_prompt", "num_few_shot", "samples", "temperature", "top_p")
RESUME_KEYS += ("max_new_tokens", "seed")  # settings a resumed run must share with the lines it reuses


# ---- sample K per problem, resumable (shared with grpo-math rft) ------------------------------------------


def question_sha1(question: str) -> str:
    """A short fingerprint of a question (progress lines are matched to problems by index and this)."""
    return hashlib.sha1(question.encode()).hexdigest()[:16]


def pass_line(record: dict) -> dict:
    """The pass counts of one ``evaluate_model`` record (strict correctness, as the ``correct`` reward pays)."""
    passed, samples = sum(c["correct"]["strict"] for c in record["completions"]), len(record["completions"])
    return {"passed": passed, "samples": samples, "pass_rate": round(passed / samples, 6)}


def sample_problems(
    model_name: str, dtype: str, problems, prompt, sampling: Sampling, progress_file: Path, line_of=pass_line, seed=0
) -> list[dict]:
    """One line per problem, in order: read back from ``progress_file`` where a previous run wrote it, else
    generated and scored by ``evaluate_model`` and turned into a line by ``line_of(record)``, appended every
    ``CHUNK`` problems. The model is loaded only when something is left to sample; each chunk's sampling seed is
    ``seed`` + its first problem's index, so a resumed run samples what an uninterrupted one would."""
    import torch
    from tqdm.auto import tqdm

    if torchrun_env()[2] > 1:
        raise UserError("sampling runs in one process: launch without torchrun / accelerate")
    progress_file = Path(progress_file)
    done = read_progress(progress_file, problems)
    todo = [i for i in range(len(problems)) if i not in done]
    if todo:
        model, tokenizer, _ = load_for_eval(model_name, dtype)
        progress_file.parent.mkdir(parents=True, exist_ok=True)
        with tqdm(total=len(problems), initial=len(done), unit="problem", desc="sample", dynamic_ncols=True) as bar:
            for start in range(0, len(todo), CHUNK):
                part = todo[start : start + CHUNK]
                torch.manual_seed(seed + part[0])
                _, records = evaluate_model(model, tokenizer, [problems[i] for i in part], prompt, sampling)
                lines = [
                    {"index": i, "question_sha1": question_sha1(problems[i].question), "where": problems[i].where}
                    | line_of(record)
                    for i, record in zip(part, records)
                ]
                with open(progress_file, "a", encoding="utf-8") as f:
                    f.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
                    f.flush()
                    os.fsync(f.fileno())
                done.update((line["index"], line) for line in lines)
                bar.update(len(part))
    return [done[i] for i in range(len(problems))]


def read_progress(path: Path, problems) -> dict[int, dict]:
    """``{index: line}`` of the lines a previous run wrote for these problems. A last line cut short by an
    interruption is dropped from the file (its chunk is sampled again); a line for a different question at that
    index is an error (other data, split, order or cold-start skip: use another output folder)."""
    if not path.is_file():
        return {}
    raw = path.read_text(encoding="utf-8").splitlines(keepends=True)
    done, good = {}, []
    for number, text in enumerate(raw, 1):
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            if number == len(raw):
                break
            raise UserError(f"{path}:{number}: not valid JSON; delete the file to sample again") from None
        index = line.get("index") if isinstance(line, dict) else None
        if not isinstance(index, int) or "question_sha1" not in line:
            raise UserError(f"{path}:{number}: not a progress line (no index / question_sha1)")
        if index < len(problems) and line["question_sha1"] != question_sha1(problems[index].question):
            raise UserError(
                f"{path}:{number}: problem {index} is another question than this run's problem {index} (other data, "
                "split, order or skipped problems); use another output folder or delete the file"
            )
        if index < len(problems):
            done[index] = line
        good.append(text if text.endswith("\n") else text + "\n")
    if "".join(good) != "".join(raw):
        path.write_text("".join(good), encoding="utf-8")
    return done


def check_settings(path: Path, settings: dict) -> None:
    """Fail when ``path`` (``filter.json`` / ``rft.json`` of an earlier run in the same folder) was written with
    other sampling settings than ``settings``: its progress lines would not be samples of this run."""
    if not Path(path).is_file():
        return
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8")).get("settings", {})
    except (json.JSONDecodeError, AttributeError):
        raise UserError(f"{path}: not valid JSON; delete it (and the progress file beside it) to start over") from None
    differ = [key for key in RESUME_KEYS if key in saved and saved[key] != settings.get(key)]
    if differ:
        was = ", ".join(f"{key}={saved[key]!r} (now {settings.get(key)!r})" for key in differ)
        raise UserError(f"{path} was sampled with {was}: use another output folder, or the same settings to resume")


def sampling_settings(model: str, prompt, sampling: Sampling, seed: int) -> dict:
    """What decides the samples (``RESUME_KEYS``), as written into ``filter.json`` / ``rft.json``."""
    return {
        "model": model,
        **{key: getattr(prompt, key) for key in ("answer_format", "system_prompt", "num_few_shot")},
        **{key: getattr(sampling, key) for key in ("samples", "temperature", "top_p", "max_new_tokens")},
        "seed": seed,
        "batch_size": sampling.batch_size,
        "chunk": CHUNK,
    }


def histogram(passed: list[int], samples: int) -> str:
    """Problems per pass count, ``passes/K: problems`` for 0..K."""
    return "  ".join(f"{j}/{samples}: {sum(p == j for p in passed)}" for j in range(samples + 1))


def keep(pass_rate: float, min_pass_rate: float, max_pass_rate: float) -> bool:
    """The filter: strictly between the bounds (the defaults 0 and 1 keep the mixed groups)."""
    return min_pass_rate < pass_rate < max_pass_rate


# ---- grpo-math filter ------------------------------------------------------------------------------------


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="grpo-math filter",
        description="Keep the training problems a model solves in some but not all of K samples; write them as a "
        "GSM8K folder (train.jsonl) with passrates.jsonl and filter.json. Resumes where an interrupted run stopped.",
    )
    parser.add_argument("--model", required=True, help="hub id, HF folder, checkpoint, .gguf file or 'embedded'")
    add_problem_flags(parser, "train")
    parser.add_argument(
        "--config",
        help="recipe whose prompt keys, num_generations, temperature, top_p and max_completion_length to use "
        "(default: those saved with the model, else the defaults)",
    )
    parser.add_argument("--samples", type=int, help="completions per problem, K (default: num_generations, else 8)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default: the recipe's, else 1.0)")
    parser.add_argument("--top_p", type=float, help="(default: the recipe's, else 1.0)")
    parser.add_argument("--max_new_tokens", type=int, help="(default: max_completion_length, else 256)")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences generated at once")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    parser.add_argument("--min_pass_rate", type=float, default=0.0, help="keep problems with pass rate > this")
    parser.add_argument("--max_pass_rate", type=float, default=1.0, help="keep problems with pass rate < this")
    parser.add_argument("--skip_bad_rows", action="store_true", help="skip rows without a parseable gold answer")
    parser.add_argument("--output", help="dataset folder to write (default: runs/filter/<model>)")
    return parser


def filter_command(argv: list[str]) -> int:
    """``grpo-math filter``: sample, keep the problems with mixed pass rates, write the dataset folder."""
    args = make_parser().parse_args(argv)
    if args.min_pass_rate >= args.max_pass_rate:
        raise UserError(f"--min_pass_rate {args.min_pass_rate} must be < --max_pass_rate {args.max_pass_rate}")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be >= 1")
    if args.split != "train":
        raise UserError(f"--split {args.split}: filter writes a training set; only train problems may go into it")
    sampling = sampling_from(args)
    resolve_model(args.model)  # a missing model fails before anything is written
    prompt = PromptSettings.prompt_of(PromptSettings.load(args.config, args.model))
    problems = load_problems(args.dataset_name, args.split, args.limit, None, args.skip_bad_rows)
    output = Path(args.output or Path("runs") / "filter" / slug(args.model))
    settings = {
        **sampling_settings(args.model, prompt, sampling, args.seed),
        "min_pass_rate": args.min_pass_rate,
        "max_pass_rate": args.max_pass_rate,
    }
    check_settings(output / FILTER_FILE, settings)
    output.mkdir(parents=True, exist_ok=True)
    source = problem_source(args, problems)
    write_json(output / FILTER_FILE, {"complete": False, "model": args.model, "source": source, "settings": settings})
    start = time.perf_counter()
    progress = output / PASSRATES_FILE
    lines = sample_problems(args.model, args.dtype, problems, prompt, sampling, progress, seed=args.seed)
    kept = [p for p, line in zip(problems, lines) if keep(line["pass_rate"], args.min_pass_rate, args.max_pass_rate)]
    write_dataset(output / "train.jsonl", kept)
    passed = [line["passed"] for line in lines]
    counts = {
        "problems": len(problems),
        "kept": len(kept),
        "dropped": len(problems) - len(kept),
        "never_solved": passed.count(0),
        "always_solved": passed.count(sampling.samples),
        "histogram": {str(j): passed.count(j) for j in range(sampling.samples + 1)},
    }
    report = {"complete": True, "model": args.model, "source": source, "settings": settings, "counts": counts}
    report |= {"seconds": round(time.perf_counter() - start, 2), "versions": versions()}
    write_json(output / FILTER_FILE, report)
    print(
        f"kept {len(kept)} of {len(problems)} problems ({args.min_pass_rate:g} < pass rate < "
        f"{args.max_pass_rate:g}; never solved {counts['never_solved']}, always solved {counts['always_solved']}) "
        f"-> {output / 'train.jsonl'}"
    )
    print(f"passes per problem: {histogram(passed, sampling.samples)}")
    return 0


def sampling_from(args) -> Sampling:
    """The sampling flags, defaulting to the GRPO settings of the recipe (``--config``) or of the model's saved
    config: K = ``num_generations``, ``temperature``, ``top_p``, ``max_new_tokens`` = ``max_completion_length``."""
    saved = Path(args.model).expanduser() / CONFIG_FILE
    recipe = read_config(args.config) if args.config else read_config(saved) if saved.is_file() else {}

    def pick(flag, key, default):
        return flag if flag is not None else recipe.get(key) if recipe.get(key) is not None else default

    return Sampling(
        samples=pick(args.samples, "num_generations", 8),
        temperature=pick(args.temperature, "temperature", 1.0),
        top_p=pick(args.top_p, "top_p", 1.0),
        max_new_tokens=pick(args.max_new_tokens, "max_completion_length", 256),
        batch_size=args.batch_size,
    )


def write_dataset(path: Path, problems) -> None:
    """Problems as official GSM8K rows (``question``, ``answer`` = reasoning and ``#### N``), atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"question": p.question, "answer": f"{p.solution}\n#### {p.answer}"}) + "\n")
    tmp.replace(path)
