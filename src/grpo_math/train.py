"""GRPO training on GSM8K with TRL's ``GRPOTrainer``.

``main()`` reads as the pipeline: config -> data -> model -> rewards -> trainer -> train -> save.
The run folder (``output_dir``) holds ``checkpoint-N/`` (model, tokenizer, optimizer, RNG, config),
``metrics.jsonl`` (every TRL log line, one JSON object per step), ``completions/`` (sampled completions with
their reward parts, TRL's ``log_completions``), ``grpo_math_config.yaml`` and the final model + tokenizer.

Faults: a step whose gradients are NaN/inf, or whose logged loss / grad norm passes ``bad_loss`` /
``bad_grad_norm``, is dropped (``on_bad_step: skip``) or ends the run with a one-line error naming the step,
keeping the last good checkpoint (``stop``). Checkpoints are written to ``output_dir/.staging`` and renamed into
place, so a kill during a save never leaves a half-written ``checkpoint-N``; ``--resume`` picks up the last one.
Running out of disk or memory ends with an error that says which setting to lower.

Example (2 steps on the builtin problems; a few minutes on 2 CPU cores)::

    grpo-math train --config recipes/smoke.yaml --max_steps 2 --output_dir runs/try
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint

from . import UserError
from .allocator import malloc_name, missing_jemalloc_hint, reuse_freed_memory
from .callbacks import AccuracyCallback, BadStepGuard, MetricsFile, SignalWatch, TrimFreedMemory
from .config import GRPOMathConfig, ScriptConfig, parse_train_args, to_dict
from .console import setup_logging, use_console
from .data import load_gsm8k, render_plain
from .models import apply_template, load_tokenizer, load_weights, resolve_model, torchrun_env
from .rewards import get_reward_funcs
from .runfiles import CONFIG_FILE, METRICS_FILE, RUN_INFO_FILE, SFT_DIR, versions, write_config


def main(argv: list[str] | None = None) -> int:
    setup_logging(main_process=torchrun_env()[0] == 0)
    script, args, model_args = parse_train_args(argv)
    resume = find_resume_checkpoint(args)
    path = resolve_model(model_args.model_name_or_path)
    tokenizer = load_tokenizer(path)
    dataset = load_train_data(script, tokenizer, args.max_prompt_length)  # bad data fails before the model loads
    if script.sft_examples:
        path = cold_start(script, args, model_args, path, tokenizer)
    model = load_weights(path, model_args.dtype or "float32")  # fp32 master weights; mixed precision from bf16
    trainer = build_trainer(script, args, model_args, model, tokenizer, dataset)
    announce(trainer, f"GRPO on {len(dataset)} problems")
    write_run_info(trainer)
    run_training(trainer, resume)
    save_final(trainer, script, args, model_args)
    if trainer.accelerator.is_main_process:
        print(f"checkpoint: {args.output_dir}")
    return 0


def sft_command(argv: list[str]) -> int:
    """``grpo-math sft``: only the cold-start stage of a recipe (same flags as ``train``), into ``output_dir/sft``."""
    setup_logging(main_process=torchrun_env()[0] == 0)
    script, args, model_args = parse_train_args(argv, prog="grpo-math sft")
    if not script.sft_examples:
        raise UserError("set --sft_examples N (training solutions to fine-tune on)")
    path = resolve_model(model_args.model_name_or_path)
    print(f"checkpoint: {cold_start(script, args, model_args, path, load_tokenizer(path))}")
    return 0


def cold_start(script: ScriptConfig, args: GRPOMathConfig, model_args, path: str, tokenizer) -> str:
    """Stage 1, DeepSeek-R1's cold start: ``sft_stage`` on the first ``sft_examples`` training solutions rewritten
    into the asked format. Returns ``output_dir/sft``, the folder GRPO starts from, reused when complete."""
    final = Path(args.output_dir) / SFT_DIR
    if not (final / CONFIG_FILE).is_file():
        extra = f" + {script.sft_extra_examples} of {script.sft_extra_dataset}" if script.sft_extra_dataset else ""
        what = f"cold start (SFT) on {script.sft_examples} solutions{extra}"
        config = to_dict(script, model_args, args)
        sft_stage(script, args, model_args, path, tokenizer, sft_data(script, tokenizer), final, what, config)
    return str(final)


def sft_stage(script, args, model_args, path: str, tokenizer, dataset, final: Path, what: str, config: dict) -> None:
    """TRL's ``SFTTrainer`` (loss on the completion only; the recipe's ``sft_*`` settings) from the model at ``path``
    on prompt-completion rows, for the cold start and ``grpo-math rft``. Trained under ``final/.sft-staging``, whose
    files are moved into ``final`` when complete; ``config`` (``grpo_math_config.yaml``) is written last."""
    from trl import SFTConfig, SFTTrainer

    reuse = args.use_cpu and reuse_freed_memory()
    staging = final / ".sft-staging"
    shutil.rmtree(staging, ignore_errors=True)
    (final / CONFIG_FILE).unlink(missing_ok=True)  # a retrained folder is incomplete until its config is back
    sft_args = SFTConfig(
        output_dir=str(staging),
        num_train_epochs=script.sft_epochs,
        learning_rate=script.sft_learning_rate,
        per_device_train_batch_size=script.sft_batch_size,
        lr_scheduler_type="linear",
        warmup_steps=0.05,
        max_length=args.max_prompt_length + args.max_completion_length,
        train_sampling_strategy="group_by_length",
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to=[],
        bf16=args.bf16,
        use_cpu=args.use_cpu,
        seed=args.seed,
        activation_checkpointing=args.activation_checkpointing,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(
        model=load_weights(path, model_args.dtype or "float32"),
        args=sft_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[BadStepGuard(args.on_bad_step, args.bad_loss, args.bad_grad_norm), MetricsFile()]
        + ([TrimFreedMemory()] if reuse else []),
    )
    use_console(trainer, "sft")
    announce(trainer, what)
    run_training(trainer, None)
    trainer.save_model(str(staging))
    if trainer.accelerator.is_main_process:
        for item in staging.iterdir():
            if (final / item.name).is_dir():
                shutil.rmtree(final / item.name)
            item.replace(final / item.name)
        staging.rmdir()
        write_config(final, config)  # written last: marks the folder complete
    trainer.accelerator.wait_for_everyone()


def sft_data(script: ScriptConfig, tokenizer):
    """Prompt-completion rows for the cold start: the GRPO prompt (``load_gsm8k``) and the reference solution in the
    asked format, for the first ``sft_examples`` problems of ``dataset_name`` and the first ``sft_extra_examples`` of
    ``sft_extra_dataset``. A source whose rows carry no worked solution (a gym task without one) is an error: the
    cold start would teach an empty ``<think>``."""
    from datasets import concatenate_datasets

    from .data import format_solution

    parts = [(script.dataset_name, script.sft_examples)]
    if script.sft_extra_dataset:
        parts.append((script.sft_extra_dataset, script.sft_extra_examples))
    datasets = []
    for name, count in parts:
        rows = load_gsm8k(
            name,
            script.dataset_train_split,
            count,
            script.dataset_shuffle_seed,
            script.answer_format,
            script.system_prompt,
            script.num_few_shot,
            script.skip_bad_rows,
        )
        empty = sum(not solution.strip() for solution in rows["solution"])
        if empty:
            raise UserError(
                f"cold start: {empty} of {len(rows)} rows of '{name}' have no worked solution to fine-tune on "
                "(gym tasks other than the arithmetic ones carry none); use another source or sft_examples: 0"
            )
        datasets.append(rows.select_columns(["prompt", "solution", "answer"]))

    def target(row):
        return format_solution(row["solution"], row["answer"], script.answer_format, script.sft_keep_annotations)

    return prompt_completion(concatenate_datasets(datasets), tokenizer, target)


def prompt_completion(dataset, tokenizer, target):
    """SFT rows: each row's ``prompt`` and ``target(row)`` as its completion, both chat messages, or plain text
    when the tokenizer has no chat template."""
    chat = bool(getattr(tokenizer, "chat_template", None))

    def completion(row):
        return {"completion": [{"role": "assistant", "content": target(row)}] if chat else target(row)}

    return plain_prompts(dataset.map(completion), tokenizer).select_columns(["prompt", "completion"])


def announce(trainer, what: str) -> None:
    """One line before training: what runs, where, in which precision, where it is written (+ ``allocator``'s hint)."""
    args, acc = trainer.args, trainer.accelerator
    if acc.is_main_process:
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
        if (steps := trainer.state.max_steps or args.max_steps) <= 0:  # epochs: the optimizer steps the data give
            batches = len(trainer.get_train_dataloader())
            steps = math.ceil(batches / args.gradient_accumulation_steps * args.num_train_epochs)
        print(f"{what}: {steps} steps, {acc.num_processes} x {acc.device.type}, {precision} -> {args.output_dir}")
        if args.use_cpu and (hint := missing_jemalloc_hint()):
            print(hint)


def write_run_info(trainer) -> dict:
    """``run_info.json``: world size, and one entry per process gathered over the process group (so a
    multi-process run proves every process took part; each names its malloc), device kind and versions. Rank 0
    writes it."""
    import platform

    import torch
    from accelerate.utils import gather_object

    acc = trainer.accelerator
    me = {
        "rank": acc.process_index,
        "local_rank": acc.local_process_index,
        "pid": os.getpid(),
        "host": platform.node(),
        "device": str(acc.device),
        "malloc": malloc_name(),
    }
    processes = gather_object([me])
    info = {
        "world_size": acc.num_processes,
        "num_machines": len({p["host"] for p in processes}),
        "processes": processes,
        "distributed_type": str(acc.distributed_type),
        "device_kind": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "mixed_precision": acc.mixed_precision,
        "versions": versions(),
    }
    if acc.is_main_process:
        Path(trainer.args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(trainer.args.output_dir) / RUN_INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return info


def run_training(trainer, resume: str | None) -> None:
    """``trainer.train()`` with faults turned into one-line errors that keep what was saved."""
    args = trainer.args
    try:
        trainer.train(resume_from_checkpoint=resume)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise UserError(
            f"out of disk space in {args.output_dir} at step {trainer.state.global_step}: free space, "
            "or lower save_total_limit / raise save_steps (each checkpoint holds model + optimizer)"
        ) from None
    except (MemoryError, RuntimeError) as err:
        if not isinstance(err, MemoryError) and "out of memory" not in str(err) and "can't allocate" not in str(err):
            raise
        raise UserError(
            f"out of memory at step {trainer.state.global_step}: lower per_device_train_batch_size "
            "(raise gradient_accumulation_steps), max_completion_length or num_generations, set --use_peft, "
            "or set --activation_checkpointing true (TRL's default; the CPU recipes turn it off)"
        ) from None
    guard = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, BadStepGuard))
    if guard.stopped:
        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        raise UserError(
            f"step {guard.stopped}: {guard.reason}; training stopped, last good checkpoint: "
            f"{last or 'none yet'} (on_bad_step: skip drops such steps instead)"
        )


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


def load_train_data(script: ScriptConfig, tokenizer, max_prompt_length: int):
    """Training problems as prompts; plain-text prompts when the tokenizer has no chat template."""
    dataset = load_gsm8k(
        script.dataset_name,
        script.dataset_train_split,
        script.dataset_limit,
        script.dataset_shuffle_seed,
        script.answer_format,
        script.system_prompt,
        script.num_few_shot,
        script.skip_bad_rows,
        skip=script.sft_examples,
    )
    dataset = plain_prompts(dataset, tokenizer)
    check_prompt_lengths(dataset, tokenizer, max_prompt_length)
    return dataset


def plain_prompts(dataset, tokenizer):
    """Chat prompts as plain text when the tokenizer has no chat template (unchanged otherwise)."""
    if getattr(tokenizer, "chat_template", None):
        return dataset
    return dataset.map(lambda row: {"prompt": render_plain(row["prompt"])})


def check_prompt_lengths(dataset, tokenizer, max_prompt_length: int) -> int:
    """Fail (naming the row and the fix) when a prompt is longer than ``max_prompt_length`` tokens."""
    longest, where = 0, 0
    for i, prompt in enumerate(dataset["prompt"]):
        n = len(tokenizer(apply_template(tokenizer, prompt), add_special_tokens=False)["input_ids"])
        if n > longest:
            longest, where = n, i
    if longest > max_prompt_length:
        raise UserError(
            f"prompt of problem {where + 1} has {longest} tokens > max_prompt_length={max_prompt_length}; "
            f"raise --max_prompt_length to at least {longest} (prompts are never truncated)"
        )
    return longest


def trainer_class():
    """TRL's GRPOTrainer with prefix sharing (``prefix.PrefixSharing``) and checkpoints that appear atomically
    (built lazily: importing TRL's trainer is slow)."""
    from transformers.trainer_utils import rotate_checkpoints
    from trl import GRPOTrainer

    from .prefix import PrefixSharing

    class Trainer(PrefixSharing, GRPOTrainer):
        run_config: dict = {}

        def _issue_warnings_after_load(self, load_result):
            # A checkpoint never stores tied weights (lm_head = embed_tokens): not a missing key worth a warning.
            tied = set(getattr(self.accelerator.unwrap_model(self.model), "all_tied_weights_keys", None) or ())
            missing = [k for k in load_result.missing_keys if not any(k == t or k.endswith("." + t) for t in tied)]
            super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

        def _save_checkpoint(self, model, trial):
            # Every process writes checkpoint-N under .staging; after a barrier the main process adds the config and
            # renames it into place, so a kill never leaves a half-written checkpoint-N (on one machine, or on
            # several sharing output_dir's file system). TRL's model card goes to output_dir itself.
            real, acc = self.args.output_dir, self.accelerator
            staging = Path(real) / ".staging"
            if acc.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
            acc.wait_for_everyone()
            self.args.output_dir = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = real
            acc.wait_for_everyone()
            if acc.is_main_process:
                publish_checkpoints(staging, Path(real), self.run_config)
                rotate_checkpoints(real, self.args.save_total_limit, self.state.best_model_checkpoint)
            acc.wait_for_everyone()

    return Trainer


def publish_checkpoints(staging: Path, output_dir: Path, run_config: dict) -> None:
    """Move each complete ``staging/checkpoint-N`` (config added last) and the model card into ``output_dir``."""
    for folder in staging.glob("checkpoint-*"):
        write_config(folder, run_config)
        target = output_dir / folder.name
        if target.exists():
            shutil.rmtree(target)
        folder.rename(target)
    if (staging / "README.md").is_file():
        (staging / "README.md").replace(output_dir / "README.md")
    shutil.rmtree(staging, ignore_errors=True)


def build_trainer(script: ScriptConfig, args: GRPOMathConfig, model_args, model, tokenizer, dataset):
    """TRL's GRPOTrainer with our reward functions (each logged as ``rewards/<name>/mean``)."""
    from trl import get_peft_config

    callbacks = [BadStepGuard(args.on_bad_step, args.bad_loss, args.bad_grad_norm), MetricsFile(), SignalWatch()]
    if args.use_cpu and reuse_freed_memory():
        callbacks.append(TrimFreedMemory())
    if args.eval_limit:
        callbacks.insert(0, accuracy_callback(script, args))
    trainer = trainer_class()(
        model=model,
        reward_funcs=get_reward_funcs(script.reward_funcs, script.answer_format),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=callbacks,
    )
    trainer.run_config = to_dict(script, model_args, args)
    trainer.answer_format = script.answer_format  # rollouts stop once this format's answer closes
    use_console(trainer)
    if args.eval_limit:
        callbacks[0].trainer = trainer  # so eval/* metrics land in the step's own log line
    return trainer


def accuracy_callback(script: ScriptConfig, args: GRPOMathConfig):
    """Greedy accuracy on the first ``eval_limit`` held-out problems every ``eval_steps`` steps."""
    from .data import load_problems
    from .evaluate import Sampling
    from .prompts import PromptSettings

    problems = load_problems(script.dataset_name, script.dataset_test_split, args.eval_limit)
    prompt = PromptSettings.prompt_of(script)
    return AccuracyCallback(
        problems, int(args.eval_steps), prompt, Sampling(max_new_tokens=args.max_completion_length)
    )


def save_final(trainer, script, args, model_args) -> None:
    """Final model + tokenizer + resolved config in ``output_dir``: LoRA adapters merged into the model;
    otherwise ``trainer.save_model``, which gathers DeepSpeed ZeRO-3 / FSDP shards into one HF model."""
    acc = trainer.accelerator
    if model_args.use_peft:
        merged = acc.unwrap_model(trainer.model).merge_and_unload()
        if acc.is_main_process:
            merged.save_pretrained(args.output_dir)
            trainer.processing_class.save_pretrained(args.output_dir)
    else:
        trainer.save_model(args.output_dir)
    if acc.is_main_process:
        trainer.create_model_card(model_name=Path(args.output_dir).resolve().name)
        write_config(Path(args.output_dir), to_dict(script, model_args, args))
