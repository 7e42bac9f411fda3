import json

import pytest

from grpo_math import UserError
from grpo_math.data import BUILTIN, build_prompt, format_solution, load_gsm8k, load_problems


def test_builtin_set_parses_and_has_at_least_50_problems():
    problems = load_problems(BUILTIN)
    assert len(problems) >= 50
    assert all(p.answer and "####" not in p.solution for p in problems)


def test_prompt_never_contains_solution_or_answer(gsm8k_dir):
    rows = load_gsm8k(str(gsm8k_dir), split="test", limit=200)
    for row in rows:
        text = " ".join(m["content"] for m in row["prompt"])
        assert row["solution"] not in text and "####" not in text and "<<" not in text
        assert row["question"] in text


def test_gold_answers_parsed_like_gsm8k(tmp_path):
    (tmp_path / "train.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"question": "q1", "answer": "a = <<1+2=3>>3\n#### 1,000"},
                {"question": "q2", "answer": "lost\n#### -3"},
                {"question": "q3", "answer": "half\n#### 0.5"},
            ]
        )
    )
    assert [p.answer for p in load_problems(str(tmp_path))] == ["1000", "-3", "0.5"]


def test_bad_row_names_file_and_line_or_is_skipped(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(
        json.dumps({"question": "ok", "answer": "x\n#### 4"})
        + "\n"
        + json.dumps({"question": "bad", "answer": "no final line"})
        + "\n"
        + json.dumps({"answer": "#### 2"})
        + "\n"
    )
    with pytest.raises(UserError, match=r"train.jsonl:2: field 'answer'"):
        load_problems(str(tmp_path))
    assert len(load_problems(str(tmp_path), skip_bad_rows=True)) == 1
    assert load_problems.skipped == 2


def test_missing_data_and_bad_json_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no test.jsonl"):
        load_problems(str(tmp_path), split="test")
    (tmp_path / "train.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match=r"train.jsonl:1: not valid JSON"):
        load_problems(str(tmp_path))
    with pytest.raises(UserError, match="dataset not found"):
        load_problems("./nowhere/train.jsonl")


def test_parquet_folder(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"question": "q", "answer": "r\n#### 7"}]).to_parquet(str(tmp_path / "test.parquet"))
    assert load_problems(str(tmp_path), split="test")[0].answer == "7"


def test_limit_order_and_shuffle_are_deterministic(gsm8k_dir):
    first = [p.question for p in load_problems(str(gsm8k_dir), "test", limit=5)]
    assert first == [p.question for p in load_problems(str(gsm8k_dir), "test", limit=5)]
    shuffled = [p.question for p in load_problems(str(gsm8k_dir), "test", limit=5, seed=1)]
    assert shuffled == [p.question for p in load_problems(str(gsm8k_dir), "test", limit=5, seed=1)] != first


@pytest.mark.parametrize("fmt,marker", [("tags", "<answer>"), ("hash", "####"), ("boxed", "\\boxed")])
def test_answer_format_setting(fmt, marker):
    assert marker in build_prompt("What is 2+2?", fmt)[-1]["content"]
    assert marker in format_solution("2+2 = <<2+2=4>>4", "4", fmt)


def test_few_shot_examples_come_from_builtin_not_from_the_question():
    rows = load_gsm8k(BUILTIN, limit=1, num_few_shot=2)
    roles = [m["role"] for m in rows[0]["prompt"]]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
