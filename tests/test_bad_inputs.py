"""Every row of docs/bad-inputs.md through the real CLI: exit code 2, one stderr line that names the place, no
traceback (an uncaught exception would fail the test).

tests/test_cli.py and tests/test_data.py already cover one variant of several rows (a relative missing model path,
an unclosed YAML bracket, ``max_steps: many``, a batch size of 0, a row without ``####``...); the cases here are the
other variants. Cases that need a model use the embedded model's local folder and fail before a trainer is built:
nothing trains. Cases marked xfail are known gaps, each with the fix in its reason; strict, so fixing one shows up.
"""

import json
import shutil

import pytest

from grpo_math.cli import main
from grpo_math.config import parse_train_args
from grpo_math.data import build_prompt, render_plain
from grpo_math.models import apply_template, load_tokenizer


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    """Bad models, data and recipes that need no real model."""
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "garbage.gguf").write_bytes(b"\x00not a model\n" * 300)
    (root / "truncated.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")  # right magic, header cut short
    (root / "corrupt_config").mkdir()
    (root / "corrupt_config" / "config.json").write_text("{not json")
    rows = {
        "missing_answer": [
            {"question": "Tom has 3 apples.", "answer": "3 + 4 = 7\n#### 7"},
            {"question": "No answer?"},
        ],
        "question_number": [{"question": 17, "answer": "#### 2"}],
        "nonnumeric": [{"question": "Tom has 3 apples.", "answer": "3 + 4 = 7\n#### seven"}],
        "array_line": [["Tom has 3 apples.", "#### 7"]],
        "empty_data": [],
        "all_bad": [{"question": "q", "answer": "no final line"}],
    }
    for name, lines in rows.items():
        (root / name).mkdir()
        (root / name / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    recipes = {
        "wrong_float": "learning_rate: fast\n",
        "wrong_bool": "bf16: maybe\n",
        "float_int": "num_generations: 2.5\n",
        "str_list": "reward_funcs: correct\n",
        "tab": "max_steps: 3\n\tbeta: 0.1\n",
        "list_top": "- a\n- b\n",
        "unknown_reward": "reward_funcs: [correct, corect]\n",
    }
    for name, text in recipes.items():
        (root / f"{name}.yaml").write_text(text)
    return root


@pytest.fixture(scope="module")
def model_files(tmp, embedded_model):
    """A folder without weights and one with a truncated safetensors file, next to the embedded model's files."""
    from pathlib import Path

    source = Path(embedded_model)
    for name, weights in [("no_weights", None), ("bad_weights", (source / "model.safetensors").read_bytes()[:1000])]:
        folder = tmp / name
        folder.mkdir(exist_ok=True)
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(source / f, folder / f)
        if weights:
            (folder / "model.safetensors").write_bytes(weights)
    return tmp


@pytest.fixture(autouse=True)
def no_progress_bars():
    """Loading bars (transformers, datasets) also go to stderr; the user sees them above the error line."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    yield
    hf_logging.enable_progress_bar()
    datasets.enable_progress_bars()


# (row of docs/bad-inputs.md, argv, pieces the one error line must hold, needs the embedded model, xfail reason)
CASES = [
    # -- model --
    (
        "missing model path (eval)",
        [
            "eval",
            "--model",
            "{tmp}/no/such/model",
            "--dataset_name",
            "builtin",
            "--limit",
            "1",
            "--output",
            "{tmp}/eval",
        ],
        ["model path not found: {tmp}/no/such/model"],
        False,
        None,
    ),
    (
        "folder without config.json",
        ["train", "--model_name_or_path", "{tmp}/empty"],
        ["model folder {tmp}/empty has no config.json"],
        False,
        None,
    ),
    (
        "corrupt config.json",
        ["train", "--model_name_or_path", "{tmp}/corrupt_config"],
        ["cannot load tokenizer from {tmp}/corrupt_config", "config.json"],
        False,
        None,
    ),
    (
        "folder without weights",
        ["train", "--model_name_or_path", "{tmp}/no_weights"],
        ["cannot load model {tmp}/no_weights", "model.safetensors"],
        True,
        None,
    ),
    (
        "truncated safetensors (ask, eval)",
        ["ask", "--model", "{tmp}/bad_weights", "hi"],
        ["cannot load model {tmp}/bad_weights", "header"],
        True,
        None,
    ),
    (
        "truncated safetensors (train)",
        ["train", "--model_name_or_path", "{tmp}/bad_weights"],
        ["cannot load model {tmp}/bad_weights"],
        True,
        None,
    ),
    ("no model at all", ["train"], ["no model given: set --model_name_or_path"], False, None),
    (
        "garbage .gguf",
        ["prepare-model", "--model", "{tmp}/garbage.gguf"],
        ["cannot read GGUF file {tmp}/garbage.gguf", "GGUF magic"],
        False,
        None,
    ),
    (
        "truncated .gguf",
        ["prepare-model", "--model", "{tmp}/truncated.gguf"],
        ["cannot read GGUF file {tmp}/truncated.gguf", "ends early"],
        False,
        None,
    ),
    # -- GSM8K rows --
    (
        "row without an answer field",
        ["train", "--model_name_or_path", "{model}", "--dataset_name", "{tmp}/missing_answer"],
        ["{tmp}/missing_answer/train.jsonl:2: field 'answer'", "--skip_bad_rows"],
        True,
        None,
    ),
    (
        "question that is not text",
        ["train", "--model_name_or_path", "{model}", "--dataset_name", "{tmp}/question_number"],
        ["question_number/train.jsonl:1: field 'question' is missing, empty or not text"],
        True,
        None,
    ),
    (
        "non-numeric gold answer",
        ["train", "--model_name_or_path", "{model}", "--dataset_name", "{tmp}/nonnumeric"],
        ["nonnumeric/train.jsonl:1: field 'answer'", "not followed by a plain number: 'seven'", "--skip_bad_rows"],
        True,
        None,
    ),
    (
        "line that is not a JSON object",
        ["train", "--model_name_or_path", "{model}", "--dataset_name", "{tmp}/array_line"],
        ["array_line/train.jsonl:1: expected a JSON object"],
        True,
        None,
    ),
    ("dataset_limit 0", ["train", "--dataset_limit", "0"], ["dataset_limit must be > 0"], False, None),
    (
        "empty dataset",
        ["train", "--model_name_or_path", "{model}", "--dataset_name", "{tmp}/empty_data"],
        ["dataset '{tmp}/empty_data' split 'train' has no usable rows"],
        True,
        None,
    ),
    (
        "every row bad, skipped",
        ["train", "--model_name_or_path", "{model}", "--dataset_name", "{tmp}/all_bad", "--skip_bad_rows"],
        ["has no usable rows (all 1 skipped as bad)"],
        True,
        None,
    ),
    # -- cold start --
    ("sft without examples", ["sft"], ["set --sft_examples N"], False, None),
    ("negative sft_examples", ["train", "--sft_examples", "-4"], ["sft_examples must be >= 0"], False, None),
    (
        "cold start uses every problem",
        ["train", "--model_name_or_path", "{model}", "--dataset_name", "builtin", "--sft_examples", "500"],
        ["has 60 problems, all used by the cold start (sft_examples=500)"],
        True,
        None,
    ),
    # -- recipes (YAML) --
    (
        "YAML: text for a float",
        ["train", "--config", "{tmp}/wrong_float.yaml"],
        ["learning_rate", "'fast'"],
        False,
        None,
    ),
    ("YAML: text for a bool", ["train", "--config", "{tmp}/wrong_bool.yaml"], ["bf16", "maybe"], False, None),
    ("YAML: float for an int", ["train", "--config", "{tmp}/float_int.yaml"], ["num_generations", "2.5"], False, None),
    (
        "YAML: tab indentation",
        ["train", "--config", "{tmp}/tab.yaml"],
        ["{tmp}/tab.yaml:2: invalid YAML"],
        False,
        None,
    ),
    (
        "YAML: not a mapping",
        ["train", "--config", "{tmp}/list_top.yaml"],
        ["{tmp}/list_top.yaml", "mapping"],
        False,
        None,
    ),
    # -- batch sizes --
    (
        "negative batch size",
        ["train", "--per_device_train_batch_size", "-1"],
        ["per_device_train_batch_size must be a positive integer, not -1"],
        False,
        None,
    ),
    ("one generation per prompt", ["train", "--num_generations", "1"], ["num_generations must be >= 2"], False, None),
    (
        "zero gradient accumulation",
        ["train", "--gradient_accumulation_steps", "0"],
        ["gradient_accumulation_steps must be a positive integer, not 0"],
        False,
        None,
    ),
    (
        "zero completion length",
        ["train", "--max_completion_length", "0"],
        ["max_completion_length must be > 0"],
        False,
        None,
    ),
    ("negative max_prompt_length", ["train", "--max_prompt_length", "-5"], ["max_prompt_length"], False, None),
    (
        "num_generations does not divide the batch",
        ["train", "--per_device_train_batch_size", "6", "--num_generations", "4"],
        ["= 6 completions per step is not a multiple of num_generations (4)", "one of [2, 3, 6]"],
        False,
        None,
    ),
    (
        "prompt longer than max_prompt_length",
        ["train", "--model_name_or_path", "{model}", "--dataset_limit", "4", "--max_prompt_length", "32"],
        ["tokens > max_prompt_length=32", "raise --max_prompt_length to at least"],
        True,
        None,
    ),
    # -- rewards, flags, files --
    (
        "unknown reward (recipe)",
        ["train", "--config", "{tmp}/unknown_reward.yaml"],
        ["unknown reward 'corect'", "valid: correct"],
        False,
        None,
    ),
    (
        "unknown reward preset",
        ["train", "--reward_preset", "fancy"],
        ["reward_preset 'fancy'", "default, notebook"],
        False,
        None,
    ),
    (
        "reward_weights of another length",
        ["train", "--reward_weights", "1", "2"],
        ["reward_weights has 2 values but reward_funcs has 5"],
        False,
        None,
    ),
    ("unknown flag (eval)", ["eval", "--no_such_flag"], ["unrecognized arguments: --no_such_flag"], False, None),
    (
        "missing data file (eval)",
        ["eval", "--model", "x", "--dataset_name", "{tmp}/missing/test.jsonl"],
        ["dataset not found: {tmp}/missing/test.jsonl"],
        False,
        None,
    ),
    (
        "data folder without the split",
        ["eval", "--model", "x", "--dataset_name", "{tmp}/empty"],
        ["dataset folder {tmp}/empty has no test.jsonl or test.parquet"],
        False,
        None,
    ),
    (
        "missing input file (score)",
        ["score", "--input", "{tmp}/missing.jsonl"],
        ["cannot read {tmp}/missing.jsonl: No such file or directory"],
        False,
        None,
    ),
]


@pytest.mark.parametrize(
    ("argv", "expected", "needs_model"),
    [
        pytest.param(
            argv, expected, needs_model, id=row, marks=[pytest.mark.xfail(strict=True, reason=why)] if why else []
        )
        for row, argv, expected, needs_model, why in CASES
    ],
)
def test_bad_input_gives_one_line_error_and_exit_2(argv, expected, needs_model, tmp, request, capsys):
    model = request.getfixturevalue("embedded_model") if needs_model else "unused"
    if needs_model:
        request.getfixturevalue("model_files")
    fill = {"tmp": str(tmp), "model": model}
    argv = [a.format(**fill) for a in argv]
    if argv[0] == "train":
        argv += ["--output_dir", str(tmp / "run")]  # nothing may be written there: every case fails first
    capsys.readouterr()  # drop what the fixtures printed (the one-time GGUF conversion's progress bar)
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"grpo-math {argv[0]}: error: ") and line.count(f"grpo-math {argv[0]}:") == 1, line
    for piece in expected:
        assert piece.format(**fill) in line, line
    assert not (tmp / "run").exists()


def test_tokenizer_without_chat_template_gets_plain_text_prompts(embedded_model):
    """Not an error: a tokenizer without a chat template gets the prompt as plain text (data.render_plain),
    in training (prompt column and length check) and in generation (models.apply_template)."""
    from grpo_math.train import load_train_data

    tokenizer = load_tokenizer(embedded_model)
    tokenizer.chat_template = None
    script, grpo, _ = parse_train_args(["--dataset_limit", "3"])
    rows = load_train_data(script, tokenizer, grpo.max_prompt_length)
    for row in rows:
        messages = build_prompt(row["question"], script.answer_format, script.system_prompt)
        assert row["prompt"] == render_plain(messages) == apply_template(tokenizer, messages)
        assert row["question"] in row["prompt"] and "<|im_start|>" not in row["prompt"]


def test_a_single_reward_name_in_a_recipe_is_a_list_of_one(tmp_path):
    from grpo_math.config import parse_train_args

    recipe = tmp_path / "one.yaml"
    recipe.write_text("reward_funcs: correct\nreward_weights: [1.0]\n")
    assert parse_train_args(["--config", str(recipe)])[0].reward_funcs == ["correct"]
