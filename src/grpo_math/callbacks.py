"""Training callbacks: the bad-step guard, the metrics file, the no-signal warning and in-training accuracy.

They are plain ``transformers.TrainerCallback``s, so they work with TRL's ``GRPOTrainer`` and ``SFTTrainer`` alike.

>>> guard = BadStepGuard("skip")
>>> guard.on_log(None, type("State", (), {"global_step": 3})(), None, logs={"loss": float("nan")})
>>> guard.skipped
[3]
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from transformers import TrainerCallback

from . import UserError
from .runfiles import METRICS_FILE

logger = logging.getLogger(__name__)


class MetricsFile(TrainerCallback):
    """Appends every log line to ``metrics.jsonl`` as ``{"step": N, ..., "elapsed_s": seconds since this process
    started training}`` (so seconds per step can be read off a run)."""

    start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            elapsed = round(time.monotonic() - self.start, 1) if self.start is not None else None
            with open(Path(args.output_dir) / METRICS_FILE, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs, "elapsed_s": elapsed}) + "\n")


class TrimFreedMemory(TrainerCallback):
    """Every ``every`` steps, the memory freed since goes back to the system (``allocator.trim_freed_memory``), so a
    CPU run that keeps freed memory for reuse (``allocator.reuse_freed_memory``) does not grow its heap run-long."""

    def __init__(self, every: int = 10):
        self.every = every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            from .allocator import trim_freed_memory

            trim_freed_memory()


class SignalWatch(TrainerCallback):
    """Warns once when GRPO has had no signal for ``patience`` logged steps in a row: every group's completions
    scored the same (TRL's ``frac_reward_zero_std`` >= ``threshold``), so every advantage, and the update, is 0."""

    def __init__(self, patience: int = 5, threshold: float = 0.95):
        self.patience, self.threshold, self.streak, self.warned = patience, threshold, 0, False

    def on_log(self, args, state, control, logs=None, **kwargs):
        frac = (logs or {}).get("frac_reward_zero_std")
        if frac is None:
            return
        self.streak = self.streak + 1 if frac >= self.threshold else 0
        if self.streak >= self.patience and not self.warned:
            self.warned = True
            logger.warning(
                "step %d: for %d logged steps, %.0f%%+ of groups had no reward variance, so GRPO learned nothing: "
                "add a cold start (--sft_examples), few-shot prompts (--num_few_shot), a softer reward "
                "(format_soft, steps), a higher --temperature or a larger --num_generations",
                state.global_step,
                self.streak,
                100 * self.threshold,
            )


class BadStepGuard(TrainerCallback):
    """Stops (or skips) steps with non-finite gradients and logs whose loss / grad norm explode.

    Non-finite gradients are caught before the optimizer applies them (the gradients are dropped, so AdamW leaves
    the weights alone); finite explosions are seen in the step's log line (pre-clipping ``grad_norm``, so the
    applied update was still clipped to ``max_grad_norm``). With ``stop`` the step's checkpoint is not saved.
    """

    def __init__(self, action: str = "stop", bad_loss: float = 1e4, bad_grad_norm: float = 1e4):
        self.action, self.bad_loss, self.bad_grad_norm = action, bad_loss, bad_grad_norm
        self.stopped, self.reason, self.skipped = 0, "", []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        import torch

        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads and not all(torch.isfinite(torch.stack(torch._foreach_norm(grads))).tolist()):
            model.zero_grad(set_to_none=True)  # AdamW skips parameters without gradients
            self._bad(state.global_step + 1, "gradients are NaN/inf", control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss, norm = (logs or {}).get("loss"), (logs or {}).get("grad_norm")
        if loss is not None and not (math.isfinite(loss) and abs(loss) <= self.bad_loss):
            self._bad(state.global_step, f"loss is {loss:.4g} (bad_loss={self.bad_loss:g})", control)
        elif norm is not None and not (math.isfinite(norm) and norm <= self.bad_grad_norm):
            self._bad(state.global_step, f"grad_norm is {norm:.4g} (bad_grad_norm={self.bad_grad_norm:g})", control)

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped == state.global_step:
            control.should_save = False  # the flow callback asked for a save at this step

    def _bad(self, step: int, reason: str, control) -> None:
        if self.action == "skip":
            self.skipped.append(step)
            logger.warning("step %d: %s; that update was dropped (on_bad_step: skip)", step, reason)
            return
        self.stopped, self.reason = self.stopped or step, self.reason or reason
        control.should_training_stop, control.should_save = True, False


class AccuracyCallback(TrainerCallback):
    """Evaluate the policy on held-out ``problems`` every ``every_steps`` optimizer steps during training.

    ``prompt`` has ``config.PromptSettings``' fields and ``sampling`` is an ``evaluate.Sampling``. Every metric is
    logged as ``eval/<metric>`` in the same log line as the step's training metrics (so it reaches metrics.jsonl,
    TensorBoard and trackio). Set ``callback.trainer = trainer`` after building a TRL trainer: the values are then
    queued in the trainer's metrics, which TRL averages into its next log call; without it they are added to the
    logs in ``on_log`` (seen by callbacks registered after this one). Sampling (temperature > 0) does not disturb
    the training random streams.
    """

    def __init__(self, problems, every_steps: int, prompt, sampling=None):
        from .evaluate import Sampling

        if every_steps <= 0:
            raise UserError(f"every_steps must be > 0, got {every_steps}")
        self.problems, self.every_steps = list(problems), every_steps
        self.prompt, self.sampling = prompt, sampling or Sampling()
        self.trainer, self.pending = None, {}

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        import torch

        from .evaluate import evaluate_model

        if state.global_step % self.every_steps:
            return control
        was_training = model.training
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            metrics, _ = evaluate_model(model, processing_class, self.problems, self.prompt, self.sampling)
        model.train(was_training)
        logged = {f"eval/{key}": value for key, value in metrics.items()}
        queue = getattr(self.trainer, "_metrics", None)  # TRL trainers: averaged into the next log call
        if queue is not None and "train" in queue:
            for key, value in logged.items():
                queue["train"][key].append(value)
        else:
            self.pending.update(logged)
        control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.pending and logs is not None:
            logs.update(self.pending)
            if state.log_history:
                state.log_history[-1].update(self.pending)
            self.pending = {}
