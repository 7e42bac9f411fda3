"""Two CPU processes over gloo (torchrun): GRPO training and a sharded evaluation.

`accelerate launch --num_processes 2 --cpu` starts a single process on a 2-core machine; torchrun starts two.
About 2-3 minutes on 2 CPU cores.
"""

import json
import os
import subprocess
import sys

import pytest

from grpo_math.models import load_model


def torchrun(*args, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "grpo_math", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, embedded_model):
    out = tmp_path_factory.mktemp("ddp") / "run"
    torchrun(
        "train",
        "--config",
        "recipes/smoke.yaml",
        "--max_steps",
        "1",
        "--max_completion_length",
        "16",
        "--per_device_train_batch_size",
        "4",
        "--save_steps",
        "1",
        "--output_dir",
        str(out),
    )
    return out


def test_two_process_training_uses_both_and_leaves_a_loadable_checkpoint(ddp_run):
    info = json.loads((ddp_run / "run_info.json").read_text())
    assert info["world_size"] == 2 and sorted(p["rank"] for p in info["processes"]) == [0, 1]
    assert len({p["pid"] for p in info["processes"]}) == 2
    model, tokenizer, _ = load_model(str(ddp_run / "checkpoint-1"), dtype="float32")
    assert model.num_parameters() > 0 and tokenizer("2 + 3")["input_ids"]


def test_two_process_eval_covers_every_problem_once(ddp_run, tmp_path):
    out = tmp_path / "eval"
    torchrun(
        "eval",
        "--model",
        str(ddp_run),
        "--dataset_name",
        "builtin",
        "--limit",
        "5",
        "--max_new_tokens",
        "8",
        "--output",
        str(out),
    )
    results = json.loads((out / "results.json").read_text())
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert results["world_size"] == 2 and results["data"]["num_problems"] == 5
    assert sorted(r["index"] for r in records) == [0, 1, 2, 3, 4]
    assert {r["rank"] for r in records} == {0, 1}
