"""The packed log-prob forward: each group's prompt computed once, completions side by side in one row.

TRL feeds the prompt ``G`` times to every log-prob forward (the policy with gradients; the reference model or the
old policy without). ``packed_logps`` packs groups into one row: the prefix their prompts share, each group's
prompt without its last token, then for each completion a copy of that last token and the completion. A
block-causal mask lets each completion see the shared prefix, its prompt and itself only, and each completion's
positions continue its prompt's, so one forward over ``P + G(C + 1)`` tokens per group gives what ``G`` forwards
over ``P + C`` tokens give, padding excluded (a test compares log-probs and gradients). With SDPA the row's
attention skips the blocks that mask hides (``Tree``, ``tree_attention``). Rows are grouped by prompt value, not by
adjacency: TRL shuffles a batch before the loss. ``_labelled_positions_only`` is the one TRL patch
here: its fused LM head then scores completion positions only. A model with a sliding window shorter than the
batch is left to TRL (``sliding_window``: transformers applies no window to a custom mask).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import NamedTuple

import torch

from .rollouts import common_prefix, runs

MASKED_ATTENTION = ("sdpa", "eager")  # attention implementations that take a custom 4D mask


def sliding_window(config) -> int | None:
    """The attention window of a model some of whose layers attend within one (Mistral, Gemma, Qwen with
    ``use_sliding_window``), else None. transformers passes a custom 4D mask through unchanged, window or not.

    >>> from transformers import LlamaConfig, MistralConfig, Qwen2Config
    >>> sliding_window(LlamaConfig()), sliding_window(MistralConfig(sliding_window=4)), sliding_window(Qwen2Config())
    (None, 4, None)
    """
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", None) is False:
        return None
    types = getattr(config, "layer_types", None)
    return window if types is None or "sliding_attention" in types else None


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


class Tree(NamedTuple):
    """Who attends to what in a packed row (``_pack``), as dense batches for ``tree_attention``: the trunk (the shared
    prefix and the prompts, ``member == 0``), attending among itself as the block mask says; and the leaves (the
    completions), one batch row each, whose keys are their context (the shared prefix, their group's prompt) then
    their own tokens.

    >>> tree = Tree.of(group=[0, 0, 0, 0, 0], member=[0, 1, 1, 2, 2], device="cpu")  # a prompt, 2 completions
    >>> tree.trunk.tolist(), tree.queries.tolist(), tree.keys.tolist(), tree.inverse.tolist()
    ([0], [[1, 2], [3, 4]], [[0, 1, 2], [0, 3, 4]], [0, 1, 2, 3, 4])
    """

    trunk: torch.Tensor  # (Tt,) the trunk's positions
    trunk_mask: torch.Tensor  # (1, 1, Tt, Tt) bool, the block mask among them
    queries: torch.Tensor  # (n, Lq) each leaf's positions, padded with its first
    keys: torch.Tensor  # (n, Lk) each leaf's context then its own positions, padded with the first
    leaf_bias: torch.Tensor  # (n, 1, 1, Lq, Lk) 0 where a query sees a key, else -inf
    inverse: torch.Tensor  # (T,) each position's row in [trunk outputs; leaf outputs, Lq rows a leaf]

    @classmethod
    def of(cls, group: list[int], member: list[int], device) -> Tree:
        """The tree of a packed row whose tokens belong to ``group`` (-1: the shared prefix) and ``member`` (0: the
        group's prompt, k: its k-th completion), as ``_pack`` returns them."""
        trunk = [p for p, m in enumerate(member) if m == 0]
        leaves: dict[tuple[int, int], list[int]] = {}
        for p, (g, m) in enumerate(zip(group, member)):
            if m:
                leaves.setdefault((g, m), []).append(p)
        context = {g: [p for p in trunk if group[p] in (-1, g)] for g, _ in leaves}
        own = [(context[g], ps) for (g, _), ps in leaves.items()]
        lq, lk = max(len(ps) for _, ps in own), max(len(c) + len(ps) for c, ps in own)
        queries, keys = torch.zeros(len(own), lq, dtype=torch.long), torch.zeros(len(own), lk, dtype=torch.long)
        bias = torch.full((len(own), 1, 1, lq, lk), float("-inf"))
        inverse = torch.empty(len(group), dtype=torch.long)
        inverse[trunk] = torch.arange(len(trunk))
        for i, (c, ps) in enumerate(own):
            n = len(ps)
            queries[i, :n], queries[i, n:] = torch.tensor(ps), ps[0]
            keys[i, : len(c) + n] = torch.tensor(c + ps)
            bias[i, 0, 0, :n, : len(c)] = 0
            bias[i, 0, 0, :n, len(c) : len(c) + n].masked_fill_(torch.ones(n, n, dtype=torch.bool).tril(), 0)
            bias[i, 0, 0, n:, 0] = 0  # a padding query sees one key (no empty softmax); its output is dropped
            inverse[ps] = len(trunk) + i * lq + torch.arange(n)
        at = torch.tensor(trunk, dtype=torch.long)
        trunk_mask = _block_mask(torch.tensor(group)[at], torch.tensor(member)[at])
        return cls(*(x.to(device) for x in (at, trunk_mask, queries, keys, bias, inverse)))


def tree_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, packed_tree=None, **kwargs):
    """transformers' SDPA attention; for a packed row that carries its ``Tree`` (``packed_tree``), the same attention
    without the masked-out blocks: SDPA among the trunk's tokens, then each completion against its context and
    itself as plain batched products (keys and values gathered for it; each key/value head's query heads stacked,
    so grouped-query keys are not copied). SDPA's CPU kernel computes every block of the whole row's mask, and its
    bf16 backward costs about as much for small blocks as for the whole row: for a learning-recipe row (631 tokens,
    16 completions of about 35 tokens) a layer's attention took 5.7 + 36.5 ms forward + backward in bf16 against
    5.3 + 11.5 ms this way (2-core AMX Xeon). Same numbers in fp32 (a test compares outputs and gradients); in
    bf16 the scores and weights are rounded to bf16 as eager attention rounds them (relative error 1e-2 against
    float64 where SDPA's is 0.5-0.9e-2). Installed in place of transformers' ``"sdpa"`` by ``packed_logps``;
    calls without a tree go to the original unchanged."""
    if packed_tree is None or query.shape[0] != 1:
        return _SDPA["original"](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    from transformers.integrations.sdpa_attention import repeat_kv

    tree, groups = packed_tree, getattr(module, "num_key_value_groups", 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v = query[0], key[0], value[0]  # (heads, T, head_dim)
    trunk = q.new_empty(0, q.shape[0], q.shape[2])  # (Tt, heads, head_dim); none where a prompt is one token
    if tree.trunk.numel():
        trunk = sdpa(
            q[None, :, tree.trunk],
            repeat_kv(k[None, :, tree.trunk], groups),
            repeat_kv(v[None, :, tree.trunk], groups),
            attn_mask=tree.trunk_mask,
            scale=scaling,
        )[0].transpose(0, 1)
    kv, length, width = k.shape[0], k.shape[1], q.shape[-1]
    n, (lq, lk) = tree.queries.shape[0], tree.leaf_bias.shape[-2:]
    heads = torch.arange(kv, device=q.device)
    rows = (heads[:, None] * groups + torch.arange(groups, device=q.device))[None, :, :, None] * length
    ql = q.reshape(-1, width).index_select(0, (rows + tree.queries[:, None, None]).flatten())
    ql = ql.view(n * kv, groups * lq, width)
    at = (heads[None, :, None] * length + tree.keys[:, None]).flatten()  # (n, kv, Lk)
    kl, vl = (x.reshape(-1, width).index_select(0, at).view(n * kv, lk, width) for x in (k, v))
    bias = tree.leaf_bias.to(ql.dtype).expand(n, kv, groups, lq, lk).reshape(n * kv, groups * lq, lk)
    weights = torch.baddbmm(bias, ql, kl.transpose(1, 2), alpha=scaling).softmax(-1)
    leaves = torch.bmm(weights, vl).view(n, kv * groups, lq, width)
    flat = leaves.transpose(1, 2).flatten(0, 1)  # (n * Lq, heads, head_dim)
    return torch.cat([trunk, flat]).index_select(0, tree.inverse)[None], None


_SDPA: dict = {}


def _install_tree_attention() -> None:
    """Route transformers' ``"sdpa"`` attention through ``tree_attention`` (once per process; calls without a tree
    are passed to the original)."""
    if _SDPA:
        return
    from transformers.modeling_utils import AttentionInterface

    _SDPA["original"] = AttentionInterface._global_mapping["sdpa"]
    AttentionInterface.register("sdpa", tree_attention)


@contextlib.contextmanager
def _labelled_positions_only():
    """TRL's fused LM head scores only the labelled positions on Triton devices, and every position elsewhere (to
    keep tile shapes fixed for compilers such as Neuron's: ``trl.trainer.utils._use_triton`` decides). In eager CPU
    mode that only wastes work: a packed row's prompt positions would go through the 49k-wide head for nothing.
    Within this block the head scores labelled positions only, and on a CPU in fp32 through ``LogProbs`` where its
    logits fit in ``LogProbs.BUDGET`` (else TRL's tiles, torch ops on a CPU)."""
    from trl.trainer import utils

    original, chunked = getattr(utils, "_use_triton", None), getattr(utils, "_ChunkedLogProbFunction", None)
    if original is None or chunked is None:  # another TRL: keep its behaviour
        yield
        return
    utils._use_triton, utils._ChunkedLogProbFunction = (lambda device: True), LogProbs.dispatch(chunked)
    try:
        yield
    finally:
        utils._use_triton, utils._ChunkedLogProbFunction = original, chunked


class LogProbs(torch.autograd.Function):
    """What TRL's ``ChunkedLogProbFunction`` computes (log-probs of the targets under ``hidden @ weight.T + bias``
    times ``logit_scale`` over ``temperature``; entropy, ``log(sum p^2)``, the mean logit, whether the target is the
    argmax), on a CPU: the logits as one product in the compute dtype (autocast's, else the inputs'), kept for
    backward, then folded a block of rows at a time in fp32 buffers that stay in cache; backward writes the logits'
    gradient over them in place and runs two products. TRL's tiles run about ten torch passes each way over every
    tile, each into new memory: the head of a learning-recipe step (528 completion tokens, SmolLM2's 49k x 576
    head) took about 2.4 s a step through TRL's under bf16 autocast on the AMX Xeon (docs/performance.md). The
    entropy is summed as ``-p log p`` (no cancellation of large logits). A test compares every output and gradient
    with TRL's, in fp32 and under bf16 autocast."""

    BUDGET = 2**27  # logits elements (256 MB in bf16, 512 MB in fp32) above which TRL's tiles run instead
    BLOCK = 2**20  # logits elements folded at a time (4 MB in fp32)

    @classmethod
    def dispatch(cls, chunked):
        """An ``apply`` for TRL's call site: this function where it holds (a CPU, no softcap, logits within
        ``BUDGET``), else ``chunked`` (TRL's)."""

        def apply(*args):  # TRL's order: hidden, weight, bias, targets, temperature, chunk_size, softcap, ...
            hidden, weight, softcap = args[0], args[1], args[6]
            fits = hidden.shape[0] * weight.shape[0] <= cls.BUDGET
            return (cls if hidden.device.type == "cpu" and fits and softcap is None else chunked).apply(*args)

        return SimpleNamespace(apply=apply)

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs
    ):
        ctx.set_materialize_grads(False)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden.dtype
        z = torch.mm(hidden.to(dtype), weight.to(dtype).t())
        if bias is not None:  # rounded as TRL's tiles round it: the product, then the sum
            z += bias.to(dtype)
        scale = logit_scale / temperature
        with torch.autocast("cpu", enabled=False):  # the statistics in fp32, as TRL's tiles
            log_z, target, entropy, log_sum_sq, mean, top1 = LogProbs._statistics(z, scale, targets, outputs)
        ctx.save_for_backward(hidden, weight, targets, z, log_z, entropy if entropy is not None else log_z)
        ctx.scale, ctx.bias_dtype = scale, None if bias is None else bias.dtype
        ctx.mark_non_differentiable(*(x for x in (log_sum_sq, mean, top1) if x is not None))
        return target - log_z, entropy, log_sum_sq, mean, top1

    @staticmethod
    def _statistics(z, scale, targets, outputs):
        """Per row of the logits ``z`` (times ``scale``): log-normalizer, target logit, and the ``outputs`` asked
        for (entropy, log sum of squared probs, mean, target is the argmax; else None), a block of rows at a time."""
        n, wanted = z.shape[0], set(outputs)
        log_z, target, entropy, log_sum_sq, mean = (torch.empty(n) for _ in range(5))
        top1 = torch.empty(n, dtype=torch.bool)
        for rows, block, log_p in LogProbs._blocks(z, scale):
            torch.logsumexp(block, -1, out=log_z[rows])
            target[rows] = block.gather(1, targets[rows, None]).squeeze(1)
            if "mean_logits" in wanted:
                mean[rows] = block.mean(-1)
            if "is_top1" in wanted:
                top1[rows] = block.argmax(-1) == targets[rows]
            if {"entropy", "log_sum_sq_probs"} & wanted:
                torch.sub(block, log_z[rows, None], out=log_p)
                p = block.copy_(log_p).exp_()
                if "entropy" in wanted:
                    entropy[rows] = -torch.linalg.vecdot(p, log_p)
                if "log_sum_sq_probs" in wanted:  # squares of small p underflow to slow subnormals: only if asked
                    log_sum_sq[rows] = torch.linalg.vecdot(p, p).log()
        named = {"entropy": entropy, "log_sum_sq_probs": log_sum_sq, "mean_logits": mean, "is_top1": top1}
        return log_z, target, *(x if name in wanted else None for name, x in named.items())

    @staticmethod
    def _blocks(z, scale):
        """``(rows, block, spare)``: each block of rows of ``z`` as fp32 logits times ``scale``, in one reused buffer,
        with a second buffer of its shape."""
        step = max(1, LogProbs.BLOCK // z.shape[1])
        buffers = torch.empty(2, min(step, z.shape[0]), z.shape[1])
        for start in range(0, z.shape[0], step):
            rows = slice(start, min(start + step, z.shape[0]))
            block, spare = (b[: rows.stop - start] for b in buffers)
            block.copy_(z[rows])
            if scale != 1.0:
                block.mul_(scale)
            yield rows, block, spare

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *_):
        hidden, weight, targets, z, log_z, entropy = ctx.saved_tensors
        grad_bias = (
            z.new_zeros(z.shape[1], dtype=torch.float32) if ctx.bias_dtype and ctx.needs_input_grad[2] else None
        )
        for rows, block, p in LogProbs._blocks(z, ctx.scale):
            log_p = block.sub_(log_z[rows, None])
            torch.exp(log_p, out=p)
            if grad_entropy is None:  # d log p_target / dz_j = 1[j = target] - p_j
                grad = p.mul_(-grad_logprobs[rows, None])
            else:  # d entropy / dz_j = -p_j (log p_j + entropy)
                grad = log_p.add_(entropy[rows, None]).mul_(p).mul_(-grad_entropy[rows, None])
                if grad_logprobs is not None:
                    grad.sub_(p.mul_(grad_logprobs[rows, None]))
            if grad_logprobs is not None:
                grad.scatter_add_(1, targets[rows, None], grad_logprobs[rows, None])
            if ctx.scale != 1.0:
                grad.mul_(ctx.scale)
            if grad_bias is not None:
                grad_bias += grad.sum(0)
            z[rows] = grad  # the logits are spent: their buffer takes the gradient (in the compute dtype)
        grad_hidden = (z @ weight.to(z.dtype)).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (z.t() @ hidden.to(z.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = grad_bias.to(ctx.bias_dtype) if grad_bias is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


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
    first: dict[tuple, int] = {}  # rows of one prompt side by side: TRL shuffles a batch before the loss
    for i, prompt in enumerate(prompts):
        first.setdefault(tuple(prompt), i)
    order = sorted(range(len(prompts)), key=lambda i: first[tuple(prompts[i])])
    prompts, completions = [prompts[i] for i in order], [completions[i] for i in order]
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

        tree = {}
        if mask_dtype is None:  # sdpa
            _install_tree_attention()
            tree["packed_tree"] = Tree.of(group, member, device)
        with _labelled_positions_only():
            out = model(
                input_ids=tensor([tokens]),
                attention_mask=_block_mask(tensor(group), tensor(member), mask_dtype),
                position_ids=tensor([positions]),
                shift_labels=tensor([labels]),
                fused_lm_head=True,
                **tree,
            )
        for offset, n, j in places:
            logps[order[j]] = out.log_probs[0, offset : offset + n]
            if compute_entropy:
                entropies[order[j]] = out.entropy[0, offset : offset + n]

    def stacked(parts):
        return torch.stack([torch.nn.functional.pad(p, (0, width - p.shape[0])) for p in parts])

    return stacked(logps), stacked(entropies) if compute_entropy else None
