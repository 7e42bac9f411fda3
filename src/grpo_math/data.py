"""GSM8K rows and the prompts built from them.

Sources (``dataset_name``): ``openai/gsm8k`` or any hub id with GSM8K's columns; a local folder holding the
official ``train.jsonl`` / ``test.jsonl`` (or ``.parquet``); a single such file; ``builtin``, 60 original
grade-school problems shipped in the package so the smoke recipe runs offline; or ``gym:<task>[:key=value,...]``,
a reasoning-gym task with numeric answers at a chosen difficulty (extra ``grpo-math[gym]``; seeds, sizes and the
held-out rules are in ``gym.py``), e.g. ``gym:chain_sum:min_terms=2,max_terms=3,min_digits=1,max_digits=2``.

Every row becomes ``question`` / ``answer`` (the gold number after ``####``) / ``solution`` (the reference
reasoning) / ``prompt`` (chat messages). The prompt holds the question and instructions only: the solution and
the answer never reach it.

>>> rows = load_gsm8k("builtin", split="train", limit=2)
>>> sorted(rows.column_names)
['answer', 'prompt', 'question', 'solution']
>>> rows[0]["answer"] in rows[0]["prompt"][-1]["content"]
False
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from . import UserError
from .answers import check_answer_format, split_solution
from .gym import is_gym, read_gym

BUILTIN = "builtin"
BUILTIN_FILE = Path(__file__).parent / "builtin" / "problems.jsonl"

SYSTEM_PROMPT = (
    "You are a careful math tutor. Solve the problem step by step, writing each calculation as 'a op b = c'."
)
INSTRUCTIONS = {
    "tags": "Think step by step inside <think> </think>, then give only the final number inside <answer> </answer>.",
    "hash": "Think step by step, then write the final number on its own last line as '#### <number>'.",
    "boxed": "Think step by step, then put the final number in \\boxed{}.",
}
_ANNOTATION = re.compile(r"<<[^<>]*>>")


@dataclass
class Problem:
    """One parsed GSM8K row; ``where`` names its file and line for error messages."""

    question: str
    solution: str
    answer: str
    where: str


def read_rows(dataset_name: str, split: str = "train") -> list[tuple[dict, str]]:
    """Raw ``(row, where)`` pairs from the builtin set, a reasoning-gym task, a local folder/file, or the hub."""
    if dataset_name == BUILTIN:
        return read_jsonl(BUILTIN_FILE)
    if is_gym(dataset_name):
        return read_gym(dataset_name, split)
    path = Path(dataset_name).expanduser()
    if path.is_dir():
        for suffix in (".jsonl", ".parquet"):
            if (path / f"{split}{suffix}").is_file():
                path = path / f"{split}{suffix}"
                break
        else:
            raise UserError(f"dataset folder {path} has no {split}.jsonl or {split}.parquet")
    if path.is_file():
        return _read_parquet(path) if path.suffix == ".parquet" else read_jsonl(path)
    if dataset_name.startswith((".", "/", "~")) or dataset_name.endswith((".jsonl", ".parquet")):
        raise UserError(f"dataset not found: {dataset_name}")
    return _read_hub(dataset_name, split)


def read_jsonl(path: Path | str) -> list[tuple[dict, str]]:
    """``(object, "file:line")`` per non-empty line; a line that is not a JSON object is a ``UserError``."""
    rows = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    with f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: expected a JSON object")
            rows.append((row, f"{path}:{number}"))
    return rows


def _read_parquet(path: Path) -> list[tuple[dict, str]]:
    from datasets import Dataset

    return [(row, f"{path}:row {i + 1}") for i, row in enumerate(Dataset.from_parquet(str(path)))]


def _read_hub(name: str, split: str) -> list[tuple[dict, str]]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, "main" if name.endswith("gsm8k") else None, split=split)
    except (OSError, ValueError, ConnectionError) as err:
        raise UserError(
            f"cannot load dataset '{name}' split '{split}' from the hub: {str(err).splitlines()[0]}"
        ) from None
    return [(row, f"{name}[{split}] row {i + 1}") for i, row in enumerate(dataset)]


def parse_row(row: dict, where: str) -> Problem:
    """Check one raw row and split its answer field into reasoning and gold number."""
    for field in ("question", "answer"):
        if not isinstance(row.get(field), str) or not row[field].strip():
            raise ValueError(f"{where}: field '{field}' is missing, empty or not text")
    try:
        solution, answer = split_solution(row["answer"])
    except ValueError as err:
        raise ValueError(f"{where}: field 'answer': {err}") from None
    return Problem(row["question"].strip(), solution, answer, where)


def load_problems(
    dataset_name: str,
    split: str = "train",
    limit: int | None = None,
    seed: int | None = None,
    skip_bad_rows: bool = False,
    skip: int = 0,
) -> list[Problem]:
    """Parsed problems in file order (or shuffled with ``seed``): ``limit`` of them after the first ``skip``.

    A row without a parseable gold answer raises a ``UserError`` naming file and line, unless
    ``skip_bad_rows``: then it is skipped and counted in ``load_problems.skipped``.
    """
    problems, skipped = [], 0
    for row, where in read_rows(dataset_name, split):
        try:
            problems.append(parse_row(row, where))
        except ValueError as err:
            if not skip_bad_rows:
                raise UserError(f"{err} (set --skip_bad_rows to skip such rows)") from None
            skipped += 1
    load_problems.skipped = skipped
    if not problems:
        bad = f" (all {skipped} skipped as bad)" if skipped else ""
        raise UserError(f"dataset '{dataset_name}' split '{split}' has no usable rows{bad}")
    if seed is not None:
        import random

        random.Random(seed).shuffle(problems)
    if skip >= len(problems):
        raise UserError(
            f"dataset '{dataset_name}' split '{split}' has {len(problems)} problems, all used by the "
            f"cold start (sft_examples={skip}); lower sft_examples"
        )
    return problems[skip : skip + limit] if limit else problems[skip:]


def format_solution(solution: str, answer: str, answer_format: str = "tags", keep_annotations: bool = True) -> str:
    """Rewrite a reference solution into the asked answer format (for SFT, few-shot and reward checks).

    >>> format_solution("48/2 = <<48/2=24>>24", "24", keep_annotations=False)
    '<think>\\n48/2 = 24\\n</think>\\n<answer>24</answer>'
    """
    check_answer_format(answer_format)
    reasoning = solution if keep_annotations else _ANNOTATION.sub("", solution)
    if answer_format == "tags":
        return f"<think>\n{reasoning}\n</think>\n<answer>{answer}</answer>"
    if answer_format == "hash":
        return f"{reasoning}\n#### {answer}"
    return f"{reasoning}\nThe answer is $\\boxed{{{answer}}}$."


def build_prompt(
    question: str, answer_format: str = "tags", system_prompt: str | None = SYSTEM_PROMPT, few_shot: list[Problem] = ()
) -> list[dict]:
    """Chat messages asking for step-by-step reasoning and the final answer in ``answer_format``.

    >>> [m["role"] for m in build_prompt("What is 2 + 3?")]
    ['system', 'user']
    """
    check_answer_format(answer_format)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for shot in few_shot:
        messages.append({"role": "user", "content": f"{shot.question}\n\n{INSTRUCTIONS[answer_format]}"})
        messages.append(
            {"role": "assistant", "content": format_solution(shot.solution, shot.answer, answer_format, False)}
        )
    messages.append({"role": "user", "content": f"{question}\n\n{INSTRUCTIONS[answer_format]}"})
    return messages


LM_EVAL_STOP = ("Question:", "</s>", "<|im_end|>")  # lm-eval-harness gsm8k's `until`


def lm_eval_prompt(question: str, shots: list[Problem]) -> str:
    """lm-eval-harness's gsm8k prompt (plain text): each worked example as ``Question: …\nAnswer: <its GSM8K
    solution, #### N>``, blank lines between, then the question; generation stops at ``LM_EVAL_STOP``.

    >>> lm_eval_prompt("What is 2 + 3?", load_problems(BUILTIN)[:1]).count("Question:")
    2
    """
    blocks = [f"Question: {s.question}\nAnswer: {s.solution}\n#### {s.answer}" for s in shots]
    return "\n\n".join([*blocks, f"Question: {question}\nAnswer:"])


def render_plain(messages: list[dict]) -> str:
    """A prompt as plain text for tokenizers without a chat template."""
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


def few_shot_examples(n: int) -> list[Problem]:
    """The first ``n`` builtin problems, the worked examples every prompt with ``num_few_shot: n`` shows (never
    GSM8K's own solutions, so none can leak into a GSM8K prompt)."""
    return load_problems(BUILTIN)[:n] if n else []


def load_gsm8k(
    dataset_name: str = BUILTIN,
    split: str = "train",
    limit: int | None = None,
    seed: int | None = None,
    answer_format: str = "tags",
    system_prompt: str | None = SYSTEM_PROMPT,
    num_few_shot: int = 0,
    skip_bad_rows: bool = False,
    skip: int = 0,
):
    """A ``datasets.Dataset`` with ``question``, ``answer``, ``solution`` and ``prompt`` columns.

    Few-shot examples come from the builtin problems, so no GSM8K solution can leak into a GSM8K prompt.
    """
    from datasets import Dataset

    problems = load_problems(dataset_name, split, limit, seed, skip_bad_rows, skip)
    shots = few_shot_examples(num_few_shot)
    return Dataset.from_list(
        [
            {
                "question": p.question,
                "answer": p.answer,
                "solution": p.solution,
                "prompt": build_prompt(p.question, answer_format, system_prompt, shots),
            }
            for p in problems
        ]
    )


def problem_source(args, problems) -> dict:
    """Which problems a command read (``results.json``'s ``data``, ``filter.json``'s ``source``): the flags of
    ``add_problem_flags``, the count, the rows skipped as bad and a fingerprint of the questions and golds."""
    return {
        "dataset_name": args.dataset_name,
        "split": args.split,
        "limit": args.limit,
        "num_problems": len(problems),
        "skipped_rows": getattr(load_problems, "skipped", 0),
        "problems_sha1": problems_sha1(problems),
    }


def problems_sha1(problems) -> str:
    """Fingerprint of the evaluated questions and golds (same value = same problems in the same order)."""
    digest = hashlib.sha1()
    for p in problems:
        digest.update(f"{p.question}\0{p.answer}\n".encode())
    return digest.hexdigest()[:16]
