"""Every recipe loads; bad input gives a one-line error, exit code 2, no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo_math.cli import COMMANDS, main
from grpo_math.config import GRPOMathConfig, cpu_and_bf16, parse_train_args

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_on_every_cpu(recipe, cpu_kind):
    script, grpo, model = parse_train_args(["--config", str(recipe)])
    assert model.model_name_or_path and grpo.output_dir
    assert len(grpo.reward_weights) == len(script.reward_funcs)
    assert (grpo.per_device_train_batch_size * grpo.gradient_accumulation_steps) % grpo.num_generations == 0
    assert grpo.use_cpu and grpo.bf16 == (cpu_kind == "cpu-bf16")  # without a GPU: always use_cpu, bf16 where native


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch believes a bf16-capable CUDA GPU is present (enough to build configs, not to run on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_on_a_gpu(recipe, fake_gpu, cpu_fp32):
    _, grpo, _ = parse_train_args(["--config", str(recipe)])
    assert not grpo.use_cpu and grpo.bf16  # bf16 from the GPU, not from the CPU's flags


@pytest.mark.parametrize(
    "use_cpu,bf16,expected", [(False, None, (True, False)), (False, True, (True, True)), (True, False, (True, False))]
)
def test_cpu_and_bf16_is_consistent_without_a_gpu(use_cpu, bf16, expected, cpu_fp32):
    assert cpu_and_bf16(use_cpu, bf16) == expected


def test_explicit_bf16_off_wins_over_native_bf16(cpu_bf16):
    _, grpo, _ = parse_train_args(["--config", "recipes/smoke.yaml", "--bf16", "false"])
    assert grpo.use_cpu and grpo.bf16 is False


def test_bad_cpu_bf16_override_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("GRPO_MATH_CPU_BF16", "yes")
    code, err = run_cli(["train", "--config", "recipes/smoke.yaml"], capsys)
    assert code == 2 and "$GRPO_MATH_CPU_BF16 must be 1 or 0, not 'yes'" in err


def test_flags_override_recipe():
    script, grpo, _ = parse_train_args(
        ["--config", "recipes/smoke.yaml", "--max_steps", "7", "--reward_funcs", "correct", "format"]
    )
    assert grpo.max_steps == 7 and script.reward_funcs == ["correct", "format"]


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "args,expected",
    [
        (["train", "--model_name_or_path", "./no/such/model"], "model path not found: ./no/such/model"),
        (["train", "--dataset_name", "./missing/data.jsonl", "--model_name_or_path", "./missing"], "not found"),
        (["train", "--reward_funcs", "correct", "bogus"], "unknown reward 'bogus'; valid: correct"),
        (["train", "--no_such_flag", "1"], "no_such_flag"),
        (["train", "--config", "no/such/recipe.yaml"], "recipe not found"),
        (["train", "--per_device_train_batch_size", "0"], "per_device_train_batch_size must be a positive integer"),
        (["train", "--answer_format", "xml"], "unknown answer_format 'xml'; valid: tags"),
        (["frobnicate"], "unknown command 'frobnicate'"),
        (["prepare-model", "--model", "./nope.gguf"], "model path not found"),
        (["score"], "--input"),
    ],
)
def test_bad_input_one_line_error(args, expected, capsys):
    code, err = run_cli(args, capsys)
    assert code == 2
    assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_malformed_and_mistyped_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: [1, 2\n")
    code, err = run_cli(["train", "--config", str(bad)], capsys)
    assert code == 2 and "bad.yaml" in err and len(err.splitlines()) == 1
    typed = tmp_path / "typed.yaml"
    typed.write_text("max_steps: many\n")
    code, err = run_cli(["train", "--config", str(typed)], capsys)
    assert code == 2 and "max_steps" in err and len(err.splitlines()) == 1
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("max_stepz: 3\n")
    code, err = run_cli(["train", "--config", str(unknown)], capsys)
    assert code == 2 and "max_stepz" in err


def test_score_command_uses_recipe_rewards(tmp_path, capsys, cpu_kind, monkeypatch):
    def no_trainer_config(self):
        raise AssertionError("score built the trainer's config")

    monkeypatch.setattr(GRPOMathConfig, "__post_init__", no_trainer_config)
    lines = [
        {
            "question": "Tom has 3 apples and buys 4 more. How many?",
            "answer": "7",
            "completion": "<think>\n3 + 4 = 7\n</think>\n<answer>7</answer>",
        },
        {
            "question": "Tom has 3 apples and buys 4 more. How many?",
            "answer": "3 + 4 = <<3+4=7>>7\n#### 7",
            "completion": "<answer>8</answer>",
        },
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    assert main(["score", "--input", str(path), "--config", "recipes/smoke.yaml"]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert out[0]["parts"]["correct"] == 1.0 and out[1]["parts"]["correct"] == 0.0
    assert out[0]["total"] > out[1]["total"]
    path.write_text('{"question": "q", "answer": "1"}\n')
    code, err = run_cli(["score", "--input", str(path)], capsys)
    assert code == 2 and "in.jsonl:1: field 'completion'" in err


def test_python_dash_m_is_the_cli():
    out = subprocess.run([sys.executable, "-m", "grpo_math", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "prepare-model" in out.stdout


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).resolve().parents[1] / "configs" / "accelerate").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_every_accelerate_config_parses(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.mixed_precision == "bf16"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_an_entry_point(name):
    import importlib

    module, function, _ = COMMANDS[name]
    assert callable(getattr(importlib.import_module(module), function))


def test_results_name_the_source_commit(tmp_path):
    """run_info.json and results.json carry the git commit of the code that made them (``+dirty`` with local
    changes), and None where the package is not a tracked file of a checkout."""
    from grpo_math import runfiles

    package = Path(runfiles.__file__).resolve().parent
    described = subprocess.run(
        ["git", "describe", "--always", "--dirty=+dirty", "--abbrev=12"], cwd=package, capture_output=True, text=True
    )
    if described.returncode:
        pytest.skip("not running from a git checkout")
    assert runfiles.versions()["grpo_math_git"] == described.stdout.strip()
    assert runfiles.source_commit(tmp_path) is None
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)  # a repository that does not track the package
    assert runfiles.source_commit(tmp_path) is None
