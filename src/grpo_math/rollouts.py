"""Rollouts: each prompt prefilled once per group of samples, a decode loop that drops rows as they end, and the
sampler's log-probs.

GRPO samples ``G`` completions of each prompt; TRL's transformers path feeds the prompt ``G`` times to ``generate``.
``generate_grouped`` prefills the prefix every prompt shares (few-shot examples, a system prompt) once, then each
distinct prompt once, repeats the KV cache for the rows and decodes them together: greedy, the same tokens as plain
``generate`` (a test compares them; in fp32 the products round in oneDNN's order, ``packed_linears``). A row
leaves the batch as soon as it ends: at EOS, at a stop string, or once its answer closes (``AnswerStop``, then EOS
is appended), so no step is spent on finished rows. ``Sampler`` draws with transformers' warpers and keeps each
drawn token's log-prob for TRL's importance-sampling correction (``prefix.PrefixSharing``); the EOS appended after
an answer was never sampled and gets NaN. ``models.generate`` (eval, ``filter``, ``rft``) decodes through the same
function. Where a generation config asks for more than this loop does (``decodable``), TRL's own ``generate`` path
runs.

>>> runs([[1, 2], [1, 2], [3], [1, 2]])
[(0, 2), (2, 3), (3, 4)]
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .answers import answer_closed


def runs(rows: Sequence) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of equal consecutive rows: GRPO's groups (TRL's sampler keeps them together)."""
    spans: list[tuple[int, int]] = []
    for i, row in enumerate(rows):
        if spans and rows[spans[-1][0]] == row:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return spans


class AnswerStop:
    """Whether a completion (token ids) is done: ``"answer"`` once it holds a closed answer in ``answer_format``
    (``answers.answer_closed``), ``"string"`` once it holds one of ``stop_strings``, else ``None``.

    Only a completion whose last token could close one (its text holds ``>``, ``}`` or a newline for the answer, a
    stop string's last character for the strings: a table built once per tokenizer) is decoded, so most tokens cost
    one list lookup.
    """

    TRIGGERS = {"tags": ">", "boxed": "}", "hash": "\n"}

    def __init__(self, tokenizer, answer_format: str | None = None, stop_strings: Sequence[str] = ()):
        self.tokenizer, self.answer_format, self.stop_strings = tokenizer, answer_format, tuple(stop_strings)
        chars = (self.TRIGGERS[answer_format] if answer_format else "") + "".join(s[-1] for s in self.stop_strings)
        self.triggers = _trigger_tokens(tokenizer, "".join(sorted(set(chars))))

    def __call__(self, tokens: Sequence[int]) -> str | None:
        if not tokens or tokens[-1] >= len(self.triggers) or not self.triggers[tokens[-1]]:
            return None  # a model's vocabulary can be larger than its tokenizer's
        if self.answer_format:
            if answer_closed(self.tokenizer.decode(tokens, skip_special_tokens=True), self.answer_format):
                return "answer"
        if self.stop_strings:
            text = self.tokenizer.decode(tokens)
            if any(s in text for s in self.stop_strings):
                return "string"
        return None


@functools.lru_cache(maxsize=8)
def _trigger_tokens(tokenizer, chars: str) -> list[bool]:
    """Per token id: whether its text holds one of ``chars``."""
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return [any(c in piece for c in chars) for piece in pieces]


HANDLED = {"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p", "pad_token_id", "bos_token_id"}
HANDLED |= {"eos_token_id", "stop_strings", "disable_compile", "transformers_version", "repetition_penalty"}
HANDLED |= {"cache_implementation"}  # these two only at their neutral values, which decodable checks


def decodable(config) -> bool:
    """Whether ``generate_grouped`` honours every setting of a ``GenerationConfig``: sampling with temperature,
    top-k, top-p and min-p (transformers' own warpers), greedy, EOS ids and stop strings, a dynamic cache. Anything
    else (beams, repetition penalty, suppressed tokens...) is left to ``generate`` (TRL's own rollouts).

    >>> from transformers import GenerationConfig
    >>> decodable(GenerationConfig(do_sample=True, top_p=0.9)), decodable(GenerationConfig(repetition_penalty=1.1))
    (True, False)
    """
    diff = config.to_diff_dict()
    plain = config.repetition_penalty in (None, 1.0) and config.cache_implementation in (None, "dynamic")
    return plain and not set(diff) - HANDLED


class Sampler:
    """Picks each row's next token from its last logits as ``generate`` would: the argmax (greedy), or a draw from
    ``softmax`` after transformers' temperature, top-k, top-p and min-p warpers, built from ``config`` as
    ``generate`` builds them. A draw inverts each row's cumulative distribution at one uniform number (summed in
    float64): the distribution of ``torch.multinomial``, which took about 20 ms of a 16-row decode step over a 49k
    vocabulary on the 2-core EPYC, and of the exponential race (``argmax p / E``), whose uniform number per token
    took 5.4 ms there; this takes 0.8 ms (README "Decoding")."""

    def __init__(self, config):
        from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.sample, self.warpers = bool(config.do_sample), []
        if self.sample:
            if config.temperature is not None and config.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k:
                self.warpers.append(TopKLogitsWarper(top_k=config.top_k))
            if config.top_p is not None and config.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p=config.top_p))
            if config.min_p is not None:
                self.warpers.append(MinPLogitsWarper(min_p=config.min_p))

    def __call__(self, logits: torch.Tensor, with_logps: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(tokens, log-probs)``: each row's next token and (``with_logps``) its log-prob under the distribution it
        was drawn from (greedy: ``log_softmax`` of the logits)."""
        scores = logits.float()
        for warper in self.warpers:
            scores = warper(None, scores)
        if not self.sample:
            tokens = scores.argmax(dim=-1)
            return tokens, torch.log_softmax(scores, dim=-1).gather(1, tokens[:, None]).squeeze(
                1
            ) if with_logps else None
        probs = torch.softmax(scores, dim=-1)
        cdf = probs.double().cumsum_(dim=-1)  # in float64, so no token's share is lost to rounding
        total = cdf[:, -1:]
        u = torch.minimum(torch.rand_like(total) * total, torch.nextafter(total, torch.zeros_like(total)))
        tokens = torch.searchsorted(cdf, u, right=True).squeeze(1)  # the first token whose cdf passes u: p > 0
        return tokens, probs.gather(1, tokens[:, None]).squeeze(1).log()


FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # sibling projections of one input


@contextlib.contextmanager
def packed_linears(model, rows: int):
    """While open, each ``nn.Linear`` of an fp32 or bf16 model on a CPU multiplies through oneDNN with its weight
    reordered once into oneDNN's blocked layout, which a plain ``F.linear`` rebuilds at every call in bf16 (and
    which beats MKL's fp32 products at decode widths), and sibling projections of one input (``FUSED``: attention's
    q/k/v, the MLP's gate/up) multiply as one matrix: whichever is called first computes all of them and the others
    take their part. In bf16 the same numbers (a test compares logits exactly): a 16-row decode step's linears went
    from 787 to 551 us a layer of SmolLM2-135M (2 threads, avx512_bf16). In fp32 the same within rounding (oneDNN
    sums in another order than MKL; greedy tokens the same in the benchmark): on an AVX2-only EPYC the LM head took
    9.4 instead of 20.6 ms at 16 rows, q/k/v 0.17 instead of 0.27 ms (README "Decoding"). ``rows`` hints the batch
    the layout is chosen for. Elsewhere (a GPU, bf16 on a CPU without oneDNN's bf16 kernels: ``onednn_dtypes``)
    nothing changes; layers already packed by an enclosing ``packed_linears`` (evaluation packs once for all its
    batches) are left as they are.

    >>> model = torch.nn.Linear(4, 2)
    >>> with packed_linears(model, 1):
    ...     pass
    >>> "forward" in model.__dict__
    False
    """
    dtypes = onednn_dtypes()
    linears = {
        id(m): m
        for m in model.modules()
        if type(m) is torch.nn.Linear
        and m.weight.dtype in dtypes
        and m.weight.device.type == "cpu"
        and "forward" not in m.__dict__
    }
    if not linears:
        yield
        return
    groups = []
    for parent in model.modules():
        for names in FUSED:
            group = [getattr(parent, name, None) for name in names]
            if all(id(m) in linears for m in group) and len({m.bias is None for m in group}) == 1:
                groups.append([linears.pop(id(m)) for m in group])
    groups += [[m] for m in linears.values()]
    for group in groups:
        _pack(group, rows)
    patched = [m for group in groups for m in group]
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _pack(group: list, rows: int) -> None:
    """Point each of ``group``'s ``forward`` at one oneDNN product of their stacked weights (a group of one: its
    own): the first call with an input computes every member's output, the others (same input object) take theirs
    from it. With gradients on, or another dtype, each member runs ``F.linear`` as before."""
    stack = (lambda ts: ts[0]) if len(group) == 1 else torch.cat  # one weight needs no copy
    weight = stack([m.weight.detach() for m in group])
    bias = None if group[0].bias is None else stack([m.bias.detach() for m in group])
    packed, sizes, kept = torch.ops.mkldnn._reorder_linear_weight(weight, rows), [m.out_features for m in group], {}

    def forward(i: int, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != packed.dtype or torch.is_grad_enabled():
            return torch.nn.functional.linear(x, group[i].weight, group[i].bias)
        if kept.get("input") is not x or i not in kept["outputs"]:
            outputs = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "").split(sizes, dim=-1)
            kept["input"], kept["outputs"] = x, dict(enumerate(outputs))
        out = kept["outputs"].pop(i)
        if not kept["outputs"]:
            kept.clear()
        return out

    for i, m in enumerate(group):
        m.forward = functools.partial(forward, i)


def onednn_dtypes() -> set:
    """The weight dtypes ``packed_linears`` multiplies through oneDNN on this CPU: fp32 wherever PyTorch has oneDNN,
    bf16 where it also has oneDNN's bf16 kernels (``onednn_bf16``)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return set()
    return {torch.float32, torch.bfloat16} if onednn_bf16() else {torch.float32}


def onednn_bf16() -> bool:
    """Whether this CPU runs oneDNN's bf16 kernels (AVX512-BF16/AMX, or AVX512BW emulation; not AVX2 alone)."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise") and ops._is_mkldnn_bf16_supported()
    )


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
    """Completion token ids for each prompt row, in order, ending with EOS where the row ended; with
    ``sampler_logps``, also each token's log-prob under the sampler (``Sampler``), NaN for an EOS appended after a
    closed answer (never sampled).

    With ``share_prompt``, the tokens every row begins with (``common_prefix``: few-shot examples, a system
    prompt) are prefilled once for the batch, then each group of equal prompts next to each other once more, up to
    its last token; the KV cache is repeated for the rows. Then one decode step at a time for the rows still going:
    a row leaves the batch (and its cache) as soon as it ends at an EOS, at ``generation_config.stop_strings``
    (needs ``tokenizer``) or, with ``stop = (tokenizer, answer_format)``, once its answer closes (``AnswerStop``;
    then EOS is appended, so TRL counts it as terminated and the policy learns to stop after its answer).
    ``already`` (per row): how many of the prompt's last tokens are completion already (a row continued after a
    first round), for the answer check. Greedy rows get ``generate``'s tokens (a test compares them); the settings
    it takes are ``decodable``'s.
    """
    if not decodable(generation_config):
        raise ValueError(f"generate_grouped cannot honour {generation_config.to_diff_dict()}: use generate")
    rows = [list(p) for p in prompts]
    strings = generation_config.stop_strings or ()
    strings = [strings] if isinstance(strings, str) else list(strings)
    stopper = AnswerStop(*(stop or (tokenizer, None)), strings) if stop or strings else None
    ends, sampler = set(eos_token_ids), Sampler(generation_config)
    heads = [row[len(row) - already[r] :] if already and already[r] else [] for r, row in enumerate(rows)]
    tokens: list[list[int]] = [[] for _ in rows]
    logps: list[list[float]] = [[] for _ in rows]
    active = list(range(len(rows)))
    with packed_linears(model, len(rows)):
        ids, mask, cache, cached = _prefill_grouped(model, rows, pad_token_id, share_prompt)
        cache_keyword, four_d = _cache_keyword(model), _mask_in_4d(model, cache)
        step_ids, positions = ids[:, cached:], (mask.cumsum(-1) - 1).clamp(min=0)
        step_positions, following = positions[:, cached:], positions[:, -1] + 1
        for step in range(generation_config.max_new_tokens):
            logits = model(
                input_ids=step_ids,
                attention_mask=mask[:, None, None, :].bool() if four_d and step_ids.shape[1] == 1 else mask,
                position_ids=step_positions,
                use_cache=True,
                logits_to_keep=1,
                **{cache_keyword: cache},
            ).logits[:, -1]
            picked, picked_logps = sampler(logits, sampler_logps)
            keep = []
            for i, (r, token) in enumerate(zip(active, picked.tolist())):
                tokens[r].append(token)
                if token in ends:
                    continue
                why = stopper(heads[r] + tokens[r]) if stopper else None
                if why == "answer":
                    tokens[r].append(eos_token_ids[0])
                elif why is None:
                    keep.append(i)
            if sampler_logps:
                for r, lp in zip(active, picked_logps.tolist()):
                    logps[r].append(lp)
                    if len(tokens[r]) > len(logps[r]):
                        logps[r].append(float("nan"))  # the EOS appended after a closed answer
            if not keep or step + 1 == generation_config.max_new_tokens:
                break
            if len(keep) < len(active):  # finished rows leave the batch and the cache
                index = torch.tensor(keep, device=ids.device)
                cache.batch_select_indices(index)
                mask, picked, following = mask[index], picked[index], following[index]
                active = [active[i] for i in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            step_ids, step_positions, following = picked[:, None], following[:, None], following + 1
    return (tokens, logps) if sampler_logps else tokens


def _mask_in_4d(model, cache) -> bool:
    """Whether a one-token decode step gets the padding mask as the 4D boolean mask transformers would build from
    it (``[rows, 1, 1, columns]``: one token attends to every earlier column), so that it is never dropped: on a
    CPU, for a model attending with SDPA and no sliding window (a 4D mask passes through transformers unchanged).
    transformers drops an all-ones mask, and SDPA then runs grouped-query attention with ``enable_gqa``, which on a
    CPU took 1.5 ms a layer for 16 rows of SmolLM2-135M in bf16 against 0.3 ms for the kernel a mask selects (the
    key/value heads' queries packed together, as whenever a row is padded)."""
    sliding = any(getattr(layer, "is_sliding", False) for layer in cache.layers)
    sdpa = getattr(model.config, "_attn_implementation", None) == "sdpa"
    return sdpa and not sliding and model.device.type == "cpu"


def _prefill_grouped(model, rows: list[list[int]], pad_token_id: int, share_prompt: bool):
    """``(ids, mask, cache, cached)``: the rows padded (``pad_rows``), and a KV cache holding their first ``cached``
    columns: the prefix every row shares prefilled once, then each group of equal rows once up to its last token
    (with ``share_prompt``; else an empty cache)."""
    shared = common_prefix(rows) if share_prompt and len(rows) > 1 else 0
    ids, mask = pad_rows(rows, pad_token_id, model.device, shared)
    groups, cache, cached = runs(rows) if share_prompt else [(i, i + 1) for i in range(len(rows))], None, 0
    select = torch.tensor  # cache rows to keep, by index
    if shared:
        cache, cached = _cache(model), shared
        _prefill(model, cache, ids, mask, [0], 0, shared)
    if len(groups) < len(rows) and ids.shape[1] - 1 > shared:
        cache = cache or _cache(model)
        if shared:
            cache.batch_select_indices(select([0] * len(groups), device=ids.device))
        _prefill(model, cache, ids, mask, [start for start, _ in groups], shared, ids.shape[1] - 1)
        repeat = [g for g, (start, end) in enumerate(groups) for _ in range(start, end)]
        cache.batch_select_indices(select(repeat, device=ids.device))
        cached = ids.shape[1] - 1
    elif shared:
        cache.batch_select_indices(select([0] * len(rows), device=ids.device))
    return ids, mask, cache or _cache(model), cached


def _cache(model) -> DynamicCache:
    """transformers' ``DynamicCache`` for ``model``; for an fp32 model its full-attention layers ``GrowingLayer``s
    (in bf16 on the avx512_bf16 EPYC SDPA read a view of a larger buffer about 30% slower, README "Decoding")."""
    cache = DynamicCache(config=model.config)
    if model.dtype == torch.float32:
        cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in buffers with room for ``room`` more tokens: a decode step
    writes its token into the room instead of copying the whole cache into a new tensor (``torch.cat``, 15% of a
    16-row fp32 rollout on the AVX2-only EPYC), and attention reads the filled part as a view. Selecting rows
    (``batch_select_indices``) copies them with their room. The same keys and values, so the same numbers.

    >>> layer = GrowingLayer()
    >>> for _ in range(3):
    ...     keys, _ = layer.update(torch.ones(2, 1, 1, 4), torch.ones(2, 1, 1, 4))
    >>> keys.shape, layer.buffers[0].shape
    (torch.Size([2, 1, 3, 4]), torch.Size([2, 1, 33, 4]))
    """

    room, buffers = 32, None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self.get_seq_length(), key_states.shape[-2]
        if not self._fits(length + new):
            grown = []
            for old, states in zip((self.keys, self.values), (key_states, value_states)):
                shape = (*states.shape[:-2], length + new + self.room, states.shape[-1])
                grown.append(states.new_empty(shape))
                if length:
                    grown[-1][..., :length, :] = old
            self.buffers = tuple(grown)
        for buffer, states in zip(self.buffers, (key_states, value_states)):
            buffer[..., length : length + new, :] = states
        self.keys, self.values = (buffer[..., : length + new, :] for buffer in self.buffers)
        return self.keys, self.values

    def _fits(self, length: int) -> bool:
        """Whether the buffers hold the cache (no other method replaced it) with room for ``length`` tokens."""
        buffers = self.buffers
        return (
            buffers is not None
            and self.keys.data_ptr() == buffers[0].data_ptr()
            and self.keys.shape[:-2] == buffers[0].shape[:-2]
            and length <= buffers[0].shape[-2]
        )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0 and self._fits(0):
            length = self.get_seq_length()
            self.buffers = tuple(buffer[indices, ...] for buffer in self.buffers)
            self.keys, self.values = (buffer[..., :length, :] for buffer in self.buffers)
        else:
            super().batch_select_indices(indices)
