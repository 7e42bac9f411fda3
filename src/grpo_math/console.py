"""What a person sees while training: logging set up once, then one progress bar and one short line per logged
step, on the main process only. Everything else goes to files (``metrics.jsonl``, ``completions/*.parquet``).

>>> step_line({"reward": 0.297, "rewards/correct/mean": 0.125, "rewards/format_soft/mean": 0.5,
...            "completions/mean_length": 58.2}, step=2, max_steps=4, seconds_per_step=85.1)
'step 2/4  reward 0.297  correct 0.125  format 0.500  length 58  85.1 s/step  ETA 2m50s'
>>> step_line({"loss": 1.2345, "mean_token_accuracy": 0.61}, step=3, max_steps=48, seconds_per_step=22.0, stage="sft")
'sft step 3/48  loss 1.234  token accuracy 0.610  22.0 s/step  ETA 16m30s'
"""

from __future__ import annotations

import logging
import time
import warnings

from transformers import TrainerCallback

# (label, metrics.jsonl key, format): the few numbers worth a glance; the first key present of each label wins.
STEP_FIELDS = (
    ("reward", "reward", ".3f"),
    ("correct", "rewards/correct/mean", ".3f"),
    ("correct", "rewards/correct_pm1/mean", ".3f"),
    ("format", "rewards/format_soft/mean", ".3f"),
    ("format", "rewards/format/mean", ".3f"),
    ("length", "completions/mean_length", ".0f"),
    ("loss", "loss", ".3f"),
    ("token accuracy", "mean_token_accuracy", ".3f"),
    ("eval strict", "eval/strict_accuracy", ".3f"),
)


def setup_logging(main_process: bool = True) -> None:
    """Set every library's verbosity once (as open-r1's ``grpo.py`` does): warnings on the main process, errors
    elsewhere; no library progress bars (weights loading, dataset maps, "Writing model shards"); one upstream
    deprecation warning that fires every step filtered by its text."""
    import datasets
    import transformers

    level = logging.INFO if main_process else logging.ERROR
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING, force=True)
    logging.getLogger("grpo_math").setLevel(level)
    transformers.utils.logging.set_verbosity(logging.WARNING if main_process else logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity(logging.WARNING if main_process else logging.ERROR)
    datasets.disable_progress_bars()
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing; TRL (its config field and its trainer,
    # at every step) still uses the old names. Nothing a user can change: the fix belongs upstream.
    warnings.filterwarnings(
        "ignore", message=r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated", category=FutureWarning
    )


def step_line(logs: dict, step: int, max_steps: int, seconds_per_step: float | None, stage: str = "") -> str:
    """One short line for a logged step: the key numbers, seconds per step and the time left."""
    parts, seen = [f"{stage + ' ' if stage else ''}step {step}/{max_steps}"], set()
    for label, key, fmt in STEP_FIELDS:
        if label not in seen and isinstance(logs.get(key), (int, float)):
            parts.append(f"{label} {logs[key]:{fmt}}")
            seen.add(label)
    if seconds_per_step:
        parts.append(f"{seconds_per_step:.1f} s/step")
        parts.append(f"ETA {duration(seconds_per_step * (max_steps - step))}")
    return "  ".join(parts)


def duration(seconds: float) -> str:
    """``95`` -> ``'1m35s'``; ``3725`` -> ``'1h02m'``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Console(TrainerCallback):
    """Replaces transformers' ``ProgressCallback`` (which prints every log as a dict): a tqdm bar over the steps
    and one ``step_line`` per logged step, on the main process."""

    def __init__(self, stage: str = ""):
        self.stage, self.bar, self.start, self.first_step = stage, None, 0.0, 0

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                unit="step",
                dynamic_ncols=True,
                desc=self.stage or "train",
                leave=False,
            )
        self.start, self.first_step = time.monotonic(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs or "train_runtime" in logs:
            return
        done = state.global_step - self.first_step
        per_step = (time.monotonic() - self.start) / done if done > 0 else None
        self.bar.write(step_line(logs, state.global_step, state.max_steps, per_step, self.stage))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            took = time.monotonic() - self.start
            done = state.global_step - self.first_step
            print(f"{self.stage + ': ' if self.stage else ''}{done} steps in {duration(took)}")


def use_console(trainer, stage: str = "") -> None:
    """Swap the trainer's default printers (``ProgressCallback`` / ``PrinterCallback``) for ``Console``."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Console(stage))
