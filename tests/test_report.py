"""grpo-math report: plots and report.html of the tiny fixture run (tests/fixtures/run), also in headless Chromium."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import require
from PIL import Image

from grpo_math import UserError
from grpo_math.cli import main
from grpo_math.report import report_command
from grpo_math.rundata import load_run

RUN = Path(__file__).parent / "fixtures" / "run"
PLOTS = [
    "reward.png",
    "reward_parts.png",
    "completion_length.png",
    "zero_std.png",
    "kl.png",
    "sft.png",
    "eval_accuracy.png",
    "before_after.png",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert report_command([str(RUN), "--output", str(out)]) == 0
    return out


def test_every_plot_is_a_valid_png(report):
    for name in PLOTS:
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        with Image.open(report / name) as image:
            image.verify()
            assert image.size[0] > 300 and image.size[1] > 200


def test_html_is_self_contained_and_escaped(report):
    page = (report / "report.html").read_text(encoding="utf-8")
    links = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page)
    assert links and all(link.startswith("data:image/png;base64,") for link in links)
    assert page.count("<script>") == 1  # ours; the fixture's "<script>alert('x')" completion is text
    assert "&lt;script&gt;alert(" in page and "&lt;b&gt;not bold&lt;/b&gt;" in page
    assert page.count("<img ") == len(PLOTS)
    assert '<mark class="bad"' in page and '<mark class="ok"' in page  # "48 / 2 = 25" and "48/2 = 24"
    assert "strict_accuracy" in page and "wrong</span> → <span class='good'>right" in page


def test_run_without_evals_or_completions(tmp_path):
    shutil.copy(RUN / "metrics.jsonl", tmp_path)
    assert report_command([str(tmp_path)]) == 0
    written = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert written == sorted(set(PLOTS) - {"before_after.png", "sft.png"} | {"report.html"})
    assert "No training completions" in (tmp_path / "report" / "report.html").read_text()


def test_trl_parquet_completions(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copy(RUN / "metrics.jsonl", tmp_path)
    shutil.copy(RUN / "grpo_math_config.yaml", tmp_path)
    (tmp_path / "completions").mkdir()
    row = {
        "step": 2,
        "prompt": [{"role": "user", "content": "Half of 48?"}],
        "completion": [{"role": "assistant", "content": "<think>48/2 = 24</think>\n<answer>24</answer>"}],
        "correct": 1.0,
        "format_soft": 1.0,
        "steps": 1.0,
        "repetition": 0.0,
        "length": 0.0,
        "advantage": 0.5,
    }
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "completions" / "completions_00002.parquet")
    [completion] = load_run(tmp_path).completions
    assert completion["question"] == "Half of 48?" and completion["rewards"]["correct"] == 1.0
    assert "advantage" not in completion["rewards"]


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(UserError, match="run folder not found"):
        load_run(tmp_path / "missing")
    with pytest.raises(UserError, match="no metrics.jsonl"):
        load_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "reward": \n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not valid JSON"):
        load_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    assert main(["report", str(tmp_path), "--before", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "has no results.json" in err and len(err.strip().splitlines()) == 1


# ---- headless Chromium -------------------------------------------------------------------------------------


def chromium(page: Path, tmp_path: Path) -> tuple[str, str]:
    """(DOM after the load event, browser log) of a local page."""
    done = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr


def console_messages(log: str) -> list[str]:
    return [line for line in log.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def test_report_renders_in_chromium(report, tmp_path):
    require(shutil.which("chromium") is not None, "Debian's chromium package (.ci/run installs it)")
    planted = tmp_path / "planted.html"  # the check below must be able to fail
    planted.write_text("<!DOCTYPE html><body><script>console.error('planted'); nowhere();</script></body>")
    assert len(console_messages(chromium(planted, tmp_path)[1])) == 2

    dom, log = chromium(report / "report.html", tmp_path)
    assert console_messages(log) == []
    body = re.search(r"<body[^>]*>", dom).group()
    assert f'data-images-total="{len(PLOTS)}"' in body
    assert f'data-images-loaded="{len(PLOTS)}"' in body
