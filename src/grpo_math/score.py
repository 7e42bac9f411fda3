"""``grpo-math score``: audit completions from outside training with a recipe's rewards, one JSON line each.

Input lines are ``{"question", "answer", "completion"}`` (``answer`` a number or a GSM8K solution); output lines
are ``{"total", "parts": {reward: value}}``, the weighted total TRL would use as the reward.
"""

from __future__ import annotations

import json

from . import ArgumentParser, UserError
from .data import read_jsonl
from .prompts import PromptSettings
from .rewards import score_rows


def score_command(argv: list[str]) -> int:
    """Score ``{"question", "answer", "completion"}`` JSONL lines; one ``{"total", "parts"}`` JSON line each."""
    parser = ArgumentParser(prog="grpo-math score", description=score_command.__doc__)
    parser.add_argument("--input", required=True, help="JSONL file ('-' for stdin)")
    parser.add_argument("--config", help="recipe whose reward_funcs/reward_weights/answer_format to use")
    args = parser.parse_args(argv)
    settings = PromptSettings.load(args.config, None)
    rows = []
    for row, where in read_jsonl("/dev/stdin" if args.input == "-" else args.input):
        missing = [k for k in ("question", "answer", "completion") if not isinstance(row.get(k), str)]
        if missing:
            raise UserError(f"{where}: field '{missing[0]}' is missing or not a string")
        rows.append(row)
    for result in score_rows(rows, settings.reward_funcs, settings.reward_weights, settings.answer_format):
        print(json.dumps(result))
    return 0
