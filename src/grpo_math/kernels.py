"""CPU kernels for decoding: linears multiplied through oneDNN with their weights packed once (sibling projections
as one product), and a KV cache whose full-attention layers grow in place. Both leave the numbers as they were
(fp32 products within rounding); the decode loop (``rollouts``) uses them, and where they do not apply (a GPU,
bf16 without oneDNN's kernels) nothing changes. (Which malloc a run uses, and glibc's tuning: ``allocator``.)

>>> sorted(str(d) for d in onednn_dtypes()) in (["torch.float32"], ["torch.bfloat16", "torch.float32"], [])
True
"""

from __future__ import annotations

import contextlib
import functools

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

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
    9.4 instead of 20.6 ms at 16 rows, q/k/v 0.17 instead of 0.27 ms (docs/performance.md). ``rows`` hints the batch
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
    """Whether this CPU runs oneDNN's bf16 kernels (AVX512-BF16/AMX, or AVX512BW emulation; not AVX2 alone), where
    PyTorch has oneDNN."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def kv_cache(model) -> DynamicCache:
    """transformers' ``DynamicCache`` for ``model``; for an fp32 model its full-attention layers ``GrowingLayer``s
    (in bf16 on the avx512_bf16 EPYC SDPA read a view of a larger buffer about 30% slower: docs/performance.md)."""
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
