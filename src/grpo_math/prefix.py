"""Each prompt computed once per group of completions (rollouts and log-prob forwards), and rollouts that stop at
the answer.

GRPO samples ``G`` completions of each prompt. TRL's transformers path feeds the prompt ``G`` times to
``generate`` and ``G`` times to every log-prob forward (the policy with gradients; the reference model or old policy
without). Here:

- ``generate_grouped`` prefills the prefix every prompt shares (few-shot examples) once, then each distinct prompt
  once, repeats the KV cache for the rows and decodes them together: the same tokens as plain ``generate`` (a
  test compares them). ``AnswerStop`` ends a row once its
  answer marker closes (``answers.answer_closed``), and ``cut`` gives it EOS there, so the batch ends when every
  row has answered, hit EOS or the limit.
- ``packed_logps`` packs groups into one row: the prefix their prompts share, each group's prompt without its last
  token, then for each completion a copy of that last token and the completion. A block-causal mask lets each
  completion see the shared prefix, its prompt and itself only, and each completion's positions continue its
  prompt's, so one forward over ``P + G(C + 1)`` tokens per group gives what ``G`` forwards over ``P + C`` tokens
  give, padding excluded (a test compares log-probs and gradients).
- Off-policy rollouts are corrected: where the loss forward runs in mixed precision (``bf16``/``fp16``), the sampler
  (the bf16 copy of ``bf16_rollouts``, or the fp32 weights) is not the policy being trained. ``SampledLogps`` keeps
  each sampled token's log-prob, and ``PrefixSharing`` hands them to TRL, which applies its truncated
  importance-sampling correction (``vllm_importance_sampling_*``, as for vLLM) and logs the mismatch
  (``sampling/sampling_logp_difference/*``). The EOS that ``cut`` appends after a stopped answer was never sampled:
  it stays in the completion (TRL counts the row as terminated) but out of the loss.

>>> runs([[1, 2], [1, 2], [3], [1, 2]])
[(0, 2), (2, 3), (3, 4)]
>>> cut([5, 6, 2, 2], eos_token_ids=[2], stop_length=None), cut([5, 6, 7, 2], eos_token_ids=[2], stop_length=2)
([5, 6, 2], [5, 6, 2])
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from . import UserError
from .answers import answer_closed

MASKED_ATTENTION = ("sdpa", "eager")  # attention implementations that take a custom 4D mask


def runs(rows: Sequence) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of equal consecutive rows: GRPO's groups (TRL's sampler keeps them together)."""
    spans: list[tuple[int, int]] = []
    for i, row in enumerate(rows):
        if spans and rows[spans[-1][0]] == row:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return spans


def cut(tokens: list[int], eos_token_ids: Sequence[int], stop_length: int | None) -> list[int]:
    """A generated row up to its first EOS (kept, as TRL keeps it), or up to where ``AnswerStop`` ended it, then
    EOS: the row ends as if the model had closed it, so TRL counts it as terminated (not clipped) and the policy
    learns to stop after its answer (at the cost of that one token not being sampled)."""
    end = len(tokens) if stop_length is None else min(stop_length, len(tokens))
    for i, token in enumerate(tokens[:end]):
        if token in eos_token_ids:
            return tokens[: i + 1]
    return tokens[:end] + ([eos_token_ids[0]] if stop_length is not None else [])


class AnswerStop(StoppingCriteria):
    """Ends a row of ``generate`` once its completion holds a closed answer in ``answer_format``.

    ``stopped[row]`` is then the completion's length in tokens, the closing token included. Only a row whose new
    token could close a marker (one holding ``>``, ``}`` or a newline: a table built once per tokenizer) is decoded,
    so a step costs one small lookup on the device.
    """

    TRIGGERS = {"tags": ">", "boxed": "}", "hash": "\n"}

    def __init__(
        self, tokenizer, answer_format: str, prompt_length: int, ended_ids: Sequence[int], already: Sequence[int] = ()
    ):
        self.tokenizer, self.answer_format, self.start = tokenizer, answer_format, prompt_length
        self.triggers, self.ended = _trigger_tokens(tokenizer, self.TRIGGERS[answer_format]), set(ended_ids)
        self.already = list(already)  # per row: completion tokens the prompt already ends with (a continued row)
        self.stopped: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        last = input_ids[:, -1]
        table = self.triggers = self.triggers.to(last.device)
        known = last < table.shape[0]  # a model's vocabulary can be larger than its tokenizer's
        for row in (known & table[last.clamp(max=table.shape[0] - 1)]).nonzero().flatten().tolist():
            if row not in self.stopped and int(last[row]) not in self.ended:
                begin = self.start - (self.already[row] if self.already else 0)
                text = self.tokenizer.decode(input_ids[row, begin:].tolist(), skip_special_tokens=True)
                if answer_closed(text, self.answer_format):
                    self.stopped[row] = input_ids.shape[1] - self.start
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done[list(self.stopped)] = True
        return done


@functools.lru_cache(maxsize=8)
def _trigger_tokens(tokenizer, trigger: str) -> torch.Tensor:
    """Which token ids decode to text holding ``trigger``."""
    return torch.tensor([trigger in piece for piece in tokenizer.batch_decode([[i] for i in range(len(tokenizer))])])


class SampledLogps(LogitsProcessor):
    """Records each sampled token's log-prob under the distribution it was drawn from: ``log_softmax(logits / T)``
    (custom processors run before ``generate``'s temperature warper, so it divides by ``temperature`` itself; exact
    without top-p / top-k / min-p truncation, which ``PrefixSharing`` checks). Keeps one step's log-probs: O(rows x
    vocabulary) memory, where ``output_scores`` keeps every step's."""

    def __init__(self, temperature: float):
        self.temperature, self.previous, self.steps = temperature, None, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids)
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _take(self, input_ids: torch.Tensor) -> None:
        if self.previous is not None:  # the token just appended was drawn from the previous step's distribution
            self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
            self.previous = None

    def result(self, sequences: torch.Tensor) -> torch.Tensor:
        """(rows, generated tokens) log-probs, once ``generate`` has returned ``sequences``."""
        self._take(sequences)
        return torch.stack(self.steps, dim=1) if self.steps else sequences.new_zeros((len(sequences), 0), dtype=float)


def _cache_keyword(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every row shares (a few-shot block, a system prompt), leaving each row one of its own.

    >>> common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]])
    2
    """
    first, n = rows[0], 0
    while n < min(len(r) for r in rows) - 1 and all(r[n] == first[n] for r in rows):
        n += 1
    return n


def pad_rows(rows: Sequence[Sequence[int]], pad_token_id: int, device, shared: int = 0):
    """``(input_ids, attention_mask)``: the ``shared`` leading tokens (common to every row) first, then each row's own
    tokens right-aligned after its padding, so the shared part sits at the same positions in every row and every
    row ends at the last column. ``shared=0`` is plain left padding."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :shared], mask[i, :shared] = torch.tensor(row[:shared], dtype=torch.long), 1
        own = row[shared:]
        if own:
            ids[i, width - len(own) :], mask[i, width - len(own) :] = torch.tensor(own), 1
    return ids.to(device), mask.to(device)


def _prefill(model, cache, ids, mask, rows: list[int], start: int, end: int) -> None:
    """Run columns ``start:end`` of ``rows`` into ``cache``, numbered as ``generate`` numbers them."""
    positions = (mask[rows, :end].cumsum(-1) - 1).clamp(min=0)
    model(
        input_ids=ids[rows, start:end],
        attention_mask=mask[rows, :end],
        position_ids=positions[:, start:end],
        use_cache=True,
        logits_to_keep=1,
        **{_cache_keyword(model): cache},
    )


@torch.no_grad()
def generate_grouped(
    model,
    prompts: Sequence[Sequence[int]],
    generation_config,
    pad_token_id: int,
    eos_token_ids: Sequence[int],
    share_prompt: bool = True,
    stop: tuple | None = None,
    tokenizer=None,
    already: Sequence[int] = (),
    sampler_logps: bool = False,
) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """Completion token ids for each prompt row (token ids), in order; with ``sampler_logps``, also each token's
    log-prob under the sampler (``SampledLogps``), NaN for an EOS that ``cut`` appended (never sampled).

    With ``share_prompt``, the tokens every row begins with (``common_prefix``: few-shot examples, a system
    prompt) are prefilled once for the batch, then each group of equal prompts next to each other once more, up to
    its last token; the KV cache is repeated for the rows and ``generate`` continues from it. ``stop`` is
    ``(tokenizer, answer_format)`` to end each row at its closed answer (``AnswerStop``); ``tokenizer`` goes to
    ``generate``, which needs it for ``generation_config.stop_strings``. ``already`` (per row): how many of the
    prompt's last tokens are completion already (a row continued after a first round), for the answer check.
    """
    rows = [list(p) for p in prompts]
    shared = common_prefix(rows) if share_prompt and len(rows) > 1 else 0
    ids, mask = pad_rows(rows, pad_token_id, model.device, shared)
    groups, cache, kwargs = runs(rows) if share_prompt else [(i, i + 1) for i in range(len(rows))], None, {}
    select = torch.tensor  # cache rows to keep, by index
    if shared:
        cache = DynamicCache(config=model.config)
        _prefill(model, cache, ids, mask, [0], 0, shared)
    if len(groups) < len(rows) and ids.shape[1] - 1 > shared:
        cache = cache or DynamicCache(config=model.config)
        if shared:
            cache.batch_select_indices(select([0] * len(groups), device=ids.device))
        _prefill(model, cache, ids, mask, [start for start, _ in groups], shared, ids.shape[1] - 1)
        repeat = [g for g, (start, end) in enumerate(groups) for _ in range(start, end)]
        cache.batch_select_indices(select(repeat, device=ids.device))
    elif shared:
        cache.batch_select_indices(select([0] * len(rows), device=ids.device))
    if cache is not None:
        kwargs[_cache_keyword(model)] = cache
    criterion = None
    if tokenizer is not None:
        kwargs["tokenizer"] = tokenizer
    if stop is not None:
        criterion = AnswerStop(stop[0], stop[1], ids.shape[1], [*eos_token_ids, pad_token_id], already)
        kwargs["stopping_criteria"] = StoppingCriteriaList([criterion])
    recorder = None
    if sampler_logps:
        recorder = SampledLogps(generation_config.temperature if generation_config.do_sample else 1.0)
        kwargs["logits_processor"] = LogitsProcessorList([recorder])
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=generation_config, **kwargs)
    stopped = criterion.stopped if criterion else {}
    generated = out[:, ids.shape[1] :].tolist()
    rows = [cut(row, eos_token_ids, stopped.get(i)) for i, row in enumerate(generated)]
    if recorder is None:
        return rows
    logps = recorder.result(out).tolist()
    forced = [
        stopped.get(i) is not None and len(row) > min(stopped[i], len(generated[i])) for i, row in enumerate(rows)
    ]
    return rows, [
        lp[: len(row) - 1] + [float("nan")] if f else lp[: len(row)] for lp, row, f in zip(logps, rows, forced)
    ]


def _pack(prompts, completions, groups) -> tuple[list[int], ...]:
    """One packed row for ``groups``: the prefix their prompts share, then each group's own prompt tokens but the
    last, then per completion that last token and the completion. Returns its tokens, positions, group (-1 for
    the shared prefix) and member (0 for the group's prompt) of each token, labels, and for each completion where
    its labels start, how many, and its batch row."""
    shared = common_prefix([prompts[start] for start, _ in groups]) if len(groups) > 1 else 0
    tok, pos = list(prompts[groups[0][0]][:shared]), list(range(shared))
    group, member, lab, places = [-1] * shared, [0] * shared, [-100] * shared, []
    for g, (start, end) in enumerate(groups):
        prompt, n = prompts[start], len(prompts[start]) - 1
        tok += prompt[shared:n]
        pos += range(shared, n)
        group, member, lab = group + [g] * (n - shared), member + [0] * (n - shared), lab + [-100] * (n - shared)
        for k, i in enumerate(range(start, end), start=1):
            c = completions[i]
            places.append((len(tok), len(c), i))
            tok += prompt[-1:] + c
            pos += range(n, n + len(c) + 1)
            group, member, lab = group + [g] * (len(c) + 1), member + [k] * (len(c) + 1), lab + c + [-100]
    return tok, pos, group, member, lab, places


def _block_mask(group: torch.Tensor, member: torch.Tensor, additive_dtype=None) -> torch.Tensor:
    """(1, 1, T, T) mask, causal, where a token sees the shared prefix, its group's prompt, and its own completion.
    Boolean (True = attend), or additive in ``additive_dtype`` for eager attention."""
    index = torch.arange(group.shape[0], device=group.device)
    same_group = group[:, None] == group[None, :]
    visible = (group[None, :] == -1) | (same_group & ((member[None, :] == 0) | (member[:, None] == member[None, :])))
    allowed = (index[:, None] >= index[None, :]) & visible
    if additive_dtype is not None:
        allowed = torch.zeros(allowed.shape, dtype=additive_dtype, device=group.device).masked_fill(
            ~allowed, torch.finfo(additive_dtype).min
        )
    return allowed[None, None]


@contextlib.contextmanager
def _labelled_positions_only():
    """TRL's fused LM head scores only the labelled positions on Triton devices, and every position elsewhere (to
    keep tile shapes fixed for compilers such as Neuron's: ``trl.trainer.utils._use_triton`` decides). In eager CPU
    mode that only wastes work: a packed row's prompt positions would go through the 49k-wide head for nothing.
    Within this block the head scores labelled positions only; its tiles stay torch ops on a CPU."""
    from trl.trainer import utils

    original = getattr(utils, "_use_triton", None)
    if original is None:  # another TRL: keep its behaviour
        yield
        return
    utils._use_triton = lambda device: True
    try:
        yield
    finally:
        utils._use_triton = original


def packed_logps(
    model,
    input_ids,
    attention_mask,
    logits_to_keep: int,
    batch_size: int | None = None,
    compute_entropy: bool = False,
    mask_dtype=None,
):
    """TRL's ``(log-probs, entropies)`` of the last ``logits_to_keep`` tokens (0 on padding), from packed rows
    (``_pack``: each shared prefix and each prompt computed once). ``model`` has TRL's fused LM head
    (``trl.trainer.utils.add_fused_lm_head``); a forward holds about ``batch_size`` completions. The mask is boolean
    (sdpa), or additive in ``mask_dtype`` (eager). ``None`` when a completion mask is not a prefix of its row (then
    TRL's own path applies)."""
    width = logits_to_keep
    prompt_mask, completion_mask = attention_mask[:, :-width].bool(), attention_mask[:, -width:].bool()
    lengths = completion_mask.sum(1)
    if not torch.equal(completion_mask, torch.arange(width, device=lengths.device)[None] < lengths[:, None]):
        return None
    prompts = [row[m].tolist() for row, m in zip(input_ids[:, :-width], prompt_mask)]
    completions = [row[: int(n)].tolist() for row, n in zip(input_ids[:, -width:], lengths)]
    groups, chunks = runs(prompts), [[]]
    for group in groups:
        if chunks[-1] and sum(e - s for s, e in chunks[-1]) + group[1] - group[0] > (batch_size or len(prompts)):
            chunks.append([])
        chunks[-1].append(group)
    device = input_ids.device
    logps, entropies = [None] * len(prompts), [None] * len(prompts)
    for chunk in chunks:
        tokens, positions, group, member, labels, places = _pack(prompts, completions, chunk)

        def tensor(values):
            return torch.tensor(values, device=device)

        with _labelled_positions_only():
            out = model(
                input_ids=tensor([tokens]),
                attention_mask=_block_mask(tensor(group), tensor(member), mask_dtype),
                position_ids=tensor([positions]),
                shift_labels=tensor([labels]),
                fused_lm_head=True,
            )
        for offset, n, i in places:
            logps[i] = out.log_probs[0, offset : offset + n]
            if compute_entropy:
                entropies[i] = out.entropy[0, offset : offset + n]

    def stacked(parts):
        return torch.stack([torch.nn.functional.pad(p, (0, width - p.shape[0])) for p in parts])

    return stacked(logps), stacked(entropies) if compute_entropy else None


class PrefixSharing:
    """``GRPOTrainer`` methods (a mixin) that route TRL's transformers rollouts and text-only log-prob forwards
    through this module, as ``share_prompt``, ``stop_at_answer`` and ``bf16_rollouts`` ask, and correct the rollouts
    that another precision sampled (``sampler_correction``). vLLM, continuous batching, tools, images and MoE
    auxiliary losses keep TRL's own paths. ``answer_format`` is set by the owner."""

    answer_format: str | None = None
    _rollout = None
    _rollout_step = None
    sampler_correction = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampler_correction = self._corrects_sampler()
        if self.sampler_correction:
            # TRL applies its importance-sampling correction (and logs the sampler mismatch) when ``use_vllm`` is
            # set; past ``__init__`` that attribute gates nothing else on this path (rollouts check args.use_vllm).
            self.use_vllm = True

    def _corrects_sampler(self) -> bool:
        """Whether the rollouts need TRL's importance-sampling correction: the loss forward runs in mixed precision,
        so the sampler is another numerical policy; ``vllm_importance_sampling_correction`` (TRL's flag) on; this
        module generates (no vLLM, continuous batching or tools); and the sampling distribution is temperature
        only (``SampledLogps`` is exact there)."""
        args, config = self.args, self.generation_config
        return bool(
            (args.bf16 or args.fp16)
            and args.vllm_importance_sampling_correction
            and not (args.use_vllm or self.use_transformers_continuous_batching or self.tools or self.rollout_func)
            and config.do_sample
            and config.top_p in (None, 1.0)
            and not config.top_k
            and config.min_p is None
        )

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if (
            self.args.use_vllm
            or self.use_transformers_continuous_batching
            or images
            or multimodal_fields
            or self.tools
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

    def _generate(self, prompts):
        """TRL's ``_generate``, with an EOS that ``cut`` appended (NaN sampler log-prob) kept out of the loss by TRL's
        token mask for tokens the policy did not sample (``tool_mask``)."""
        prompt_ids, completion_ids, tool_mask, *rest = super()._generate(prompts)
        logps = rest[1]
        if tool_mask is None and logps is not None and not self.args.use_vllm:
            tool_mask = [[0 if lp != lp else 1 for lp in row] for row in logps]  # lp != lp: NaN
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
        config = self.accelerator.unwrap_model(model).config
        attention = getattr(config, "_attn_implementation", None)
        text_only = all(v is None or v is False for v in extra.values())
        # On a GPU, flash attention cannot take the block mask: the packed forward measured slower there (README)
        if self.args.share_prompt and input_ids.device.type == "cpu" and attention in MASKED_ATTENTION and text_only:
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
