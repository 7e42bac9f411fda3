"""The names of every file a run or an evaluation writes (one place; train, evaluate, report and config read them).

A run folder (``output_dir``) holds ``checkpoint-N/``, ``metrics.jsonl``, ``run_info.json``, ``completions/``,
``grpo_math_config.yaml`` (the resolved settings, also in every checkpoint and in ``sft/``) and the final model;
an eval folder holds ``results.json`` and ``samples.jsonl`` (``compare.json`` beside them for ``--before-after``).

>>> CONFIG_FILE, RESULTS_FILE
('grpo_math_config.yaml', 'results.json')
"""

CONFIG_FILE = "grpo_math_config.yaml"
METRICS_FILE = "metrics.jsonl"
RUN_INFO_FILE = "run_info.json"
SFT_DIR = "sft"
COMPLETIONS_DIR = "completions"
RESULTS_FILE, SAMPLES_FILE, COMPARE_FILE = "results.json", "samples.jsonl", "compare.json"
