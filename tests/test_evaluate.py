"""Evaluation: statistics against hand-computed values, lm-eval extraction, scoring, the eval/compare CLIs.

Everything here runs without a model (``models.load_model`` / ``models.generate`` are replaced by fakes)
except ``test_tiny_embedded_eval``, which evaluates the embedded model on 3 GSM8K problems.
"""

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from grpo_math import UserError, cli, evaluate, models
from grpo_math.answers import answers_match, extract_flexible
from grpo_math.callbacks import AccuracyCallback
from grpo_math.compare import compare_results, format_comparison
from grpo_math.data import Problem
from grpo_math.metrics import (
    lm_eval_correct,
    lm_eval_extract,
    lm_eval_normalize,
    majority,
    pass_at_k,
    score_problem,
    sign_test,
    summarize,
    wilson,
)
from grpo_math.prompts import PromptSettings
from grpo_math.runfiles import write_results

NO_REWARDS = PromptSettings(reward_funcs=[])  # the default prompt, no reward parts


def problem(i: int, answer: str = "18") -> Problem:
    return Problem(
        f"Question {i}: how many eggs does Janet sell?", f"16 - 3 - 4 = 9\n9 * 2 = {answer}", answer, f"t:{i}"
    )


def out(text: str, tokens: int = 10, truncated: bool = False) -> dict:
    return {"text": text, "tokens": tokens, "truncated": truncated}


RIGHT = "<think>16 - 3 - 4 = 9\n9 * 2 = 18</think>\n<answer>18</answer>"
WRONG = "<think>16 - 3 = 13\n13 * 2 = 26</think>\n<answer>26</answer>"


# ---- statistics --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "successes, n, expected",
    [
        (8, 10, (0.4902, 0.9433)),  # p=0.8: center 0.71675, half-width 0.22658
        (0, 10, (0.0, 0.2775)),  # no successes: the interval still has width z^2/(n+z^2)
        (50, 100, (0.4038, 0.5962)),
        (10, 10, (0.7225, 1.0)),
    ],
)
def test_wilson_matches_hand_computed_values(successes, n, expected):
    assert wilson(successes, n) == expected


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (4, 3, 2, 1.0),  # fewer than k wrong samples: some draw of k always has a right one
        (4, 0, 4, 0.0),
        (8, 3, 1, 3 / 8),  # pass@1 is the fraction correct
    ],
)
def test_pass_at_k_unbiased_estimator(n, c, k, expected):
    assert math.isclose(pass_at_k(n, c, k), expected)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(2, 1, 3)


def test_sign_test_is_exact_mcnemar():
    assert sign_test(0, 0) == 1.0
    assert math.isclose(sign_test(1, 9), 2 * (1 + 10) / 2**10)  # 2 * P(X <= 1), X ~ Bin(10, 1/2)
    assert math.isclose(sign_test(40, 0), 2 * 0.5**40)
    assert sign_test(5, 5) == 1.0


@pytest.mark.parametrize(
    "answers, expected",
    [
        (["18", "18.0", "7", None], "18"),  # numbers vote by value
        (["7", "18", "18", "7"], "7"),  # a tie goes to the earliest answer
        ([None, None], None),
        (["$1,200", "1200", "12"], "$1,200"),
    ],
)
def test_majority_vote(answers, expected):
    assert majority(answers) == expected


def test_maj_pass_mean_at_k_from_samples():
    record = score_problem(0, problem(0), [out(RIGHT), out(WRONG), out(WRONG), out("<answer>18.0</answer>")], "tags")
    s = record["scores"]
    assert s["mean@4"] == s["strict_accuracy"] == 0.5
    assert math.isclose(s["pass@2"], 1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert s["pass@4"] == 1.0
    assert s["maj@4"] == 1.0 and record["majority"] == "18"  # 18 and 18.0 tie with 26 twice: the earliest wins


# ---- lm-evaluation-harness gsm8k ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, mode, expected",
    [
        ("Natalia sold 48/2 = 24 clips.\n#### 1,234", "strict", "1,234"),
        ("#### 5\nthen #### 6", "strict", "5"),  # strict-match takes the first match
        ("The answer is 18.", "strict", None),  # no '#### ' -> [invalid]
        ("####5", "strict", None),  # the space is part of the pattern
        ("She makes 9 * 2 = 18 dollars. The answer is 18.", "flexible", "18."),  # last match
        ("x = 5", "flexible", "5"),  # single digits via the second group
        ("He loses 8 - 11 = -3", "flexible", "-3"),
        ("Total: $1,200.00", "flexible", "$1,200.00"),
        ("So 18.\n\nQuestion: Tom has 5 apples", "flexible", "18."),  # cut at lm-eval's stop sequence
        ("no digits here", "flexible", None),
    ],
)
def test_lm_eval_extraction(text, mode, expected):
    assert lm_eval_extract(text, mode) == expected


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("1,234", "1234", True),
        ("18.", "18", True),  # trailing '.' is ignored
        ("$1,200.", "1200", True),
        ("$1,200.00", "1200", False),  # lm-eval compares strings: 1200.00 != 1200
        ("18.0", "18", False),
        (None, "18", False),  # [invalid]
    ],
)
def test_lm_eval_exact_match(pred, gold, expected):
    assert lm_eval_correct(pred, gold) is expected


def test_lm_eval_reference_normalisation_of_a_raw_gsm8k_answer():
    assert lm_eval_normalize("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\n#### 1,018") == "1018"


TYPICAL_OUTPUTS = [
    ("She sells 16 - 3 - 4 = 9 eggs and makes 9 * 2 = $18.\nThe answer is 18.", "18"),
    ("It takes 2/2 = 1 bolt of white fiber, so 2 + 1 = 3 bolts in total.", "3"),
    ("<think>5 * 12 = 60</think>\n<answer>60</answer>", "60"),
    ("The total cost is $1,200.", "1200"),
    ("He loses 8 - 11 = -3 dollars.\n#### -3", "-3"),
    ("So she has 12 apples left.", "13"),
    ("Each friend gets 15 / 2 = 7.5 cookies.", "7.5"),
    ("First 3 * 4 = 12, then 12 + 5 = 17 marbles", "17"),
]


@pytest.mark.parametrize("text, gold", TYPICAL_OUTPUTS)
def test_our_flexible_agrees_with_lm_eval_flexible(text, gold):
    ours = answers_match(extract_flexible(text), gold)
    assert ours == lm_eval_correct(lm_eval_extract(text, "flexible"), gold)


def test_known_difference_ours_compares_numbers_lm_eval_strings():
    text = "She pays $18.00 in total."
    assert answers_match(extract_flexible(text), "18")
    assert not lm_eval_correct(lm_eval_extract(text, "flexible"), "18")


# ---- scoring and metrics -----------------------------------------------------------------------------------


def test_score_problem_records_answers_correctness_and_reward_parts():
    record = score_problem(3, problem(3), [out(RIGHT, tokens=20)], "tags", ["correct", "format"], [1.0, 0.5])
    [c] = record["completions"]
    assert (record["index"], record["gold"]) == (3, "18")
    assert c["answers"]["strict"] == "18" and c["correct"]["strict"] and c["correct"]["flexible"]
    assert c["rewards"] == {"correct": 1.0, "format": 1.0} and c["reward"] == 1.5
    assert record["scores"]["reward/correct"] == record["scores"]["strict_accuracy"] == 1.0


def test_summarize_metrics_and_ci():
    records = [
        score_problem(0, problem(0), [out(RIGHT, tokens=10)], "tags"),
        score_problem(1, problem(1), [out(WRONG, tokens=20)], "tags"),
        score_problem(2, problem(2), [out("Janet makes 18 dollars", tokens=30, truncated=True)], "tags"),
        score_problem(3, problem(3), [out("<answer>18</answer> or <answer>19</answer>", tokens=40)], "tags"),
    ]
    metrics, ci = summarize(records)
    assert metrics["strict_accuracy"] == 0.25  # only the first
    assert metrics["flexible_accuracy"] == 0.5  # first and third (last number 18); the fourth ends in 19
    assert metrics["format_rate"] == 0.5  # no marker / disagreeing markers are not formatted
    assert metrics["truncation_rate"] == 0.25
    assert metrics["mean_completion_tokens"] == 25
    assert metrics["lm_eval_strict"] == 0.0 and metrics["lm_eval_flexible"] == 0.5
    assert ci["strict_accuracy"] == wilson(1, 4) and "mean_completion_tokens" not in ci


# ---- evaluate_model and the in-training callback (fake generation) ----------------------------------------


class FakeTokenizer:
    padding_side = "right"


class FakeModel:
    dtype = "float32"

    def __init__(self, name="trained"):
        self.name, self.training = name, True

    def train(self, mode=True):
        self.training = mode
        return self


def question_index() -> dict[str, tuple[int, str]]:
    """question -> (index, gold) for the synthetic problems and the builtin set."""
    from grpo_math.data import load_problems

    return {
        p.question: (i, p.answer)
        for problems in ([problem(i) for i in range(100)], load_problems("builtin"))
        for i, p in enumerate(problems)
    }


def fake_generate(
    model,
    tokenizer,
    prompts,
    max_new_tokens=256,
    temperature=0.0,
    num_samples=1,
    batch_size=16,
    top_p=1.0,
    progress=None,
    **stop,
):
    """Even-numbered problems right for every model; odd ones right only for a model named 'trained'."""
    assert tokenizer.padding_side == "left"
    known, results = question_index(), []
    for messages in prompts:
        index, gold = known[messages[-1]["content"].rsplit("\n\n", 1)[0]]
        right = index % 2 == 0 or getattr(model, "name", "") == "trained"
        text = f"<think>16 - 3 - 4 = 9</think>\n<answer>{gold if right else -12345}</answer>"
        results.append([out(text) for _ in range(num_samples)])
    if progress:
        progress(len(prompts), 10 * len(prompts))
    return results


@pytest.fixture
def fake_models(monkeypatch):
    monkeypatch.setattr(models, "generate", fake_generate)
    monkeypatch.setattr(
        models,
        "load_model",
        lambda name, dtype="auto", device=None: (FakeModel(name), FakeTokenizer(), f"/fake/{name}"),
    )


def test_evaluate_model_builds_training_prompts_and_restores_padding(fake_models):
    tokenizer = FakeTokenizer()
    metrics, samples = evaluate.evaluate_model(
        FakeModel("base"), tokenizer, [problem(i) for i in range(4)], NO_REWARDS
    )
    assert metrics["strict_accuracy"] == 0.5 and [s["index"] for s in samples] == [0, 1, 2, 3]
    assert tokenizer.padding_side == "right"
    with pytest.raises(UserError, match="temperature > 0"):
        evaluate.Sampling(samples=4)


def test_accuracy_callback_logs_through_the_trainer(fake_models):
    from transformers import TrainerControl, TrainerState

    callback = AccuracyCallback([problem(i) for i in range(4)], every_steps=2, prompt=NO_REWARDS)
    model, state, control = FakeModel("base"), TrainerState(), TrainerControl()
    callback.trainer = type("Trainer", (), {"_metrics": {"train": defaultdict(list), "eval": defaultdict(list)}})()
    state.global_step = 1
    callback.on_step_end(None, state, control, model=model, processing_class=FakeTokenizer())
    assert not control.should_log and not callback.trainer._metrics["train"]
    state.global_step = 2
    callback.on_step_end(None, state, control, model=model, processing_class=FakeTokenizer())
    assert control.should_log and model.training
    assert callback.trainer._metrics["train"]["eval/strict_accuracy"] == [0.5]

    callback.trainer = None  # without a trainer: added to the logs of the next on_log
    state.global_step, state.log_history = 4, [{"loss": 1.0, "step": 4}]
    callback.on_step_end(None, state, control, model=model, processing_class=FakeTokenizer())
    logs = {"loss": 1.0}
    callback.on_log(None, state, control, logs=logs)
    assert logs["eval/format_rate"] == 1.0 and state.log_history[-1]["eval/strict_accuracy"] == 0.5


def test_lm_eval_prompt_is_lm_evals_gsm8k_prompt_with_its_stop_sequences(
    fake_models, monkeypatch, tmp_path, gsm8k_dir
):
    seen = {}

    first = json.loads((gsm8k_dir / "test.jsonl").read_text().splitlines()[0])

    def generate(model, tokenizer, prompts, *args, stop_strings=(), **kwargs):
        seen.update(prompts=prompts, stop_strings=stop_strings, kwargs=kwargs)
        return [[out(f"She works it out.\n#### {first['answer'].split('#### ')[-1]}")] for _ in prompts]

    monkeypatch.setattr(models, "generate", generate)
    folder = tmp_path / "lm"
    argv = ["eval", "--model", "base", "--dataset_name", str(gsm8k_dir), "--limit", "2", "--lm_eval_prompt"]
    assert cli.main([*argv, "--output", str(folder)]) == 0
    shots = [json.loads(line) for line in (gsm8k_dir / "train.jsonl").read_text().splitlines()[:5]]
    blocks = [f"Question: {s['question']}\nAnswer: {s['answer']}" for s in shots]  # lm-eval: doc_to_text + target
    assert seen["prompts"][0] == "\n\n".join([*blocks, f"Question: {first['question']}\nAnswer:"])
    assert seen["stop_strings"] == ("Question:", "</s>", "<|im_end|>") and "stop_format" not in seen["kwargs"]
    results = json.loads((folder / "results.json").read_text())
    assert results["settings"]["prompt_style"] == "lm-eval" and results["settings"]["answer_format"] == "hash"
    assert results["metrics"]["lm_eval_strict"] == 0.5  # the first problem's gold, not the second's


def test_generate_cuts_text_at_a_stop_string(monkeypatch, embedded_model):
    from grpo_math import rollouts

    tokenizer = models.load_tokenizer(embedded_model)
    reply = tokenizer("So 72.\n#### 72\n\nQuestion: Tom has", add_special_tokens=False).input_ids
    monkeypatch.setattr(rollouts, "generate_grouped", lambda model, ids, *a, **k: [reply + [tokenizer.eos_token_id]])
    [[done]] = models.generate(
        SimpleNamespace(eval=lambda: None, modules=lambda: []),
        tokenizer,
        ["Question: 1+1?\nAnswer:"],
        stop_strings=("Question:",),
    )
    assert done["text"] == "So 72.\n#### 72\n\n" and not done["truncated"]


# ---- grpo-math eval / compare --------------------------------------------------------------------------


def test_eval_command_writes_results_and_samples(fake_models, tmp_path, capsys):
    folder = tmp_path / "ev"
    assert (
        cli.main(["eval", "--model", "base", "--dataset_name", "builtin", "--limit", "6", "--output", str(folder)])
        == 0
    )
    results = json.loads((folder / "results.json").read_text())
    samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and results["data"]["num_problems"] == 6
    assert results["settings"]["eval_version"] == evaluate.EVAL_VERSION
    assert results["model_path"] == "/fake/base" and results["world_size"] == 1
    assert set(results["versions"]) >= {"torch", "transformers", "trl", "grpo_math"}
    assert {"strict_accuracy", "lm_eval_flexible", "reward/correct"} <= set(results["metrics"])
    assert set(samples[0]["completions"][0]["rewards"]) == set(results["settings"]["reward_funcs"])
    assert "strict_accuracy" in capsys.readouterr().out


def test_eval_command_before_after(fake_models, tmp_path, capsys):
    folder = tmp_path / "ba"
    argv = [
        "eval",
        "--model",
        "base",
        "--before-after",
        "trained",
        "--dataset_name",
        "builtin",
        "--limit",
        "8",
        "--output",
        str(folder),
    ]
    assert cli.main(argv) == 0
    comparison = json.loads((folder / "compare.json").read_text())
    row = next(r for r in comparison["rows"] if r["metric"] == "strict_accuracy")
    assert (row["a"], row["b"], row["b_better"], row["a_better"]) == (0.5, 1.0, 4, 0)
    assert [f["index"] for f in comparison["flips"]] == [1, 3, 5, 7]
    assert (folder / "base" / "results.json").is_file() and (folder / "final" / "samples.jsonl").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--samples", "4"], "needs --temperature"),
        (["eval", "--limit", "0"], "must be >= 1"),
        (["compare", "no/such/a", "no/such/b"], "not an eval folder"),
    ],
)
def test_bad_input_is_a_one_line_error(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def make_folder(path: Path, right: set[int], n: int = 100, questions: int | None = None) -> Path:
    """An eval folder of ``n`` problems, ``right`` ones answered right; ``questions`` distinct questions repeat."""
    records = [
        score_problem(i, problem(i % (questions or n)), [out(RIGHT if i in right else WRONG)], "tags")
        for i in range(n)
    ]
    metrics, ci = summarize(records)
    results = {
        "metrics": metrics,
        "ci95": ci,
        "model": path.name,
        "data": {"problems_sha1": "x", "num_problems": n},
        "settings": {"eval_version": evaluate.EVAL_VERSION, "answer_format": "tags"},
    }
    write_results(path, results, records)
    return path


def test_compare_flags_a_planted_improvement(tmp_path):
    a = make_folder(tmp_path / "a", right=set(range(30)))
    b = make_folder(tmp_path / "b", right=set(range(70)))  # problems 30..69 flipped wrong -> right
    comparison = compare_results(a, b)
    row = next(r for r in comparison["rows"] if r["metric"] == "strict_accuracy")
    assert row["significant"] and row["p_value"] < 1e-9 and math.isclose(row["difference"], 0.4)
    low, high = row["difference_ci95"]  # 40 of 100 gained, none lost: 0.4 +- 1.96 * sd / 10
    assert math.isclose(low, 0.4 - 1.96 * math.sqrt(0.24 * 100 / 99) / 10, abs_tol=1e-6) and high > 0.4 > low > 0
    assert [f["index"] for f in comparison["flips"]] == list(range(30, 70))
    assert all(f["a"] == 0 and f["b"] == 1 for f in comparison["flips"])
    assert "40 better in B" in format_comparison(comparison)


def test_compare_identical_and_small_differences_are_not_significant(tmp_path):
    a = make_folder(tmp_path / "a", right=set(range(50)))
    same = compare_results(a, make_folder(tmp_path / "same", right=set(range(50))))
    assert not any(r["significant"] for r in same["rows"]) and same["flips"] == []
    assert all(r["p_value"] == 1.0 for r in same["rows"])
    small = compare_results(a, make_folder(tmp_path / "small", right=set(range(52))))  # 2 flips: p = 0.5
    assert not next(r for r in small["rows"] if r["metric"] == "strict_accuracy")["significant"]


def test_compare_distinct_tests_each_repeated_question_once(tmp_path, capsys):
    # 10 questions repeated 10 times: B gains 4 questions, 40 problems. Counted per copy that is p ~ 2e-12; per
    # question 4 wins, p = 0.125
    a = make_folder(tmp_path / "a", right=set(), questions=10)
    b = make_folder(tmp_path / "b", right={i for i in range(100) if i % 10 < 4}, questions=10)
    copies, once = compare_results(a, b), compare_results(a, b, distinct=True)
    strict = [next(r for r in c["rows"] if r["metric"] == "strict_accuracy") for c in (copies, once)]
    assert strict[0]["b_better"] == 40 and strict[0]["p_value"] < 1e-9
    assert strict[1]["b_better"] == 4 and strict[1]["p_value"] == 0.125 and strict[1]["b"] == 0.4
    assert "90 shared problems repeat an earlier question" in format_comparison(copies)
    assert cli.main(["compare", str(a), str(b), "--distinct"]) == 0
    assert "the first copy of each of 10 distinct questions" in capsys.readouterr().out


def test_compare_pairs_only_shared_problems(tmp_path, capsys):
    a = make_folder(tmp_path / "a", right=set(range(10)), n=20)
    b = make_folder(tmp_path / "b", right=set(range(10)), n=12)
    assert cli.main(["compare", str(a), str(b), "--output", str(tmp_path / "c.json")]) == 0
    saved = json.loads((tmp_path / "c.json").read_text())
    assert (saved["shared_problems"], saved["only_a"], saved["only_b"]) == (12, 8, 0)
    assert "12 shared problems" in capsys.readouterr().out


# ---- the embedded model on real GSM8K (about 30 s once converted) ----------------------------------------


def test_tiny_embedded_eval(tmp_path, capsys, embedded_model, gsm8k_dir, cpu_kind):
    folder = tmp_path / "embedded"
    argv = [
        "eval",
        "--model",
        "embedded",
        "--dataset_name",
        str(gsm8k_dir),
        "--limit",
        "3",
        "--max_new_tokens",
        "16",
        "--output",
        str(folder),
    ]
    assert cli.main(argv) == 0
    results = json.loads((folder / "results.json").read_text())
    assert results["settings"]["dtype"] == "auto" and results["dtype"] == (
        "bfloat16" if cpu_kind == "cpu-bf16" else "float32"
    )
    assert results["data"]["num_problems"] == 3 and results["generated_tokens"] > 0
    assert all(
        len(json.loads(line)["completions"]) == 1 for line in (folder / "samples.jsonl").read_text().splitlines()
    )
