"""Tiny-model tier: GRPO-train the embedded SmolLM2-135M for 2 steps, killed with SIGKILL after the first
checkpoint and resumed; then check the weights changed, reload and generate, and that the console said only what
matters. Also the two-stage path: one cold start (SFT) step, then one GRPO step from its checkpoint.

Both dtype branches run on every machine: the kill/resume run as on an AVX2-only CPU (fp32), the two-stage run and
``ask`` as on a CPU with native bf16 (``$GRPO_MATH_CPU_BF16``; emulated, so slower, where the CPU lacks it).
About 5 minutes on 2 CPU cores (the first run also converts the GGUF once, ~35 s).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from grpo_math.cli import main
from grpo_math.models import generate, load_model

TINY = ["--config", "recipes/smoke.yaml", "--max_completion_length", "32", "--save_steps", "1", "--logging_steps", "1"]
FP32 = {**os.environ, "GRPO_MATH_CPU_BF16": "0"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, embedded_model):
    """2 steps with a checkpoint per step: `kill -9` once checkpoint-1 is in place, then `--resume`; each process's
    stdout + stderr is kept in console-N.txt."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    args = [sys.executable, "-m", "grpo_math", "train", *TINY, "--max_steps", "2", "--output_dir", str(out)]
    console = out.parent / "console-1.txt"
    with open(console, "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True, env=FP32)
        deadline = time.time() + 900
        while not (out / "checkpoint-1" / "grpo_math_config.yaml").is_file():
            assert proc.poll() is None, f"training exited early: {console.read_text()[-2000:]}"
            assert time.time() < deadline, "no checkpoint-1 after 15 minutes"
            time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "model.safetensors").exists() and steps(out) == [1]
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=FP32, timeout=900)
    (out.parent / "console-2.txt").write_text(resumed.stdout + resumed.stderr)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return out


def steps(run_dir):
    return [
        json.loads(line)["step"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]


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
    assert "grpo" in (run / "README.md").read_text().lower()  # TRL's model card, kept with the final model
    assert not (run / ".staging").exists()


def test_ran_in_fp32_where_forced(run):
    config = yaml.safe_load((run / "grpo_math_config.yaml").read_text())
    info = json.loads((run / "run_info.json").read_text())
    assert config["bf16"] is False and config["use_cpu"] is True and info["mixed_precision"] == "no"


def test_trained_under_jemalloc_where_the_system_has_it(run):
    """``grpo-math train`` re-executed itself under jemalloc (``allocator``) where there is one, kept glibc if not."""
    from grpo_math.allocator import find_jemalloc

    malloc = json.loads((run / "run_info.json").read_text())["processes"][0]["malloc"]
    jemalloc = find_jemalloc() and os.environ.get("GRPO_MATH_MALLOC") != "system"
    assert malloc.startswith(find_jemalloc()) if jemalloc else malloc == "glibc", malloc


def test_console_is_a_bar_and_one_line_per_step(run):
    """The resumed run (1 step): a header, one short line for step 2, the time, the checkpoint; no log dicts,
    completion tables, upstream warnings or library progress bars."""
    text = (run.parent / "console-2.txt").read_text()
    lines = [
        line
        for line in text.replace("\r", "\n").split("\n")
        if line.strip() and "step/s]" not in line and "s/step]" not in line and "?step" not in line
    ]  # tqdm's redraws of the one bar
    assert len(text.split("\n")) < 20, text
    assert [line for line in lines if line.startswith("step ")] == [next(x for x in lines if x.startswith("step 2/2"))]
    assert lines[0].startswith("GRPO on 16 problems: 2 steps, 1 x cpu, fp32") and lines[-1] == f"checkpoint: {run}"
    for noise in ("{'loss'", "Prompt", "Warning", "Writing model shards", "Traceback", "Loading"):
        assert noise not in text, noise
    killed = (run.parent / "console-1.txt").read_text()
    assert "step 1/2  reward" in killed and len(killed.split("\n")) < 20, killed


def test_checkpoint_reloads_and_generates(run, capsys, cpu_bf16):
    model, tokenizer, _ = load_model(str(run), dtype="float32")
    [[out]] = generate(model, tokenizer, [[{"role": "user", "content": "What is 2 + 3?"}]], max_new_tokens=8)
    assert 0 < out["tokens"] <= 8 and out["text"].strip()  # the reloaded model writes text, within the limit
    assert main(["ask", "--model", str(run), "--max_new_tokens", "8", "What is 2 + 3?"]) == 0
    assert "answer (flexible):" in capsys.readouterr().out


def test_resume_after_kill_continues_without_gap_or_duplicate(run):
    assert steps(run) == [1, 2]
    state = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and [log["step"] for log in state["log_history"] if "loss" in log] == [1, 2]


def test_cold_start_then_grpo_from_its_checkpoint_in_bf16_with_tensorboard(tmp_path, embedded_model, cpu_bf16):
    out = tmp_path / "two-stage"
    args = [
        *TINY,
        "--num_few_shot",
        "0",
        "--sft_examples",
        "4",
        "--sft_batch_size",
        "2",
        "--max_steps",
        "1",
        "--max_completion_length",
        "16",
        "--output_dir",
        str(out),
        "--report_to",
        "tensorboard",
    ]
    assert main(["train", *args]) == 0
    sft = out / "sft"
    assert (sft / "grpo_math_config.yaml").is_file() and not (out / ".sft-staging").exists()
    assert any("loss" in json.loads(line) for line in (sft / "metrics.jsonl").read_text().splitlines())
    base, cold, final = (load_file(str(folder / "model.safetensors")) for folder in (Path(embedded_model), sft, out))
    assert sum(not torch.equal(base[k], cold[k]) for k in base) > len(base) // 2  # SFT trained (2 steps, 1 of warmup)

    def distance(a, b):
        return sum((a[k] - b[k]).abs().sum().item() for k in a)

    # GRPO started from the cold-start weights: one Adam step moves every weight by about the learning rate, so the
    # final model is several times nearer the cold start than the base (from the base it would be the reverse)
    assert distance(final, cold) < distance(final, base) / 3
    assert steps(out) == [1]
    assert json.loads((out / "run_info.json").read_text())["mixed_precision"] == "bf16"
    assert yaml.safe_load((sft / "grpo_math_config.yaml").read_text())["bf16"] is True
    assert list((out / "runs").rglob("events.out.tfevents.*")), (
        "no TensorBoard event file (TRL/transformers' integration)"
    )


@pytest.mark.slow
def test_lora_run_saves_a_merged_model(tmp_path, embedded_model):
    out = tmp_path / "lora"
    assert main(["train", *TINY, "--max_steps", "1", "--use_peft", "--lora_r", "4", "--output_dir", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    model, _, _ = load_model(str(out), dtype="float32")
    assert not any("lora" in name for name, _ in model.named_parameters())
