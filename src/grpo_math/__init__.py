"""grpo-math: teach causal LMs to reason through GSM8K with GRPO and verifiable rewards.

One module per stage: ``models`` (load/convert) -> ``data`` (GSM8K rows and prompts) ->
``answers`` (one extractor) -> ``rewards`` (verifiable rewards) -> ``train`` (TRL's GRPOTrainer)
-> ``evaluate`` / ``report``; ``cli`` wires them to ``grpo-math <command>``.
"""

__version__ = "0.1.0"


class UserError(Exception):
    """Bad input from the user: the CLI prints the message on one line and exits 2 (no traceback)."""
