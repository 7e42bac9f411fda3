"""grpo-math: teach causal LMs to reason through GSM8K with GRPO and verifiable rewards; the error and
argument-parser classes every command shares.

One module per stage: ``models`` (load/convert) -> ``data`` (GSM8K rows and prompts) -> ``answers`` (one
extractor) -> ``rewards`` (verifiable rewards) -> ``config`` -> ``train`` (TRL's trainers, ``callbacks``,
``console``) -> ``evaluate`` (``metrics``) / ``compare`` / ``report``; ``runfiles`` names what they write;
``cli`` only dispatches ``grpo-math <command>`` to each module's entry point.
"""

import argparse

__version__ = "0.1.0"


class UserError(ValueError):
    """Bad input from the user: the CLI prints the message on one line and exits 2 (no traceback)."""


class OneLineErrors:
    """Mixin for argument parsers: a usage error raises ``UserError`` (one line, exit 2) instead of argparse's
    usage text and ``SystemExit``."""

    def error(self, message):
        raise UserError(message)


class ArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """The parser of every command but ``train``/``sft`` (which use TRL's parser with the same mixin).

    >>> ArgumentParser(prog="grpo-math x").parse_args(["--nope"])
    Traceback (most recent call last):
    grpo_math.UserError: unrecognized arguments: --nope
    """
