"""GRPO training on GSM8K with TRL's ``GRPOTrainer`` (and the cold-start SFT stage with ``SFTTrainer``).

``main()`` reads as the pipeline: config -> data -> model -> rewards -> trainer -> train -> save.
The run folder (``output_dir``) holds ``checkpoint-N/`` (model, tokenizer, optimizer, RNG, config),
``metrics.jsonl`` (every TRL log line, one JSON object per step), ``completions/`` (sampled completions with
their reward parts, TRL's ``log_completions``), ``grpo_math_config.yaml`` and the final model + tokenizer.

Example (2 steps on the builtin problems; about a minute on 2 CPU cores)::

    grpo-math train --config recipes/smoke.yaml --max_steps 2 --output_dir runs/try
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from . import UserError
from .config import GRPOMathConfig, ScriptConfig, parse_train_args, to_dict
from .data import load_gsm8k, render_plain
from .models import apply_template, load_tokenizer, resolve_model, torch_dtype
from .rewards import get_reward_funcs

CONFIG_FILE = "grpo_math_config.yaml"
METRICS_FILE = "metrics.jsonl"


def main(argv: list[str] | None = None) -> int:
    script, args, model_args = parse_train_args(argv)
    resume = find_resume_checkpoint(args)
    model, tokenizer = load_policy(model_args.model_name_or_path, model_args.dtype)
    dataset = load_train_data(script, tokenizer, args.max_prompt_length)
    trainer = build_trainer(script, args, model_args, model, tokenizer, dataset)
    trainer.train(resume_from_checkpoint=resume)
    save_final(trainer, script, args, model_args)
    print(f"checkpoint: {args.output_dir}")
    return 0


def find_resume_checkpoint(args: GRPOMathConfig) -> str | None:
    """The last ``checkpoint-N`` in ``output_dir`` when ``--resume`` is set (an error when there is none);
    ``metrics.jsonl`` is cut back to that step so the resumed run continues it with no gap or duplicate."""
    if not args.resume:
        return None
    last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    if last is None:
        raise UserError(f"--resume: no checkpoint-N folder in {args.output_dir}")
    step = int(Path(last).name.split("-")[-1])
    metrics = Path(args.output_dir) / METRICS_FILE
    if metrics.is_file():
        kept = [line for line in metrics.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        metrics.write_text("".join(line + "\n" for line in kept))
    return last


def load_policy(name: str, dtype: str | None):
    """Policy model (weights kept in fp32 unless asked: mixed precision comes from ``bf16``) and tokenizer."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype or "float32"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load model {name}: {str(err).splitlines()[0]}") from None
    return model, load_tokenizer(path)


def load_train_data(script: ScriptConfig, tokenizer, max_prompt_length: int):
    """Training problems as prompts; plain-text prompts when the tokenizer has no chat template."""
    dataset = load_gsm8k(script.dataset_name, script.dataset_train_split, script.dataset_limit,
                         script.dataset_shuffle_seed, script.answer_format, script.system_prompt,
                         script.num_few_shot, script.skip_bad_rows)
    if not getattr(tokenizer, "chat_template", None):
        dataset = dataset.map(lambda row: {"prompt": render_plain(row["prompt"])})
    check_prompt_lengths(dataset, tokenizer, max_prompt_length)
    return dataset


def check_prompt_lengths(dataset, tokenizer, max_prompt_length: int) -> int:
    """Fail (naming the row and the fix) when a prompt is longer than ``max_prompt_length`` tokens."""
    longest, where = 0, 0
    for i, prompt in enumerate(dataset["prompt"]):
        n = len(tokenizer(apply_template(tokenizer, prompt), add_special_tokens=False)["input_ids"])
        if n > longest:
            longest, where = n, i
    if longest > max_prompt_length:
        raise UserError(f"prompt of problem {where + 1} has {longest} tokens > max_prompt_length={max_prompt_length}; "
                        f"raise --max_prompt_length to at least {longest} (prompts are never truncated)")
    return longest


class RunFiles(TrainerCallback):
    """Writes ``metrics.jsonl`` (one line per log) and the resolved config into every checkpoint."""

    def __init__(self, config: dict):
        self.config = config

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(Path(args.output_dir) / METRICS_FILE, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_config(folder, self.config)


def write_config(folder: Path, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))


def build_trainer(script: ScriptConfig, args: GRPOMathConfig, model_args, model, tokenizer, dataset):
    """TRL's GRPOTrainer with our reward functions (each logged as ``rewards/<name>/mean``)."""
    from trl import GRPOTrainer, get_peft_config

    callbacks = [RunFiles(to_dict(script, model_args, args))]
    if args.eval_limit:
        callbacks.insert(0, accuracy_callback(script, args))
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=get_reward_funcs(script.reward_funcs, script.answer_format),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=callbacks,
    )
    if args.eval_limit:
        callbacks[0].trainer = trainer  # so eval/* metrics land in the step's own log line
    return trainer


def accuracy_callback(script: ScriptConfig, args: GRPOMathConfig):
    """Greedy accuracy on the first ``eval_limit`` held-out problems every ``eval_steps`` steps."""
    from .data import load_problems
    from .evaluate import AccuracyCallback

    problems = load_problems(script.dataset_name, script.dataset_test_split, args.eval_limit)
    return AccuracyCallback(problems, int(args.eval_steps), answer_format=script.answer_format,
                            system_prompt=script.system_prompt, num_few_shot=script.num_few_shot,
                            max_new_tokens=args.max_completion_length, batch_size=16)


def save_final(trainer, script, args, model_args) -> None:
    """Final model + tokenizer + resolved config in ``output_dir`` (LoRA adapters merged into the model)."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if trainer.accelerator.is_main_process:
        model.save_pretrained(args.output_dir)
        trainer.processing_class.save_pretrained(args.output_dir)
        write_config(Path(args.output_dir), to_dict(script, model_args, args))
