"""Rollouts: each prompt prefilled once per group of samples, rows that stop once their answer closes, and the
sampler's log-probs.

GRPO samples ``G`` completions of each prompt; TRL's transformers path feeds the prompt ``G`` times to ``generate``.
``generate_grouped`` prefills the prefix every prompt shares (few-shot examples, a system prompt) once, then each
distinct prompt once, repeats the KV cache for the rows and decodes them together: the same tokens as plain
``generate`` (a test compares them). ``AnswerStop`` ends a row once its answer marker closes
(``answers.answer_closed``), and ``cut`` gives it EOS there, so the batch ends when every row has answered, hit
EOS or the limit. ``SampledLogps`` keeps each sampled token's log-prob for TRL's importance-sampling correction
(``prefix.PrefixSharing``); the EOS ``cut`` appends was never sampled and gets NaN. ``models.generate`` (eval,
``filter``, ``rft``) decodes through the same function.

>>> runs([[1, 2], [1, 2], [3], [1, 2]])
[(0, 2), (2, 3), (3, 4)]
>>> cut([5, 6, 2, 2], eos_token_ids=[2], stop_length=None), cut([5, 6, 7, 2], eos_token_ids=[2], stop_length=2)
([5, 6, 2], [5, 6, 2])
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

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
