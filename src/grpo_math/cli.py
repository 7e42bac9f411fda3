"""``grpo-math <command>``: dispatch only. Each command lives in its module with its own parser and entry point;
bad input exits 2 with a one-line error.

>>> main(["prepare-model", "--model", "no/such/dir/"])
2
"""

from __future__ import annotations

import importlib
import sys

from . import UserError
from .allocator import use_jemalloc

COMMANDS = {
    "train": ("grpo_math.train", "main", "GRPO-train a model on GSM8K (TRL GRPOTrainer), after the cold start if set"),
    "sft": ("grpo_math.train", "sft_command", "cold start only: SFT on formatted GSM8K solutions (TRL SFTTrainer)"),
    "eval": ("grpo_math.evaluate", "eval_command", "GSM8K accuracy: strict/flexible, pass@k, maj@k, CIs"),
    "compare": ("grpo_math.compare", "compare_command", "two eval folders side by side with paired significance"),
    "report": ("grpo_math.report", "report_command", "PNG curves and a self-contained report.html for a run"),
    "ask": ("grpo_math.evaluate", "ask_command", "ask a model one question; print its reasoning and extracted answer"),
    "prepare-model": (
        "grpo_math.models",
        "prepare_model_command",
        "resolve/convert a model; print its local HF folder",
    ),
    "score": ("grpo_math.score", "score_command", "score completions from a JSONL file with a recipe's rewards"),
    "filter": ("grpo_math.passrate", "filter_command", "keep training problems with mixed pass rates (0 < p < 1)"),
    "rft": ("grpo_math.rft", "rft_command", "rejection-sampling fine-tuning: SFT on the model's own correct answers"),
}
UNDER_JEMALLOC = ("train", "sft")  # long training runs: glibc's heap fragments; eval stays (``allocator``)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a command; return its exit code. Called with this process's own command line (``argv`` None), a
    training command first moves to jemalloc where it can (``allocator.use_jemalloc``)."""
    argv_from_process = argv is None
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
    if argv_from_process and name in UNDER_JEMALLOC and "-h" not in rest and "--help" not in rest:
        use_jemalloc()  # re-executes this command line under jemalloc where the system has it
    module, function, _ = COMMANDS[name]
    try:
        return getattr(importlib.import_module(module), function)(rest) or 0
    except UserError as err:
        print(f"grpo-math {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"grpo-math {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
