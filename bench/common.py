"""What every benchmark shares: where the full GSM8K files are (``$GRPO_MATH_GSM8K_DIR``, else
``../shared/data/gsm8k`` beside the project; tests use the 50-row sample in ``tests/fixtures/gsm8k`` instead)."""

import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K_DIR = Path(os.environ.get("GRPO_MATH_GSM8K_DIR") or ROOT.parent / "shared" / "data" / "gsm8k")


def cpu() -> tuple[str, list[str]]:
    """The CPU's model name and which of the flags that decide the bf16 path it has (every figure names them)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return model or platform.processor(), [f for f in wanted if f in flags]


LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "GRPO_MATH_CPU_BF16")


def limits() -> str:
    """The environment variables set that hold torch, oneDNN, MKL or grpo-math below what the CPU has (a run of the
    AVX2-only path on a newer CPU names them), or "none"."""
    return " ".join(f"{k}={os.environ[k]}" for k in LIMITS if k in os.environ) or "none"


def malloc() -> str:
    """The malloc a benchmark's processes run under (``grpo_math.allocator.malloc_name``). The benchmarks don't
    re-execute under jemalloc as ``grpo-math train`` does: ``LD_PRELOAD=…libjemalloc.so.2`` runs every path under
    it."""
    from grpo_math.allocator import malloc_name

    return malloc_name()
