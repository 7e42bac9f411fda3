"""Tiny-model tier: GRPO-train the embedded SmolLM2-135M for 2 steps, killed with SIGKILL after the first
checkpoint and resumed; then check the weights changed, reload and generate. Also the two-stage path: one cold
start (SFT) step, then one GRPO step from its checkpoint.

About 5 minutes on 2 CPU cores (the first run also converts the GGUF once, ~35 s).
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo_math.cli import main
from grpo_math.models import generate, load_model

TINY = ["--config", "recipes/smoke.yaml", "--max_completion_length", "32", "--save_steps", "1", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, embedded_model):
    """2 steps with a checkpoint per step: `kill -9` once checkpoint-1 is in place, then `--resume`."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    args = [*TINY, "--max_steps", "2", "--output_dir", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "grpo_math", "train", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 900
    while not (out / "checkpoint-1" / "grpo_math_config.yaml").is_file():
        assert proc.poll() is None, f"training exited early: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, "no checkpoint-1 after 15 minutes"
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists() and steps(out) == [1]
    assert main(["train", *args, "--resume"]) == 0
    return out


def steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_training_got_signal_and_changed_the_weights(run, embedded_model):
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(log.get("reward_std", 0) > 0 for log in logs), "no group had reward variance: nothing to learn from"
    assert all(f"rewards/{name}/mean" in logs[0] for name in ("correct", "format_soft", "steps"))
    before = load_file(f"{embedded_model}/model.safetensors")
    after = load_file(str(run / "model.safetensors"))
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) > len(before) // 2


def test_checkpoints_hold_model_tokenizer_optimizer_and_config(run):
    for step in (1, 2):
        folder = run / f"checkpoint-{step}"
        for name in ("model.safetensors", "tokenizer.json", "optimizer.pt", "scheduler.pt", "grpo_math_config.yaml"):
            assert (folder / name).is_file(), f"{folder.name}/{name} missing"
    assert (run / "grpo_math_config.yaml").is_file() and list((run / "completions").glob("*.parquet"))


def test_checkpoint_reloads_and_generates(run, capsys):
    model, tokenizer, _ = load_model(str(run), dtype="float32")
    [[out]] = generate(model, tokenizer, [[{"role": "user", "content": "What is 2 + 3?"}]], max_new_tokens=8)
    assert out["tokens"] > 0 and isinstance(out["text"], str)
    assert main(["ask", "--model", str(run), "--max_new_tokens", "8", "What is 2 + 3?"]) == 0
    assert "answer (flexible):" in capsys.readouterr().out


def test_resume_after_kill_continues_without_gap_or_duplicate(run):
    assert steps(run) == [1, 2]
    state = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and [log["step"] for log in state["log_history"] if "loss" in log] == [1, 2]


def test_cold_start_then_grpo_from_its_checkpoint(tmp_path, embedded_model):
    out = tmp_path / "two-stage"
    args = [*TINY, "--num_few_shot", "0", "--sft_examples", "4", "--sft_batch_size", "2", "--max_steps", "1",
            "--max_completion_length", "16", "--output_dir", str(out)]
    assert main(["train", *args]) == 0
    sft = out / "sft"
    assert (sft / "grpo_math_config.yaml").is_file() and not (out / ".sft-staging").exists()
    assert any("loss" in json.loads(line) for line in (sft / "metrics.jsonl").read_text().splitlines())
    base, cold, final = (load_file(str(folder / "model.safetensors")) for folder in (Path(embedded_model), sft, out))
    assert sum(not torch.equal(base[k], cold[k]) for k in base) > len(base) // 2  # SFT trained (2 steps, 1 of warmup)

    def distance(a, b):
        return sum((a[k] - b[k]).abs().sum().item() for k in a)

    assert distance(final, cold) < distance(final, base) / 10  # GRPO started from the cold-start weights
    assert steps(out) == [1]


@pytest.mark.slow
def test_lora_run_saves_a_merged_model(tmp_path, embedded_model):
    out = tmp_path / "lora"
    assert main(["train", *TINY, "--max_steps", "1", "--use_peft", "--lora_r", "4", "--output_dir", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    model, _, _ = load_model(str(out), dtype="float32")
    assert not any("lora" in name for name, _ in model.named_parameters())
