"""Configuration: dataclasses that map 1:1 to YAML recipe keys and CLI flags.

``grpo-math train`` parses three dataclasses with TRL's ``TrlParser`` (as open-r1 does): ``ScriptConfig``
(data, prompts and rewards; extends TRL's ``ScriptArguments``), ``GRPOMathConfig`` (extends TRL's ``GRPOConfig``:
every GRPO/Trainer field is a flag) and TRL's ``ModelConfig`` (model and LoRA). A recipe key, a flag and a
field share one name; the recipe sets defaults and flags override them.

>>> script, grpo, model = parse_train_args(["--model_name_or_path", "embedded", "--max_steps", "2"])
>>> (model.model_name_or_path, grpo.max_steps, grpo.beta, script.reward_funcs[0])
('embedded', 2, 0.02, 'correct')
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field

import yaml
from trl import GRPOConfig, ModelConfig, ScriptArguments, TrlParser

from . import OneLineErrors, UserError
from .models import accelerator_available, native_bf16, torchrun_env
from .prompts import PromptConfig
from .runfiles import yaml_error


@dataclass
class ScriptConfig(PromptConfig, ScriptArguments):
    """Data, prompt and reward settings (TRL's ``dataset_name`` / ``dataset_*_split`` are inherited)."""

    dataset_name: str = field(
        default="builtin",
        metadata={"help": "'builtin', a hub id (openai/gsm8k) or a folder with train.jsonl/test.jsonl."},
    )
    dataset_limit: int | None = field(default=None, metadata={"help": "Use only the first N training problems."})
    dataset_shuffle_seed: int | None = field(
        default=None, metadata={"help": "Shuffle problems with this seed before --dataset_limit."}
    )
    skip_bad_rows: bool = field(
        default=False, metadata={"help": "Skip (and count) rows without a parseable gold answer instead of failing."}
    )
    sft_examples: int = field(
        default=0,
        metadata={
            "help": "Cold start: SFT on the first N training solutions, rewritten into answer_format, before GRPO "
            "(which "
            "then uses the problems after them); 0 = no cold start."
        },
    )
    sft_extra_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Cold start: a second source (same forms as dataset_name) whose first sft_extra_examples training "
            "solutions join the cold start, e.g. GSM8K beside a gym task, so one start checkpoint answers both."
        },
    )
    sft_extra_examples: int = field(
        default=0,
        metadata={"help": "Cold start: how many solutions sft_extra_dataset adds (shuffled as dataset_name)."},
    )
    sft_epochs: float = field(default=1.0, metadata={"help": "Cold start: epochs over the sft_examples."})
    sft_learning_rate: float = field(
        default=5e-5, metadata={"help": "Cold start: AdamW learning rate (linear decay)."}
    )
    sft_batch_size: int = field(default=8, metadata={"help": "Cold start: sequences per optimizer step."})
    sft_keep_annotations: bool = field(
        default=False, metadata={"help": "Cold start: keep GSM8K's <<a*b=c>> calculator annotations in the solutions."}
    )

    def __post_init__(self):
        PromptConfig.__post_init__(self)
        if self.dataset_limit is not None and self.dataset_limit <= 0:
            raise UserError("dataset_limit must be > 0")
        if self.sft_examples < 0 or self.sft_epochs <= 0 or self.sft_learning_rate <= 0 or self.sft_batch_size < 1:
            raise UserError("sft_examples must be >= 0, sft_epochs and sft_learning_rate > 0, sft_batch_size >= 1")
        if self.sft_extra_examples < 0 or bool(self.sft_extra_dataset) != bool(self.sft_extra_examples):
            raise UserError("sft_extra_dataset and sft_extra_examples (> 0) go together: set both or neither")


@dataclass
class GRPOMathConfig(GRPOConfig):
    """TRL's ``GRPOConfig`` with this project's defaults and the few fields TRL lacks."""

    output_dir: str | None = field(
        default="runs/grpo", metadata={"help": "Run folder: checkpoints, metrics.jsonl, final model."}
    )
    learning_rate: float = field(default=5e-6, metadata={"help": "AdamW learning rate (the notebook's 5e-6)."})
    beta: float = field(
        default=0.02, metadata={"help": "KL coefficient (the notebook's 0.02; 0 skips the reference model)."}
    )
    num_generations: int | None = field(default=4, metadata={"help": "Completions per prompt (group size)."})
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Completions per device per step; a multiple of num_generations."}
    )
    max_completion_length: int | None = field(
        default=256, metadata={"help": "Maximum generated tokens per completion."}
    )
    max_prompt_length: int = field(
        default=512,
        metadata={
            "help": "Longest prompt allowed, in tokens; longer prompts are an error, never silently truncated. GSM8K "
            "needs "
            "288 (train) / 253 (test) with the default prompt and SmolLM2's tokenizer."
        },
    )
    log_completions: bool = field(
        default=True,
        metadata={
            "help": "Write sampled completions with their reward parts to output_dir/completions/*.parquet (TRL)."
        },
    )
    num_completions_to_print: int | None = field(
        default=0,
        metadata={
            "help": "Completions printed as a table at each logged step (TRL, needs rich); 0 = none, None = all. They"
            " are "
            "always in completions/*.parquet."
        },
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=50, metadata={"help": "Save a checkpoint every N steps."})
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; default: on where the GPU or CPU runs bf16 natively."}
    )
    eval_limit: int = field(
        default=0,
        metadata={
            "help": "Held-out problems (dataset_test_split, fixed order) scored every eval_steps as "
            "eval/strict_accuracy "
            "etc.; 0 = off."
        },
    )
    on_bad_step: str = field(
        default="stop",
        metadata={
            "help": "A step with NaN/inf gradients or a loss/grad_norm above the limits: 'stop' (keep the last good "
            "checkpoint, exit 2) or 'skip' (drop that update and go on)."
        },
    )
    bad_loss: float = field(
        default=1e4, metadata={"help": "|loss| above this counts as exploding (checked at every log step)."}
    )
    bad_grad_norm: float = field(
        default=1e4,
        metadata={"help": "Pre-clipping grad norm above this counts as exploding (checked at every log step)."},
    )
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in output_dir."})
    share_prompt: bool = field(
        default=True,
        metadata={
            "help": "Compute each prompt once per group of completions: one prefill whose KV cache the group's rows "
            "share, and one packed row per group in the log-prob forwards (rollouts.py, packing.py; same results as "
            "TRL's path)."
        },
    )
    stop_at_answer: bool = field(
        default=True,
        metadata={"help": "End a rollout once its answer closes (e.g. </answer>), with EOS; no tokens after it."},
    )
    bf16_rollouts: bool = field(
        default=True,
        metadata={
            "help": "With bf16 on and fp32 weights, generate with a bf16 copy of the policy refreshed after each "
            "update (TRL's transformers path generates with the fp32 weights); the sampler's log-probs go to TRL's "
            "importance-sampling correction (vllm_importance_sampling_*), on whenever bf16/fp16 is."
        },
    )
    vllm_importance_sampling_mode: str = field(
        default="token_truncate",
        metadata={
            "help": "TRL's correction of rollouts sampled by another numerical policy (vLLM, or here a bf16 sampler "
            "beside a mixed-precision loss): per-token ratios clipped at vllm_importance_sampling_clip_max "
            "(truncated importance sampling; TRL's default is sequence_mask)."
        },
    )

    def __post_init__(self):
        self.use_cpu, self.bf16 = cpu_and_bf16(self.use_cpu, self.bf16, self.fp16)
        self.check_batch_sizes()
        if self.on_bad_step not in ("stop", "skip"):
            raise UserError(f"on_bad_step must be 'stop' or 'skip', not '{self.on_bad_step}'")
        if self.eval_limit < 0:
            raise UserError("eval_limit must be >= 0")
        if self.eval_limit and not self.eval_steps:
            self.eval_steps = self.save_steps
        if self.max_prompt_length <= 0 or (self.max_completion_length is not None and self.max_completion_length <= 0):
            raise UserError("max_prompt_length and max_completion_length must be > 0")
        super().__post_init__()

    def check_batch_sizes(self) -> None:
        """Completions per optimizer step must fill whole groups of ``num_generations`` (checked before TRL's
        own check, whose message names its derived ``generation_batch_size``)."""
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_generations"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise UserError(f"{name} must be a positive integer, not {value!r}")
        if self.num_generations is not None and self.num_generations < 2:
            raise UserError("num_generations must be >= 2 (GRPO compares completions within a group)")
        processes = torchrun_env()[2]
        per_step = (
            self.per_device_train_batch_size
            * processes
            * (self.steps_per_generation or self.gradient_accumulation_steps)
        )
        g = self.num_generations or 8
        if self.generation_batch_size is None and per_step % g:
            fits = [n for n in range(2, per_step + 1) if per_step % n == 0]
            raise UserError(
                "per_device_train_batch_size x processes x gradient_accumulation_steps = "
                f"{self.per_device_train_batch_size} x {processes} x "
                f"{self.steps_per_generation or self.gradient_accumulation_steps} = {per_step} completions per "
                f"step is not a multiple of num_generations ({g}): set num_generations to one of {fits} or "
                f"per_device_train_batch_size to a multiple of {g}"
            )


class TrainParser(OneLineErrors, TrlParser):
    """TRL's parser (recipe YAML + flags) whose usage errors are one line and exit code 2."""


def cpu_and_bf16(use_cpu: bool, bf16: bool | None, fp16: bool = False) -> tuple[bool, bool]:
    """The one place a run's device and precision are chosen: ``(use_cpu, bf16)``.

    Without a GPU, ``use_cpu`` is always on: transformers refuses bf16 on a CPU without it, and accelerate only
    forms a gloo process group (torchrun on CPU) with it. ``bf16=None`` (the default) means bf16 where the
    hardware runs it natively (``models.native_bf16``: a bf16 GPU, or a CPU with AVX512-BF16/AMX), else fp32.

    >>> cpu_and_bf16(False, False)
    (True, False)
    """
    use_cpu = use_cpu or not accelerator_available()
    if bf16 is None:
        bf16 = not fp16 and native_bf16(use_cpu)
    return use_cpu, bf16


def parse_train_args(
    argv: list[str] | None = None, prog: str = "grpo-math train", extra: tuple = ()
) -> tuple[ScriptConfig, GRPOMathConfig, ModelConfig]:
    """Parse ``--config recipe.yaml`` plus flags into the three config dataclasses (then the ``extra`` ones)."""
    parser = TrainParser((ScriptConfig, GRPOMathConfig, ModelConfig, *extra), prog=prog)
    try:
        script, grpo, model, *rest = parser.parse_args_and_config(list(sys.argv[1:] if argv is None else argv))
    except FileNotFoundError as err:
        raise UserError(f"recipe not found: {err.filename}") from None
    except yaml.YAMLError as err:
        raise UserError(yaml_error(err)) from None
    except ValueError as err:  # unknown keys in a recipe or flags, wrong types
        message = str(err).splitlines()[0]
        unknown = re.search(
            r"(?:not used by the HfArgumentParser|Unknown arguments from config file): (\[.*?\])", message
        )
        if unknown:
            where = "recipe key" if "config file" in message else "flag"
            message = f"unknown {where}(s) {unknown.group(1)}; see {prog} --help for valid names"
        raise UserError(message) from None
    grpo.reward_weights = script.reward_weights_for(grpo.reward_weights)
    return (script, grpo, model, *rest)


def to_dict(*configs) -> dict:
    """The resolved settings of several dataclasses as one flat dict (what a recipe would hold)."""
    out = {}
    for config in configs:
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            value = getattr(value, "value", value)  # enums (str subclasses yaml cannot write)
            out[f.name] = value if type(value) in (str, int, float, bool, list, dict, type(None)) else str(value)
    return out
