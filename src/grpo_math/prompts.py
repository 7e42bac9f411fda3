"""The prompt and reward settings every command shares: ``PromptConfig`` (recipe keys and flags of ``train``) and
``PromptSettings``, what ``eval``, ``ask``, ``score`` and ``filter`` read. Apart from ``config.py`` so that those
commands never import TRL (seconds of start-up): a test holds it.

>>> PromptSettings(reward_preset="correctness").reward_weights
[1.0, 0.1]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from . import UserError
from .answers import ANSWER_FORMATS, check_answer_format
from .data import SYSTEM_PROMPT
from .rewards import PRESETS, REWARDS
from .runfiles import CONFIG_FILE, read_config


@dataclass
class PromptConfig:
    """The prompt and the rewards: the settings train, eval, ask and score share (recipe keys of the same names)."""

    answer_format: str = field(
        default="tags", metadata={"help": f"How the final answer is asked for: {', '.join(ANSWER_FORMATS)}."}
    )
    system_prompt: str | None = field(default=SYSTEM_PROMPT, metadata={"help": "System message ('' for none)."})
    num_few_shot: int = field(
        default=0, metadata={"help": "Worked examples (from the builtin set) put before each question."}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: list(PRESETS["default"]), metadata={"help": f"Reward names: {', '.join(REWARDS)}."}
    )
    reward_preset: str | None = field(
        default=None,
        metadata={
            "help": f"Named reward set with weights: {', '.join(PRESETS)}; sets reward_funcs and reward_weights."
        },
    )

    def __post_init__(self):
        if isinstance(self.reward_funcs, str):  # `reward_funcs: correct` in a recipe
            self.reward_funcs = self.reward_funcs.split()
        check_answer_format(self.answer_format)
        if not isinstance(self.num_few_shot, int) or self.num_few_shot < 0:
            raise UserError(f"num_few_shot must be an integer >= 0, not {self.num_few_shot!r}")
        unknown = [name for name in self.reward_funcs if name not in REWARDS]
        if unknown:
            raise UserError(f"unknown reward '{unknown[0]}'; valid: {', '.join(REWARDS)}")
        if self.reward_preset is not None and self.reward_preset not in PRESETS:
            raise UserError(f"unknown reward_preset '{self.reward_preset}'; valid: {', '.join(PRESETS)}")
        if self.reward_preset:
            self.reward_funcs = list(PRESETS[self.reward_preset])
        self.system_prompt = self.system_prompt or None

    def reward_weights_for(self, weights: list[float] | None) -> list[float] | None:
        """The weights that go with ``reward_funcs``: the preset's, the given ones, or the default preset's
        for a subset of it (None = TRL's equal weights); a length mismatch is an error."""
        if self.reward_preset:
            weights = list(PRESETS[self.reward_preset].values())
        elif weights is None and set(self.reward_funcs) <= set(PRESETS["default"]):
            weights = [PRESETS["default"][name] for name in self.reward_funcs]
        if weights is not None and len(weights) != len(self.reward_funcs):
            raise UserError(f"reward_weights has {len(weights)} values but reward_funcs has {len(self.reward_funcs)}")
        return weights


@dataclass
class PromptSettings(PromptConfig):
    """What ``eval``, ``ask`` and ``score`` read: a recipe's prompt and reward keys, or those saved with a trained
    model, and nothing of the trainer's settings (no ``TrainingArguments`` is built).

    >>> s = PromptSettings.load(None, None)
    >>> (s.answer_format, s.reward_funcs[0], s.reward_weights[0], s.source)
    ('tags', 'correct', 1.0, 'defaults')
    """

    reward_weights: list[float] | None = None
    source: str = "defaults"
    lm_eval_shots: list | None = None  # eval --lm_eval_prompt: lm-eval's gsm8k prompt with these worked examples

    def __post_init__(self):
        super().__post_init__()
        self.reward_weights = self.reward_weights_for(self.reward_weights)

    @classmethod
    def load(cls, recipe: str | None, model: str | None) -> PromptSettings:
        """The recipe's settings (``--config``), else those saved with a trained model (its
        ``grpo_math_config.yaml``), else the defaults."""
        if recipe:
            return cls.from_dict(read_config(recipe), recipe)
        saved = Path(model).expanduser() / CONFIG_FILE if model else None
        if saved is not None and saved.is_file():
            config = read_config(str(saved))
            return cls.from_dict({k: v for k, v in config.items() if k in SAVED_PROMPT_KEYS}, str(saved))
        return cls()

    @classmethod
    def from_dict(cls, config: dict, source: str) -> PromptSettings:
        names = {f.name for f in dataclasses.fields(cls)} - {"source", "lm_eval_shots"}
        return cls(**{k: v for k, v in config.items() if k in names}, source=source)

    @classmethod
    def prompt_of(cls, config: PromptConfig) -> PromptSettings:
        """The prompt of ``config`` (settings, or a recipe's ``ScriptConfig``) without reward parts: what sampling
        for pass rates, RFT and the in-training accuracy need (scoring correctness only is faster)."""
        source = getattr(config, "source", "recipe")
        return cls(config.answer_format, config.system_prompt, config.num_few_shot, [], source=source)

    def as_dict(self) -> dict:
        """The settings written into an evaluation's ``results.json``."""
        return {key: getattr(self, key) for key in SAVED_PROMPT_KEYS}


SAVED_PROMPT_KEYS = ("answer_format", "system_prompt", "num_few_shot", "reward_funcs", "reward_weights")
