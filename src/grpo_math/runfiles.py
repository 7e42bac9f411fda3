"""The names of every file a run or an evaluation writes (one place; train, evaluate, report and config read them).

A run folder (``output_dir``) holds ``checkpoint-N/``, ``metrics.jsonl``, ``run_info.json``, ``completions/``,
``grpo_math_config.yaml`` (the resolved settings, also in every checkpoint and in ``sft/``) and the final model;
an eval folder holds ``results.json`` and ``samples.jsonl`` (``compare.json`` beside them for ``--before-after``).

>>> CONFIG_FILE, RESULTS_FILE
('grpo_math_config.yaml', 'results.json')
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import UserError, __version__
from .data import read_jsonl

CONFIG_FILE = "grpo_math_config.yaml"
METRICS_FILE = "metrics.jsonl"
RUN_INFO_FILE = "run_info.json"
SFT_DIR = "sft"
COMPLETIONS_DIR = "completions"
RESULTS_FILE, SAMPLES_FILE, COMPARE_FILE = "results.json", "samples.jsonl", "compare.json"
PASSRATES_FILE, FILTER_FILE = "passrates.jsonl", "filter.json"  # grpo-math filter (with train.jsonl)
RFT_DATA_FILE, RFT_FILE = "rft_data.jsonl", "rft.json"  # grpo-math rft (beside the checkpoint)


def write_json(path: Path, obj: dict) -> None:
    """A JSON file written under a temporary name and renamed (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_results(folder: Path, results: dict, records: list[dict]) -> None:
    """``samples.jsonl`` then ``results.json`` (a folder with results.json is complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / SAMPLES_FILE, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    write_json(folder / RESULTS_FILE, results)


def load_results(folder, need_samples: bool = True) -> tuple[dict, list[dict]]:
    """``(results.json, samples.jsonl records)`` of an eval folder (``compare`` needs the samples; ``report`` can do
    without them); anything else there is a one-line error naming the file."""
    folder = Path(folder)
    path = folder / RESULTS_FILE
    if not path.is_file():
        raise UserError(
            f"{folder} is not an eval folder: it has no {RESULTS_FILE} (grpo-math eval --output writes one)"
        )
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg})") from None
    if not isinstance(results, dict) or not isinstance(results.get("metrics"), dict):
        raise UserError(f"{path}: not written by grpo-math eval (expected an object with a 'metrics' object)")
    if not (folder / SAMPLES_FILE).is_file():
        if need_samples:
            raise UserError(f"{folder} is not an eval folder: it has no {SAMPLES_FILE}")
        return results, []
    records = [row for row, _ in read_jsonl(folder / SAMPLES_FILE)]
    if any("scores" not in r or "index" not in r for r in records):
        raise UserError(f"{folder / SAMPLES_FILE}: not written by grpo-math eval (records without scores or index)")
    return results, records


def read_config(path) -> dict:
    """A recipe or a saved ``grpo_math_config.yaml`` as a dict; a missing file or invalid YAML is a one-line error."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
    except OSError as err:
        raise UserError(f"recipe not found: {err.filename}") from None
    except yaml.YAMLError as err:
        raise UserError(yaml_error(err, str(path))) from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a mapping of setting names to values")
    return config


def write_config(folder: Path, config: dict) -> None:
    """``grpo_math_config.yaml`` in ``folder``, written to a temporary name and renamed (never half-written)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CONFIG_FILE}.tmp"
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(folder / CONFIG_FILE)


def yaml_error(err, path: str = "recipe") -> str:
    """One line for a YAML syntax error: ``file:line: invalid YAML (problem)``."""
    mark = getattr(err, "problem_mark", None)
    where = f"{mark.name}:{mark.line + 1}" if mark else path
    return f"{where}: invalid YAML ({getattr(err, 'problem', None) or err})"


def versions() -> dict:
    """Versions of Python, grpo-math, torch, transformers and TRL, and the git commit of grpo-math's source
    (``+dirty`` with uncommitted changes; None outside a checkout): written into run_info.json and results.json."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "grpo_math": __version__, "grpo_math_git": source_commit()}
    for package in ("torch", "transformers", "trl"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def source_commit(folder: Path | None = None) -> str | None:
    """``git describe --always --dirty`` of the checkout this package (or ``folder``) was imported from, or None:
    not in a git checkout, the file not tracked there (a virtualenv inside some other repository), or no git."""
    import subprocess

    folder = folder or Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    if git("ls-files", "--error-unmatch", "__init__.py") is None:
        return None
    return git("describe", "--always", "--dirty=+dirty", "--abbrev=12") or None
