"""``grpo-math rft``: only correct, ended, deduplicated completions are kept, the fine-tune trains a checkpoint that
``eval`` loads, a rerun reuses ``rft_data.jsonl``, the GRPO budget is printed, and bad input is a one-line error.

Sampling is faked (``models.generate``: per problem two identical right answers, one other right answer, one right
but cut by the token limit, one wrong); the fine-tune is real, on a one-layer model with the embedded model's
tokenizer (seconds).
"""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from grpo_math import cli, models
from grpo_math.config import parse_train_args
from grpo_math.data import build_prompt, few_shot_examples, load_problems
from grpo_math.prompts import PromptSettings
from grpo_math.rft import RFTConfig, grpo_budget, rft_line

GOLD = {p.question: p.answer for p in load_problems("builtin")}
SMOKE = ["--config", "recipes/smoke.yaml", "--sft_batch_size", "2", "--logging_steps", "1", "--max_completion_length"]


def samples(gold: str, right: bool = True) -> list[dict]:
    answer = gold if right else "-1"
    texts = [
        (f"<think>It is {answer}.</think>\n<answer>{answer}</answer>", False),
        (f"<think>It is {answer}.</think>\n<answer>{answer}</answer>\n", False),  # the same once stripped
        (f"<think>Add them: {answer}.</think>\n<answer>{answer}</answer>", False),
        (f"<think>Count: {answer}.</think>\n<answer>{answer}</answer>", True),  # right but cut by the limit
        ("<think>No idea.</think>\n<answer>-1</answer>", False),
    ]
    return [{"text": t, "tokens": 12, "truncated": cut} for t, cut in texts]


def fake_generate(right: bool = True):
    def generate(model, tokenizer, prompts, max_new_tokens=256, temperature=0.0, num_samples=1, *args, **kwargs):
        return [samples(GOLD[p[-1]["content"].rsplit("\n\n", 1)[0]], right)[:num_samples] for p in prompts]

    return generate


def test_rft_line_keeps_correct_ended_distinct_completions():
    record = {"completions": [{**s, "correct": {"strict": "-1" not in s["text"]}} for s in samples("7")]}
    line = rft_line(record)
    assert line["completions"] == [
        "<think>It is 7.</think>\n<answer>7</answer>",
        "<think>Add them: 7.</think>\n<answer>7</answer>",
    ]
    assert (line["passed"], line["samples"], line["truncated_correct"]) == (4, 5, 1)


def test_budget_is_a_grpo_stage_of_the_same_settings():
    _, args, _, rft = parse_train_args(["--config", "recipes/cpu.yaml"], extra=(RFTConfig,))
    assert grpo_budget(args) == 24 * 8 and rft.rft_samples is None  # 24 steps x 8 completions
    _, args, _ = parse_train_args(["--config", "recipes/smoke.yaml", "--gradient_accumulation_steps", "2"])
    assert grpo_budget(args) == 4 * 8 * 2
    _, args, _ = parse_train_args(["--config", "recipes/smoke.yaml", "--num_iterations", "2"])
    assert grpo_budget(args) == 4 * 8 // 2  # each generation is used twice
    _, args, _ = parse_train_args(["--config", "recipes/smoke.yaml", "--max_steps", "-1"])
    assert grpo_budget(args) is None


def test_rft_samples_the_problems_grpo_trains_on_first(tiny_model, tmp_path, cpu_fp32):
    # the order GRPO's real dataloader visits the training problems in (TRL's sampler, the recipe's seed), after
    # the cold start's problems: RFT must sample those, not the first rows of the file
    from grpo_math.models import load_tokenizer, load_weights
    from grpo_math.rft import training_problems
    from grpo_math.train import build_trainer, load_train_data

    flags = ["--config", "recipes/smoke.yaml", "--model_name_or_path", tiny_model, "--output_dir", str(tmp_path)]
    flags += ["--dataset_limit", "40", "--sft_examples", "10", "--dataset_shuffle_seed", "3", "--max_steps", "3"]
    script, args, model_args, rft = parse_train_args(flags, extra=(RFTConfig,))
    tokenizer = load_tokenizer(tiny_model)
    dataset = load_train_data(script, tokenizer, args.max_prompt_length)
    trainer = build_trainer(script, args, model_args, load_weights(tiny_model, "float32"), tokenizer, dataset)
    visited = [row["question"] for batch in trainer.get_train_dataloader() for row in batch]
    problems, budget = training_problems(script, args, rft, args.num_generations)
    assert budget == 3 * 8 and len(problems) == 6
    assert [p.question for p in problems] == list(dict.fromkeys(visited))[:6]
    assert visited[: 6 * 4] == [p.question for p in problems for _ in range(4)]  # groups of K, in this order
    assert [p.question for p in problems] != list(dataset["question"][:6])  # not simply the file order


def test_rft_trains_a_checkpoint_eval_loads_and_reruns_from_its_data(
    tiny_model, tmp_path, monkeypatch, capsys, cpu_fp32
):
    monkeypatch.setattr(models, "generate", fake_generate())
    out = tmp_path / "rft"
    argv = [
        "rft",
        *SMOKE,
        "16",
        "--model",
        tiny_model,
        "--rft_samples",
        "5",
        "--rft_problems",
        "2",
        "--num_few_shot",
        "0",
    ]
    assert cli.main([*argv, "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "RFT budget: 2 problems x 5 samples = 10 completions, the first problems GRPO's sampler visits" in printed
    assert "a GRPO stage of these settings samples 32 (4 steps of 8) on one process" in printed
    assert f"checkpoint: {out}" in printed

    lines = [json.loads(line) for line in (out / "rft_data.jsonl").read_text().splitlines()]
    assert [len(line["completions"]) for line in lines] == [2, 2]
    counts = json.loads((out / "rft.json").read_text())["counts"]
    assert (counts["sampled"], counts["correct"], counts["truncated_correct"]) == (10, 8, 2)
    assert (counts["duplicates"], counts["kept"]) == (2, 4)

    saved = yaml.safe_load((out / "grpo_math_config.yaml").read_text())
    assert saved["model_name_or_path"] == tiny_model and saved["rft_samples"] == 5
    assert not (out / ".sft-staging").exists()
    assert any("loss" in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    before, after = load_file(f"{tiny_model}/model.safetensors"), load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # 2 steps of 2 rows trained
    assert PromptSettings.load(None, str(out)).source == str(out / "grpo_math_config.yaml")  # eval's prompt

    monkeypatch.undo()  # eval generates with the trained checkpoint itself, not the fake
    evaluated = tmp_path / "eval"
    eval_argv = ["eval", "--model", str(out), "--dataset_name", "builtin", "--limit", "2", "--max_new_tokens", "4"]
    assert cli.main([*eval_argv, "--output", str(evaluated)]) == 0
    results = json.loads((evaluated / "results.json").read_text())
    assert results["model"] == str(out) and results["data"]["num_problems"] == 2
    assert len((evaluated / "samples.jsonl").read_text().splitlines()) == 2

    monkeypatch.setattr(models, "generate", lambda *a, **k: pytest.fail("sampled again"))
    assert cli.main([*argv, "--output_dir", str(out), "--sft_batch_size", "4"]) == 0  # new fine-tune, same samples
    assert json.loads((out / "rft.json").read_text())["counts"]["kept"] == 4
    assert yaml.safe_load((out / "grpo_math_config.yaml").read_text())["sft_batch_size"] == 4


def test_rft_rows_are_the_grpo_prompt_and_the_kept_completion():
    from grpo_math.rft import rft_dataset

    problems = load_problems("builtin", limit=2)
    prompt = PromptSettings(num_few_shot=1, reward_funcs=[])
    lines = [{"completions": ["A", "B"]}, {"completions": []}]
    rows = rft_dataset(problems, lines, prompt, type("ChatTokenizer", (), {"chat_template": "x"})())
    shots = few_shot_examples(1)
    assert len(rows) == 2 and rows[1]["prompt"] == build_prompt(
        problems[0].question, "tags", prompt.system_prompt, shots
    )
    assert rows[1]["completion"] == [{"role": "assistant", "content": "B"}]


def test_no_correct_completion_is_a_one_line_error(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(models, "generate", fake_generate(right=False))
    argv = ["rft", "--config", "recipes/smoke.yaml", "--model", tiny_model, "--output_dir", str(tmp_path / "r")]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert "RFT budget: 8 problems x 4 samples = 32 completions" in captured.out  # 4 steps x 8 = 32 = 8 x K
    last = captured.err.strip().splitlines()[-1]  # after the sampling bar
    assert last.startswith("grpo-math rft: error: no correct completion among 32 samples: nothing to fine-tune on")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "no/such/dir/", "--output_dir", "OUT"], "model path not found"),
        (["--rft_samples", "0", "--output_dir", "OUT"], "rft_samples must be >= 1"),
        (["--rft_problems", "0", "--output_dir", "OUT"], "rft_problems must be >= 1"),
        (["--model", "embedded"], "give --output_dir DIR"),
    ],
)
def test_bad_input_is_a_one_line_error(flags, message, tmp_path, capsys):
    flags = [str(tmp_path / "out") if f == "OUT" else f for f in flags]
    assert cli.main(["rft", "--config", "recipes/smoke.yaml", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
