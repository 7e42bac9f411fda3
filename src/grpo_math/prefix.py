"""The fast GRPO step, plugged into TRL's ``GRPOTrainer``: ``PrefixSharing`` routes TRL's transformers rollouts
through ``rollouts.generate_grouped`` (prompt once per group, finished rows dropped, stop at the answer, a bf16
sampler) and its text-only log-prob forwards through ``packing.packed_logps``, and corrects the rollouts another
precision sampled.

Off-policy rollouts: where the loss forward runs in mixed precision (``bf16``/``fp16``), the sampler (the bf16
copy of ``bf16_rollouts``, or the fp32 weights) is not the policy being trained. ``rollouts.Sampler`` keeps
each sampled token's log-prob, and ``PrefixSharing`` hands them to TRL, which applies its truncated
importance-sampling correction (``vllm_importance_sampling_*``, as for vLLM) and logs the mismatch
(``sampling/sampling_logp_difference/*``). On policy (one update per generation, TRL's own test), the old policy
is the policy the loss forward runs: ``PrefixSharing`` then computes the correction from that forward's detached
log-probs instead of TRL's extra forward without gradients (``correct_in_loss``; same ratios, one forward fewer per
micro-batch; the metrics are then logged per micro-batch, not per generation batch). The EOS that
``generate_grouped`` appends after a closed answer was never sampled: it stays in the completion (TRL counts the
row as terminated) but out of the loss. pyproject pins the TRL minor release these overrides were written for;
tests check they run in a real step.
"""

from __future__ import annotations

import copy
import math

import torch

from . import UserError
from .packing import MASKED_ATTENTION, packed_logps, sliding_window
from .rollouts import decodable, generate_grouped


class PrefixSharing:
    """``GRPOTrainer`` methods (a mixin) that route TRL's transformers rollouts and text-only log-prob forwards
    through this module, as ``share_prompt``, ``stop_at_answer`` and ``bf16_rollouts`` ask, and correct the rollouts
    that another precision sampled (``sampler_correction``). vLLM, continuous batching, tools, images and MoE
    auxiliary losses keep TRL's own paths. ``answer_format`` is set by the owner."""

    answer_format: str | None = None
    _rollout = None
    _rollout_step = None
    sampler_correction = False
    correct_in_loss = False
    _loss_inputs = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampler_correction = self._corrects_sampler()
        if self.sampler_correction:
            # TRL applies its importance-sampling correction (and logs the sampler mismatch) when ``use_vllm`` is
            # set; past ``__init__`` that attribute gates nothing else on this path (rollouts check args.use_vllm).
            self.use_vllm = True
        self.correct_in_loss = self.sampler_correction and self._on_policy()

    def _corrects_sampler(self) -> bool:
        """Whether the rollouts need TRL's importance-sampling correction: the loss forward runs in mixed precision,
        so the sampler is another numerical policy; ``vllm_importance_sampling_correction`` (TRL's flag) on; this
        module generates (no vLLM, continuous batching or tools, a config ``generate_grouped`` takes); and the
        sampling distribution is temperature only (TRL's policy log-probs know nothing of top-p / top-k / min-p)."""
        args = self.args
        if args.use_vllm or self.use_transformers_continuous_batching or self.tools or self.rollout_func:
            return False  # TRL's own rollouts (with vLLM TRL builds no ``generation_config``)
        config = self.generation_config
        return bool(
            (args.bf16 or args.fp16)
            and args.vllm_importance_sampling_correction
            and decodable(config)
            and config.do_sample
            and config.top_p in (None, 1.0)
            and not config.top_k
            and config.min_p is None
        )

    def _on_policy(self) -> bool:
        """TRL's test for rollouts the current weights sampled (no old-policy log-probs needed without a sampler
        correction): one update per generation, every generation used before the optimizer steps."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return self.num_iterations == 1 and self.args.gradient_accumulation_steps % generate_every == 0

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if (
            self.args.use_vllm
            or self.use_transformers_continuous_batching
            or images
            or multimodal_fields
            or self.tools
            or not decodable(self.generation_config)
        ):
            if self.sampler_correction:
                raise UserError("images need TRL's rollouts: set --vllm_importance_sampling_correction false")
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        from trl.extras.profiling import profiling_context
        from trl.models import unwrap_model_for_generation

        args = self.args
        stop = (self._tokenizer, self.answer_format) if args.stop_at_answer and self.answer_format else None
        with (
            profiling_context(self, "transformers.generate"),
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
            ) as model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            ids, logps = generate_grouped(
                self._rollout_model(model),
                prompt_ids,
                self.generation_config,
                self._tokenizer.pad_token_id,
                self.eos_token_ids,
                args.share_prompt,
                stop,
                sampler_logps=True,
            )
        return ids, logps

    def _generate_and_score_completions(self, inputs):
        """TRL's, without its old-policy forward where ``correct_in_loss`` (``use_vllm`` gates that forward, the
        correction and its metrics there, and nothing else on this path: rollouts check ``args.use_vllm``)."""
        if not self.correct_in_loss:
            return super()._generate_and_score_completions(inputs)
        self.use_vllm = False
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self.use_vllm = True

    def _compute_loss(self, model, inputs):
        """TRL's loss; where ``correct_in_loss``, its first forward (the policy's) also sets the importance-sampling
        ratio TRL reads after it (``_correct``)."""
        self._loss_inputs = inputs if self.correct_in_loss and "importance_sampling_ratio" not in inputs else None
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._loss_inputs = None

    def _correct(self, inputs, logps):
        """TRL's importance-sampling ratio and its metrics, as ``_generate_and_score_completions`` computes them, with
        the loss forward's detached log-probs as the old policy's."""
        mode, lo, hi = (
            self.vllm_importance_sampling_mode,
            self.vllm_importance_sampling_clip_min,
            self.vllm_importance_sampling_clip_max,
        )
        mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
        sampled = inputs["sampling_per_token_logps"]
        gap = logps.detach() - sampled
        diff = torch.nan_to_num(gap * mask, nan=0.0)
        sequence = mode.startswith("sequence")
        ratio = torch.exp(diff.sum(-1, keepdim=True) if sequence else diff)
        if mode.endswith("truncate"):
            ratio = ratio.clamp(lo, hi)
        else:
            lo, hi = -math.inf if lo is None else lo, math.inf if hi is None else hi
            ratio = ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
        inputs["importance_sampling_ratio"] = ratio
        gather, metrics = self.accelerator.gather, self._metrics["train" if self.model.training else "eval"]
        delta = gap.abs()[mask.bool() & ~sampled.isnan()]
        delta = delta if delta.numel() else torch.zeros(1, device=logps.device)
        metrics["sampling/sampling_logp_difference/mean"].append(gather(delta.mean()).mean().item())
        metrics["sampling/sampling_logp_difference/max"].append(gather(delta.max()).max().item())
        flat = ratio.flatten() if sequence else ratio[mask.bool()]
        flat = flat if flat.numel() else torch.zeros(1, device=logps.device)
        metrics["sampling/importance_sampling_ratio/min"].append(gather(flat.min()).min().item())
        metrics["sampling/importance_sampling_ratio/mean"].append(gather(flat.mean()).mean().item())
        metrics["sampling/importance_sampling_ratio/max"].append(gather(flat.max()).max().item())

    def _generate(self, prompts):
        """TRL's ``_generate``, with an EOS appended after a closed answer (NaN sampler log-prob) kept out of the loss
        by TRL's token mask for tokens the policy did not sample (``tool_mask``)."""
        prompt_ids, completion_ids, tool_mask, *rest = super()._generate(prompts)
        logps = rest[1]
        if tool_mask is None and logps is not None and not self.args.use_vllm:
            tool_mask = [[0 if math.isnan(lp) else 1 for lp in row] for row in logps]
        return (prompt_ids, completion_ids, tool_mask, *rest)

    def _rollout_model(self, model):
        """``model``, or its bf16 copy (``bf16_rollouts``) refreshed when the weights have changed since."""
        fp32 = next(model.parameters()).dtype == torch.float32
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled or hasattr(model, "peft_config")
        if not (self.args.bf16 and self.args.bf16_rollouts and fp32) or sharded:
            return model
        if self._rollout is None:
            self._rollout = copy.deepcopy(model).eval().requires_grad_(False)
            self._rollout.__dict__.pop("forward", None)  # TRL's fused head: a closure over the original model
            for p in self._rollout.parameters():
                p.data = p.data.to(torch.bfloat16)  # buffers (rotary frequencies) stay fp32, as when loaded in bf16
        if self._rollout_step != self.state.global_step:
            for mine, theirs in zip(self._rollout.parameters(), model.parameters(), strict=True):
                mine.data.copy_(theirs.data)
            self._rollout_step = self.state.global_step
        return self._rollout

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, **extra
    ):
        out = self._logps(model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, **extra)
        if self._loss_inputs is not None:
            inputs, self._loss_inputs = self._loss_inputs, None
            self._correct(inputs, out[0])
        return out

    def _logps(self, model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, **extra):
        config = self.accelerator.unwrap_model(model).config
        attention = getattr(config, "_attn_implementation", None)
        text_only = all(v is None or v is False for v in extra.values())
        window = sliding_window(config)  # a 4D mask replaces the window: packing is exact only where it never bites
        fits = window is None or window >= int(attention_mask.sum())
        # On a GPU, flash attention cannot take the block mask: the packed forward measured slower there (README)
        on_cpu = input_ids.device.type == "cpu"
        if self.args.share_prompt and on_cpu and attention in MASKED_ATTENTION and text_only and fits:
            mask_dtype = torch.float32 if attention == "eager" else None  # eager adds the mask to its scores
            with self.accelerator.autocast():
                out = packed_logps(
                    model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, mask_dtype
                )
            if out is not None:
                return (*out, None)
        return super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, **extra
        )
