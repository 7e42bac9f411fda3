"""Fault handling of the training loop, without a model: the bad-step guard and resume bookkeeping."""

import json

import pytest
import torch
from transformers import TrainerControl, TrainerState

from grpo_math import UserError
from grpo_math.callbacks import BadStepGuard
from grpo_math.config import parse_train_args
from grpo_math.train import find_resume_checkpoint


def tiny_model_with_grads(value: float) -> torch.nn.Module:
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    model.weight.grad[0, 0] = value
    return model


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradients_are_dropped_and_stop_the_run(bad):
    guard, state, control = BadStepGuard("stop"), TrainerState(global_step=6), TrainerControl()
    model = tiny_model_with_grads(bad)
    before = model.weight.detach().clone()
    guard.on_pre_optimizer_step(None, state, control, model=model)
    assert all(p.grad is None for p in model.parameters())
    torch.optim.AdamW(model.parameters(), lr=1.0).step()
    assert torch.equal(model.weight, before)  # no update applied
    assert control.should_training_stop and guard.stopped == 7 and "NaN/inf" in guard.reason
    state.global_step = 7
    control.should_save = True  # as the flow callback does at save_steps
    guard.on_step_end(None, state, control)
    assert not control.should_save


def test_finite_gradients_pass_untouched():
    guard, control = BadStepGuard("stop"), TrainerControl()
    model = tiny_model_with_grads(0.5)
    guard.on_pre_optimizer_step(None, TrainerState(global_step=1), control, model=model)
    assert model.weight.grad is not None and not control.should_training_stop and not guard.stopped


@pytest.mark.parametrize(
    "logs,expected",
    [
        ({"loss": float("nan"), "grad_norm": 1.0}, "loss is nan"),
        ({"loss": 2e8, "grad_norm": 1.0}, "loss is 2e+08"),
        ({"loss": 0.1, "grad_norm": 5e5}, "grad_norm is 5e+05"),
    ],
)
def test_exploding_logs_stop_without_saving(logs, expected):
    guard, control = BadStepGuard("stop", bad_loss=1e4, bad_grad_norm=1e4), TrainerControl(should_save=True)
    guard.on_log(None, TrainerState(global_step=12), control, logs=logs)
    assert guard.stopped == 12 and expected in guard.reason
    assert control.should_training_stop and not control.should_save


def test_skip_mode_counts_and_goes_on():
    guard, control = BadStepGuard("skip"), TrainerControl()
    model = tiny_model_with_grads(float("nan"))
    guard.on_pre_optimizer_step(None, TrainerState(global_step=2), control, model=model)
    guard.on_log(None, TrainerState(global_step=4), control, logs={"loss": float("inf")})
    assert guard.skipped == [3, 4] and not control.should_training_stop and not guard.stopped
    assert model.weight.grad is None


def test_resume_cuts_metrics_back_to_the_checkpoint(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / ".staging" / "checkpoint-3").mkdir(parents=True)  # a save that was killed halfway
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.0}) + "\n" for s in (1, 2, 3)))
    _, args, _ = parse_train_args(["--output_dir", str(tmp_path), "--resume"])
    assert find_resume_checkpoint(args).endswith("checkpoint-2")
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_without_checkpoint_is_a_user_error(tmp_path):
    _, args, _ = parse_train_args(["--output_dir", str(tmp_path), "--resume"])
    with pytest.raises(UserError, match="no checkpoint-N folder"):
        find_resume_checkpoint(args)


def test_on_bad_step_is_validated():
    with pytest.raises(UserError, match="on_bad_step must be 'stop' or 'skip'"):
        parse_train_args(["--on_bad_step", "ignore"])


class FakeTrainer:
    """Just enough of a Trainer for run_training: ``train`` raises the given error."""

    def __init__(self, error, output_dir):
        from transformers import TrainerState

        self.error, self.state = error, TrainerState(global_step=5)
        self.args = type("Args", (), {"output_dir": str(output_dir)})()
        self.callback_handler = type("Handler", (), {"callbacks": [BadStepGuard()]})()

    def train(self, resume_from_checkpoint=None):
        raise self.error


@pytest.mark.parametrize(
    "error,expected",
    [
        (
            OSError(28, "No space left on device"),
            "out of disk space in .* at step 5: free space, or lower save_total_limit",
        ),
        (
            RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
            "out of memory at step 5: lower per_device_train_batch_size",
        ),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out of memory at step 5"),
    ],
)
def test_disk_and_memory_exhaustion_become_user_errors(error, expected, tmp_path):
    from grpo_math.train import run_training

    with pytest.raises(UserError, match=expected):
        run_training(FakeTrainer(error, tmp_path), None)


def test_other_errors_are_not_disguised(tmp_path):
    from grpo_math.train import run_training

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_training(FakeTrainer(RuntimeError("shape mismatch"), tmp_path), None)


def test_cold_start_rows_are_the_grpo_prompt_and_the_formatted_reference():
    from grpo_math.data import build_prompt, load_problems
    from grpo_math.models import load_tokenizer, resolve_model
    from grpo_math.train import sft_data

    script, _, _ = parse_train_args(["--sft_examples", "3"])
    tokenizer = load_tokenizer(resolve_model("embedded"))
    rows = sft_data(script, tokenizer)
    first = load_problems("builtin")[0]
    assert len(rows) == 3 and rows[0]["prompt"] == build_prompt(first.question)
    [message] = rows[0]["completion"]
    assert message["role"] == "assistant" and message["content"].endswith(f"<answer>{first.answer}</answer>")
    assert "<think>" in message["content"] and "<<" not in "".join(r["completion"][0]["content"] for r in rows)


def test_cold_start_keeps_annotations_when_asked(tmp_path):
    from grpo_math.train import sft_data

    (tmp_path / "train.jsonl").write_text(
        json.dumps({"question": "Q?", "answer": "2*3 = <<2*3=6>>6 apples\n#### 6"}) + "\n"
    )
    script, _, _ = parse_train_args(
        ["--dataset_name", str(tmp_path), "--sft_examples", "1", "--sft_keep_annotations", "true"]
    )
    tokenizer = type("PlainTokenizer", (), {"chat_template": None})()
    [row] = sft_data(script, tokenizer)
    assert isinstance(row["prompt"], str) and "<<2*3=6>>" in row["completion"]


def test_grpo_uses_the_problems_after_the_cold_start_ones():
    from grpo_math.data import load_gsm8k

    sft = list(load_gsm8k("builtin", limit=5, seed=1)["question"])
    grpo = list(load_gsm8k("builtin", limit=5, seed=1, skip=5)["question"])
    assert len(grpo) == 5 and not set(sft) & set(grpo)
    assert list(load_gsm8k("builtin", limit=10, seed=1)["question"]) == sft + grpo
    with pytest.raises(UserError, match="all used by the cold start"):
        load_gsm8k("builtin", skip=10_000)


@pytest.mark.parametrize(
    "flag,value",
    [("--sft_examples", "-1"), ("--sft_epochs", "0"), ("--sft_learning_rate", "0"), ("--sft_batch_size", "0")],
)
def test_cold_start_settings_are_validated(flag, value):
    with pytest.raises(UserError, match="sft_examples must be >= 0"):
        parse_train_args([flag, value])


def test_sft_command_needs_examples(capsys):
    from grpo_math.cli import main

    assert main(["sft", "--config", "recipes/smoke.yaml"]) == 2
    assert "set --sft_examples N" in capsys.readouterr().err


def test_signal_watch_warns_once_after_a_streak_without_variance(caplog):
    from grpo_math.callbacks import SignalWatch

    watch, state = SignalWatch(patience=3), TrainerState(global_step=0)
    for step, frac in enumerate([1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0], start=1):
        state.global_step = step
        watch.on_log(None, state, TrainerControl(), logs={"frac_reward_zero_std": frac})
    warnings = [r.getMessage() for r in caplog.records if "no reward variance" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("step 6:") and "--sft_examples" in warnings[0]


def test_cold_start_mixes_a_gym_task_with_gsm8k_solutions(gsm8k_dir):
    # recipes/learning.yaml's start: the task's worked steps and GSM8K solutions, one prompt format
    from grpo_math.models import load_tokenizer, resolve_model
    from grpo_math.train import sft_data

    task = "gym:chain_sum:min_terms=2,max_terms=3,min_digits=1,max_digits=2,size=100,test_size=10"
    flags = ["--dataset_name", task, "--sft_examples", "4", "--dataset_shuffle_seed", "0"]
    script, _, _ = parse_train_args([*flags, "--sft_extra_dataset", str(gsm8k_dir), "--sft_extra_examples", "3"])
    rows = list(sft_data(script, load_tokenizer(resolve_model("embedded"))))
    texts = [row["completion"][0]["content"] for row in rows]
    assert len(rows) == 7 and all(t.startswith("<think>\n") and "</think>\n<answer>" in t for t in texts)
    assert all(" = " in t.split("</think>")[0] for t in texts[:4])  # worked steps, not an empty think
    assert all("State the final answer" in row["prompt"][-1]["content"] for row in rows[:4])
    assert not any("State the final answer" in row["prompt"][-1]["content"] for row in rows[4:])


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--dataset_name", "gym:leg_counting:size=20", "--sft_examples", "2"], "have no worked solution"),
        (["--sft_examples", "2", "--sft_extra_examples", "2"], "set both or neither"),
        (["--sft_examples", "2", "--sft_extra_dataset", "builtin"], "set both or neither"),
    ],
)
def test_cold_start_without_worked_solutions_is_a_one_line_error(flags, message):
    from grpo_math.train import sft_data

    with pytest.raises(UserError, match=message) as err:
        script, _, _ = parse_train_args(flags)
        sft_data(script, type("PlainTokenizer", (), {"chat_template": None})())
    assert "\n" not in str(err.value)
