"""What every benchmark shares: where the full GSM8K files are (``$GRPO_MATH_GSM8K_DIR``, else
``../shared/data/gsm8k`` beside the project; tests use the 50-row sample in ``tests/fixtures/gsm8k`` instead)."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K_DIR = Path(os.environ.get("GRPO_MATH_GSM8K_DIR") or ROOT.parent / "shared" / "data" / "gsm8k")
