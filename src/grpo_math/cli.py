"""``grpo-math <command>``: one entry point per stage; bad input exits 2 with a one-line error.

>>> main(["prepare-model", "--model", "no/such/dir/"])
2
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from . import UserError

COMMANDS = {
    "train": ("grpo_math.train", "main", "GRPO-train a model on GSM8K (TRL GRPOTrainer), after the cold start if set"),
    "sft": ("grpo_math.train", "sft_command", "cold start only: SFT on formatted GSM8K solutions (TRL SFTTrainer)"),
    "eval": ("grpo_math.evaluate", "eval_command", "GSM8K accuracy: strict/flexible, pass@k, maj@k, CIs"),
    "compare": ("grpo_math.evaluate", "compare_command", "two eval folders side by side with paired significance"),
    "report": ("grpo_math.report", "report_command", "PNG curves and a self-contained report.html for a run"),
    "ask": ("grpo_math.cli", "ask", "ask a model one question; print its reasoning and extracted answer"),
    "prepare-model": ("grpo_math.cli", "prepare_model", "resolve/convert a model; print its local HF folder"),
    "score": ("grpo_math.cli", "score", "score completions from a JSONL file with a recipe's rewards"),
}


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)  # main() prints it after "grpo-math <command>: error: "


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a command; return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: grpo-math <command> [options]   (grpo-math <command> --help)\n\ncommands:")
        for name, (_, _, help_text) in COMMANDS.items():
            print(f"  {name:<14} {help_text}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"grpo-math: error: unknown command '{name}'; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[name]
    try:
        return getattr(importlib.import_module(module), function)(rest) or 0
    except UserError as err:
        print(f"grpo-math {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"grpo-math {name}: interrupted", file=sys.stderr)
        return 130


def prepare_model(argv: list[str]) -> int:
    """Resolve (and for GGUF/embedded, convert once) a model; the last line printed is its local folder."""
    parser = Parser(prog="grpo-math prepare-model", description=prepare_model.__doc__)
    parser.add_argument("--model", required=True, help="hub id, HF folder, .gguf file or 'embedded'")
    args = parser.parse_args(argv)
    from .models import resolve_model

    path = resolve_model(args.model)
    if path == args.model:  # a hub id: fetch it into the HF cache
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(args.model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        except (OSError, ValueError) as err:
            raise UserError(f"cannot fetch {args.model} from the hub: {str(err).splitlines()[0]}") from None
    print(path)
    return 0


def ask(argv: list[str]) -> int:
    """Print the model's completion for one question and the answer extracted from it."""
    parser = Parser(prog="grpo-math ask", description=ask.__doc__)
    parser.add_argument("question")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--config", help="recipe whose answer_format/system_prompt/num_few_shot to use")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args(argv)
    from .answers import extract_flexible, extract_strict
    from .data import build_prompt, load_problems
    from .config import PromptSettings
    from .models import generate, load_model

    prompt = PromptSettings.load(args.config, args.model)  # the recipe's, else those saved with a trained model
    shots = load_problems("builtin")[: prompt.num_few_shot] if prompt.num_few_shot else []
    model, tokenizer, _ = load_model(args.model)
    messages = build_prompt(args.question, prompt.answer_format, prompt.system_prompt, shots)
    [[out]] = generate(model, tokenizer, [messages], args.max_new_tokens, args.temperature)
    print(out["text"])
    print(f"\nanswer (strict, {prompt.answer_format}): {extract_strict(out['text'], prompt.answer_format)}")
    print(f"answer (flexible): {extract_flexible(out['text'])}")
    return 0


def score(argv: list[str]) -> int:
    """Score ``{"question", "answer", "completion"}`` JSONL lines; one ``{"total", "parts"}`` JSON line each."""
    parser = Parser(prog="grpo-math score", description=score.__doc__)
    parser.add_argument("--input", required=True, help="JSONL file ('-' for stdin)")
    parser.add_argument("--config", help="recipe whose reward_funcs/reward_weights/answer_format to use")
    args = parser.parse_args(argv)
    from .config import PromptSettings
    from .data import read_jsonl
    from .rewards import score_rows

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


if __name__ == "__main__":
    sys.exit(main())
