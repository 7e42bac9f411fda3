"""``grpo-math filter``: exactly the mixed-pass-rate problems are kept, the folder reads back as GSM8K, an interrupted
run resumes without sampling its finished problems again, and bad input is a one-line error.

No model runs: ``models.load_model`` / ``models.generate`` are fakes whose completions are right for a known number
of each problem's K samples (builtin problem i: i % 5 of 4), so every pass rate is known in advance.
"""

import json

import pytest

from grpo_math import cli, models, passrate
from grpo_math.data import load_gsm8k, load_problems

K = 4
BUILTIN = load_problems("builtin")
GOLD = {p.question: (i, p.answer) for i, p in enumerate(BUILTIN)}


def passes(i: int) -> int:
    """How many of problem i's K samples the fake model gets right: 0, 1, 2, 3, 4, 0, 1, ..."""
    return i % 5


class FakeModel:
    dtype = "float32"


class FakeTokenizer:
    padding_side = "right"


class FakeGenerate:
    """Records the questions it was asked; raises KeyboardInterrupt on call number ``interrupt_at``."""

    def __init__(self, interrupt_at: int | None = None):
        self.calls, self.questions, self.interrupt_at = 0, [], interrupt_at

    def __call__(self, model, tokenizer, prompts, max_new_tokens=256, temperature=0.0, num_samples=1, *a, **k):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        results = []
        for messages in prompts:
            question = messages[-1]["content"].rsplit("\n\n", 1)[0]
            self.questions.append(question)
            index, gold = GOLD[question]
            texts = [
                f"<think>so {gold}</think>\n<answer>{gold if j < passes(index) else -1}</answer>" for j in range(K)
            ]
            results.append([{"text": t, "tokens": 10, "truncated": False} for t in texts[:num_samples]])
        return results


@pytest.fixture
def fake(monkeypatch):
    generate = FakeGenerate()
    monkeypatch.setattr(models, "generate", generate)
    monkeypatch.setattr(
        models, "load_model", lambda name, dtype="auto", device=None: (FakeModel(), FakeTokenizer(), name)
    )
    monkeypatch.setattr(passrate, "CHUNK", 4)
    return generate


def run_filter(out, *flags) -> int:
    argv = ["filter", "--model", "fake/model", "--dataset_name", "builtin", "--limit", "20", "--samples", str(K)]
    return cli.main([*argv, "--temperature", "1.0", "--output", str(out), *flags])


def test_keeps_exactly_the_mixed_problems_and_writes_a_gsm8k_folder(fake, tmp_path, capsys):
    assert run_filter(tmp_path / "f") == 0
    mixed = [p for i, p in enumerate(BUILTIN[:20]) if 0 < passes(i) < K]
    kept = load_problems(str(tmp_path / "f"), "train")  # the loader every command uses
    assert [(p.question, p.solution, p.answer) for p in kept] == [(p.question, p.solution, p.answer) for p in mixed]
    assert len(load_gsm8k(str(tmp_path / "f"), "train")) == len(mixed) == 12
    lines = [json.loads(line) for line in (tmp_path / "f" / "passrates.jsonl").read_text().splitlines()]
    assert [(line["index"], line["passed"], line["samples"]) for line in lines] == [
        (i, passes(i), K) for i in range(20)
    ]
    assert lines[1]["pass_rate"] == 0.25 and lines[1]["question_sha1"] == passrate.question_sha1(BUILTIN[1].question)
    report = json.loads((tmp_path / "f" / "filter.json").read_text())
    assert report["complete"] and report["counts"] | {"histogram": None} == {
        "problems": 20,
        "kept": 12,
        "dropped": 8,
        "never_solved": 4,
        "always_solved": 4,
        "histogram": None,
    }
    assert report["counts"]["histogram"] == {"0": 4, "1": 4, "2": 4, "3": 4, "4": 4}
    assert report["settings"]["samples"] == K and "trl" in report["versions"]
    out = capsys.readouterr().out
    assert "kept 12 of 20 problems" in out and "0/4: 4  1/4: 4  2/4: 4  3/4: 4  4/4: 4" in out


def test_other_bounds_reuse_the_samples(fake, tmp_path):
    assert run_filter(tmp_path / "f") == 0
    calls = fake.calls
    assert run_filter(tmp_path / "f", "--min_pass_rate", "0.3", "--max_pass_rate", "0.8") == 0
    assert fake.calls == calls  # nothing sampled again, no model loaded
    kept = [p.question for p in load_problems(str(tmp_path / "f"), "train")]
    assert kept == [p.question for i, p in enumerate(BUILTIN[:20]) if passes(i) in (2, 3)]


def test_an_interrupted_run_resumes_without_sampling_finished_problems(fake, monkeypatch, tmp_path):
    monkeypatch.setattr(models, "generate", FakeGenerate(interrupt_at=3))  # dies in the third chunk of 4 problems
    assert run_filter(tmp_path / "f") == 130
    progress = tmp_path / "f" / "passrates.jsonl"
    assert len(progress.read_text().splitlines()) == 8 and not (tmp_path / "f" / "train.jsonl").exists()
    with open(progress, "a") as f:
        f.write('{"index": 8, "question_sh')  # a line cut short by a kill mid-write
    resumed = FakeGenerate()
    monkeypatch.setattr(models, "generate", resumed)
    assert run_filter(tmp_path / "f") == 0
    assert resumed.questions == [p.question for p in BUILTIN[8:20]]
    lines = [json.loads(line) for line in progress.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(20))
    assert [line["passed"] for line in lines] == [passes(i) for i in range(20)]
    assert len(load_problems(str(tmp_path / "f"), "train")) == 12


def test_resuming_with_other_settings_or_data_is_refused(fake, tmp_path, capsys):
    assert run_filter(tmp_path / "f") == 0
    capsys.readouterr()
    assert run_filter(tmp_path / "f", "--max_new_tokens", "64") == 2
    err = capsys.readouterr().err
    assert "max_new_tokens=256 (now 64)" in err and len(err.strip().splitlines()) == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.jsonl").write_text(json.dumps({"question": "Q?", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    argv = ["filter", "--model", "fake/model", "--dataset_name", str(other), "--samples", str(K)]
    assert cli.main([*argv, "--output", str(tmp_path / "f")]) == 2
    assert "is another question than this run's problem 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "no/such/dir/"], "model path not found"),
        (["--model", "fake/model", "--samples", "0"], "must be >= 1"),
        (["--model", "fake/model", "--min_pass_rate", "0.5", "--max_pass_rate", "0.5"], "must be < --max_pass_rate"),
        (["--model", "fake/model", "--limit", "0"], "--limit must be >= 1"),
        (["--dataset_name", "builtin"], "required: --model"),
        (["--model", "fake/model", "--split", "test"], "only train problems may go into it"),
    ],
)
def test_bad_input_is_a_one_line_error(flags, message, tmp_path, capsys):
    assert cli.main(["filter", "--temperature", "1", "--output", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
