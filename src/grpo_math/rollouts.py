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

import functools
import inspect
from collections.abc import Sequence

import torch

from .answers import answer_closed
from .kernels import kv_cache, packed_linears


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
    took 5.4 ms there; this takes 0.8 ms (docs/performance.md, "Decoding")."""

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
        cache, cached = kv_cache(model), shared
        _prefill(model, cache, ids, mask, [0], 0, shared)
    if len(groups) < len(rows) and ids.shape[1] - 1 > shared:
        cache = cache or kv_cache(model)
        if shared:
            cache.batch_select_indices(select([0] * len(groups), device=ids.device))
        _prefill(model, cache, ids, mask, [start for start, _ in groups], shared, ids.shape[1] - 1)
        repeat = [g for g, (start, end) in enumerate(groups) for _ in range(start, end)]
        cache.batch_select_indices(select(repeat, device=ids.device))
        cached = ids.shape[1] - 1
    elif shared:
        cache.batch_select_indices(select([0] * len(rows), device=ids.device))
    return ids, mask, cache or kv_cache(model), cached
