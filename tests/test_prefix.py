"""The fast GRPO step (``rollouts.py``, ``packing.py``, ``prefix.py``) changes nothing but time: grouped generation
gives plain ``generate``'s tokens,
the packed forward gives TRL's log-probs, entropies and gradients, the stop rule never ends a completion before its
answer closes, the bf16 rollout copy follows the weights, and a training step logs the same numbers either way."""

import contextlib
import functools
import json
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, DynamicCache, GenerationConfig, LlamaConfig, LlamaForCausalLM
from trl.trainer.utils import add_fused_lm_head

from grpo_math import cli
from grpo_math.answers import answer_closed
from grpo_math.packing import Tree, _block_mask, _pack, packed_logps, tree_attention
from grpo_math.prefix import PrefixSharing
from grpo_math.rollouts import AnswerStop, Sampler, decodable, generate_grouped, pad_rows, runs


def small_llama(vocab: int = 300, layers: int = 2, std: float | None = None, **extra) -> LlamaForCausalLM:
    """A random two-layer Llama; ``std`` re-draws its matrices wider, so greedy decoding varies from token to token
    (at the default scale it repeats one token); ``extra``: more config fields (or other widths)."""
    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
    config = LlamaConfig(
        vocab_size=vocab,
        num_hidden_layers=layers,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=2,
        eos_token_id=2,
        **(sizes | extra),
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    for p in model.parameters() if std else ():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=std)
    return model


@pytest.fixture(scope="module")
def tokenizer(embedded_model):
    return AutoTokenizer.from_pretrained(embedded_model)


def batch(groups: list[tuple[list[int], int]], width: int, seed: int = 0):
    """TRL's layout: prompts left-padded, completions right-padded to ``width``, ``G`` rows per prompt."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [int(torch.randint(0, width + 1, (1,), generator=gen)) for _, g in groups for _ in range(g)]
    prompts = [p for p, g in groups for _ in range(g)]
    rows = [(p, torch.randint(3, 300, (n,), generator=gen).tolist()) for p, n in zip(prompts, lengths)]
    longest = max(len(p) for p, _ in rows)
    ids = torch.full((len(rows), longest + width), 2)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(rows):
        ids[i, longest - len(p) : longest], mask[i, longest - len(p) : longest] = torch.tensor(p), 1
        ids[i, longest : longest + len(c)], mask[i, longest : longest + len(c)] = torch.tensor(c, dtype=torch.long), 1
    return ids, mask


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_forward_gives_trls_logps_entropies_and_gradients(attention, monkeypatch):
    """The packed forward (through the CPU head, ``LogProbs``: counted) gives TRL's own path's log-probs, entropies
    and gradients."""
    from grpo_math import packing
    from grpo_math.packing import LogProbs

    heads, forward = [], LogProbs.forward
    monkeypatch.setattr(LogProbs, "forward", staticmethod(lambda *a: heads.append(1) or forward(*a)))
    width = 7
    # prompts sharing [5] or [5, 6] (as few-shot examples would); one is nothing but the shared part and its last token
    groups = [([5, 6, 7, 8, 9], 3), ([5, 6, 10, 11, 12, 13, 14, 15], 4), ([5, 6, 16], 1), ([5, 18, 19], 2)]
    ids, mask = batch(groups, width)
    models = []
    for _ in range(2):
        model = small_llama()
        model.config._attn_implementation = attention
        add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
        models.append(model)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-width] = -100
    theirs = models[0](input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    mask_dtype = torch.float32 if attention == "eager" else None
    from transformers.modeling_utils import AttentionInterface

    packing._install_tree_attention()
    calls = {"tree": 0, "whole row": 0}  # with sdpa, each layer attends through the tree, never over the whole row

    def counted(*args, packed_tree=None, **kwargs):
        calls["whole row" if packed_tree is None else "tree"] += 1
        return tree_attention(*args, packed_tree=packed_tree, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", counted)
    logps, entropies = packed_logps(models[1], ids, mask, width, compute_entropy=True, mask_dtype=mask_dtype)
    assert calls == ({"tree": 2, "whole row": 0} if attention == "sdpa" else {"tree": 0, "whole row": 0})
    torch.testing.assert_close(logps, theirs.log_probs[:, -width:], atol=1e-5, rtol=0)
    torch.testing.assert_close(entropies, theirs.entropy[:, -width:], atol=1e-5, rtol=0)
    weights = torch.randn(logps.shape)  # any loss of the log-probs: the gradients agree too
    (theirs.log_probs[:, -width:] * weights).sum().backward()
    (logps * weights).sum().backward()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)
    chunked, _ = packed_logps(models[1], ids, mask, width, batch_size=7, mask_dtype=mask_dtype)  # [5, 6], then [5]
    torch.testing.assert_close(chunked, logps, atol=1e-6, rtol=0)
    assert len(heads) == 3  # one packed row, then two


@pytest.mark.parametrize(
    "prompts, lengths",
    [
        ([[5, 6, 7, 8]] * 3 + [[5, 6, 9]] * 2, [4, 0, 6, 1, 3]),  # a shared prefix, two groups
        ([[7]] * 3, [2, 5, 0]),  # one group whose prompt is one token: no trunk but the copies of it
        ([[1, 2, 3], [4, 5]], [3, 3]),  # nothing shared, groups of one
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_attention_is_the_block_masked_attention(prompts, lengths, dtype):
    """``tree_attention`` (the trunk among itself, each completion against its context and itself) gives SDPA's
    output and gradients over the whole packed row with its block mask, grouped-query heads included: to rounding
    in fp32; in bf16 (products rounded as eager attention rounds them) within 3x SDPA's own bf16 error against
    float64."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    completions = [list(range(10, 10 + n)) for n in lengths]
    _, _, group, member, _, _ = _pack(prompts, completions, runs(prompts))
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True)
    torch.manual_seed(0)
    length = len(group)
    inputs = [torch.randn(1, h, length, 8) * 2 for h in (6, 2, 2)]
    upstream = torch.randn(1, length, 6, 8)
    mask, tree = _block_mask(torch.tensor(group), torch.tensor(member)), Tree.of(group, member, "cpu")

    def run(dtype, packed_tree=None):
        q, k, v = (x.to(dtype, copy=True).requires_grad_() for x in inputs)
        if packed_tree is None:
            out = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)[0]
        else:
            out = tree_attention(module, q, k, v, mask, scaling=0.3, packed_tree=packed_tree)[0]
        out.backward(upstream.to(dtype))
        return [x.double() for x in (out, q.grad, k.grad, v.grad)]

    exact, theirs, ours = run(torch.float64), run(dtype), run(dtype, tree)
    for mine, sdpa, truth in zip(ours, theirs, exact):
        if dtype == torch.float32:
            torch.testing.assert_close(mine, sdpa, atol=1e-5, rtol=1e-5)
        else:
            assert (mine - truth).norm() <= 3 * (sdpa - truth).norm() + 1e-3 * truth.norm()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("grads", [("log_probs",), ("log_probs", "entropy")])
def test_the_cpu_log_prob_head_computes_what_trls_chunked_head_computes(grads, autocast, monkeypatch):
    """``LogProbs`` (the logits as one product, folded a few rows at a time: here 5) gives TRL's
    ``ChunkedLogProbFunction``'s log-probs, entropies, log sum of squared probs, mean logits and top-1 flags, and
    its gradients for the hidden states, weight and bias, with a temperature, a logit scale, and a loss on the
    log-probs alone or on the entropies too, in fp32 and under bf16 autocast (within bf16's rounding there); the
    dispatcher leaves a softcap, another device and logits over the budget to TRL's."""
    from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS, ChunkedLogProbFunction

    from grpo_math.packing import LogProbs

    monkeypatch.setattr(LogProbs, "BLOCK", 5 * 300)
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(37, 16, generator=gen), torch.randn(300, 16, generator=gen), torch.randn(300, generator=gen)]
    targets, outputs = torch.randint(0, 300, (37,), generator=gen), ("log_probs", *OPTIONAL_OUTPUTS)
    weights = [torch.randn(37, generator=gen) for _ in grads]
    results = []
    for function in (ChunkedLogProbFunction, LogProbs):
        hidden, weight, bias = (t.clone().requires_grad_() for t in leaves)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = function.apply(hidden, weight, bias, targets, 0.7, 128, None, 1.3, outputs)
        sum(w @ out[("log_probs", "entropy").index(g)] for w, g in zip(weights, grads)).backward()
        results.append([*out, hidden.grad, weight.grad, bias.grad])
    for name, theirs, ours in zip([*outputs, "d hidden", "d weight", "d bias"], *results):
        tolerance = 2e-2 if autocast and name.startswith("d ") else 1e-4  # bf16 products (TRL's are fp32 here)
        assert ours.dtype == theirs.dtype, name
        torch.testing.assert_close(ours, theirs, atol=tolerance, rtol=tolerance, msg=name)

    picked = []
    apply = LogProbs.dispatch(SimpleNamespace(apply=lambda *a: picked.append("trl"))).apply
    monkeypatch.setattr(LogProbs, "apply", lambda *a: picked.append("ours"))
    hidden, weight = leaves[0], leaves[1]
    apply(hidden, weight, None, targets, 1.0, 128, None, 1.0, outputs)
    apply(hidden.bfloat16(), weight.bfloat16(), None, targets, 1.0, 128, None, 1.0, outputs)
    apply(hidden, weight, None, targets, 1.0, 128, 30.0, 1.0, outputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        apply(hidden, weight, None, targets, 1.0, 128, None, 1.0, outputs)
    apply(hidden.to("meta"), weight.to("meta"), None, targets, 1.0, 128, None, 1.0, outputs)  # not a CPU
    monkeypatch.setattr(LogProbs, "BUDGET", 37 * 300 - 1)
    apply(hidden, weight, None, targets, 1.0, 128, None, 1.0, outputs)
    assert picked == ["ours", "ours", "trl", "ours", "trl", "trl"]


def test_packed_forward_groups_rows_by_prompt_after_trls_shuffle():
    """TRL shuffles a batch before the loss: rows of one prompt are packed together wherever they sit, so the packed
    row is as short as for a sorted batch, and the log-probs are TRL's, in the batch's own order."""
    width = 5
    ids, mask = batch([([5, 6, 7, 8, 9, 10], 4), ([5, 6, 11, 12, 13], 3), ([5, 14, 15], 2)], width)
    shuffled = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))
    assert any(torch.equal(ids[a, :-width], ids[b, :-width]) is False for a, b in zip(shuffled, shuffled[1:]))
    model = small_llama()
    add_fused_lm_head(model, outputs=("log_probs",))
    lengths, forward = [], model.forward
    model.forward = lambda input_ids, **kw: lengths.append(input_ids.shape[1]) or forward(input_ids=input_ids, **kw)
    sorted_logps, _ = packed_logps(model, ids, mask, width)
    shuffled_logps, _ = packed_logps(model, ids[shuffled], mask[shuffled], width)
    assert lengths[0] == lengths[1]  # each prompt once in both
    torch.testing.assert_close(shuffled_logps, sorted_logps[shuffled], atol=1e-6, rtol=0)


def test_packed_forward_declines_a_completion_mask_with_holes():
    ids, mask = batch([([5, 6, 7], 2)], 4)
    mask[0, -4:] = torch.tensor([1, 0, 1, 0])
    model = small_llama()
    add_fused_lm_head(model)
    assert packed_logps(model, ids, mask, 4) is None


def up_to_eos(rows: list[list[int]], eos: list[int]) -> list[list[int]]:
    """``generate``'s padded rows cut after their first EOS (kept, as TRL keeps it)."""
    return [next((row[: i + 1] for i, t in enumerate(row) if t in eos), row) for row in rows]


@pytest.mark.parametrize("ends", ["eos", "frequent"])
def test_grouped_generation_gives_plain_generates_tokens(tokenizer, ends):
    """Greedy, ``generate_grouped`` gives ``generate``'s tokens. With ``frequent``, the tokens that end a row are
    ones the model writes often, so rows end at different steps and leave the batch while others go on."""
    model = small_llama(vocab=len(tokenizer), std=0.3).eval()
    shots = tokenizer("Example: 1 + 1 = 2. Example: 2 * 3 = 6.\n").input_ids  # a prefix every prompt shares
    questions = ["What is 2+3?", "Apples cost 4 each; 5 apples cost?", "Half of 48?"]
    prompts = [shots + tokenizer(q).input_ids for q, g in zip(questions, (3, 3, 1)) for _ in range(g)]
    eos = [tokenizer.eos_token_id]
    greedy = GenerationConfig(
        max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos
    )
    ids, mask = pad_rows(prompts, tokenizer.pad_token_id, "cpu")
    plain = model.generate(input_ids=ids, attention_mask=mask, generation_config=greedy)[:, ids.shape[1] :].tolist()
    if ends == "frequent":  # end rows where the free run wrote these tokens: at several different steps
        eos = [plain[0][5], plain[3][11], plain[6][17]]
        greedy.eos_token_id = eos
        plain = model.generate(input_ids=ids, attention_mask=mask, generation_config=greedy)[:, ids.shape[1] :]
        plain = plain.tolist()
    expected = up_to_eos(plain, eos)
    if ends == "frequent":
        assert len({len(row) for row in expected}) >= 3
    shared = generate_grouped(model, prompts, greedy, tokenizer.pad_token_id, eos, share_prompt=True)
    assert shared == expected
    distinct = prompts[2:5]  # no two equal: only the shared prefix is prefilled once (greedy evaluation)
    assert generate_grouped(model, distinct, greedy, tokenizer.pad_token_id, eos) == shared[2:5]
    sampled = GenerationConfig(**{**greedy.to_diff_dict(), "do_sample": True, "temperature": 1.0, "top_k": None})
    torch.manual_seed(1)
    a = generate_grouped(model, prompts, sampled, tokenizer.pad_token_id, eos, share_prompt=True)
    torch.manual_seed(1)
    b = generate_grouped(model, prompts, sampled, tokenizer.pad_token_id, eos, share_prompt=False)
    assert a == b and len({tuple(r) for r in a}) > 3  # same samples, and they do differ within a group


def test_decode_steps_without_padding_keep_the_packed_grouped_query_kernel(tokenizer, monkeypatch):
    """Rows with no padding (one prompt, several samples): every one-token decode step still hands SDPA a mask
    (``_mask_in_4d``), so it packs each key/value head's queries together instead of ``enable_gqa``, the kernel
    transformers picks for an all-ones mask (5x slower on a CPU in bf16); the tokens are ``generate``'s."""
    model = small_llama(vocab=len(tokenizer), std=0.3).eval()  # 4 query heads on 2 key/value heads
    prompts = [tokenizer("What is 2+3?").input_ids] * 3
    greedy = GenerationConfig(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    ids = torch.tensor(prompts)
    plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=greedy)
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape[2], attn_mask is None, kw))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    out = generate_grouped(model, prompts, greedy, tokenizer.pad_token_id, [tokenizer.eos_token_id])
    assert out == plain[:, ids.shape[1] :].tolist()
    steps = [(unmasked, kw) for length, unmasked, kw in calls if length == 2]  # 2 packed queries: a decode step
    assert len(steps) == 2 * 12 and not any(unmasked or kw.get("enable_gqa") for unmasked, kw in steps)


def test_decode_steps_keep_the_2d_mask_where_transformers_must_build_it():
    """A 4D mask passes through transformers unchanged, so the decode loop builds one only where it is what
    transformers would build: SDPA on a CPU without sliding-window layers. A sliding window (Mistral-style), eager
    attention or a GPU keep the 2D padding mask."""
    from transformers import MistralConfig

    from grpo_math.rollouts import _mask_in_4d

    sizes = {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 2}
    for config, device, four_d in [
        (LlamaConfig(**sizes), "cpu", True),
        (MistralConfig(sliding_window=2, **sizes), "cpu", False),
        (LlamaConfig(**sizes), "cuda", False),
        (LlamaConfig(attn_implementation="eager", **sizes), "cpu", False),
    ]:
        config._attn_implementation = config._attn_implementation or "sdpa"
        model = SimpleNamespace(config=config, device=torch.device(device))
        assert _mask_in_4d(model, DynamicCache(config=config)) == four_d, config


def test_the_growing_cache_holds_what_concatenation_holds_and_copies_only_when_full():
    """``GrowingLayer`` returns the keys/values ``DynamicLayer`` returns (torch.cat at every step) for a prefill,
    40 one-token steps, rows leaving the batch, and after another method replaced its tensors
    (``reorder_cache``); it allocates a buffer only when the room (32 tokens) runs out. The decode loop's
    cache uses it for the full-attention layers of an fp32 model (a sliding window keeps its own layer)."""
    from transformers import MistralConfig
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    from grpo_math.kernels import GrowingLayer, kv_cache

    torch.manual_seed(0)
    growing, plain, buffers = GrowingLayer(), DynamicLayer(), []

    def step(length: int, rows: int = 4):
        k, v = torch.randn(rows, 2, length, 8), torch.randn(rows, 2, length, 8)
        got, want = growing.update(k, v), plain.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), growing.get_seq_length()
        if not any(b is growing.buffers[0] for b in buffers):
            buffers.append(growing.buffers[0])

    step(9)
    for i in range(40):
        step(1, rows=4 if i <= 20 else 3)
        if i == 20:
            for layer in (growing, plain):
                layer.batch_select_indices(torch.tensor([0, 2, 3]))
    assert len(buffers) == 3  # 9 + 32 room; rows leaving copy into a new one; 42 + 32 at the 33rd step
    assert growing.buffers[0].shape == (3, 2, 42 + 32, 8)
    for layer in (growing, plain):
        layer.reorder_cache(torch.tensor([2, 0, 1]))
    step(1, rows=3)
    sizes = {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 2}
    mixed = MistralConfig(sliding_window=4, **sizes, layer_types=["sliding_attention", "full_attention"])
    for config, dtype, kinds in [
        (LlamaConfig(**sizes), torch.float32, [GrowingLayer] * 2),
        (LlamaConfig(**sizes), torch.bfloat16, [DynamicLayer] * 2),
        (mixed, torch.float32, [DynamicSlidingWindowLayer, GrowingLayer]),
    ]:
        assert [type(layer) for layer in kv_cache(SimpleNamespace(config=config, dtype=dtype)).layers] == kinds


def test_the_sampler_draws_from_the_warped_softmax():
    """The sampler draws each token with its softmax probability (20,000 draws, within 4 standard
    errors), after the warpers: nothing outside top-k / top-p, temperature sharpening; greedy is the argmax."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(20_000, 1)
    torch.manual_seed(0)
    for config, probs in [
        (GenerationConfig(do_sample=True, top_k=None), torch.softmax(logits[0], -1)),
        (GenerationConfig(do_sample=True, top_k=None, temperature=0.5), torch.softmax(logits[0] / 0.5, -1)),
        (GenerationConfig(do_sample=True, top_k=2), torch.softmax(logits[0, :2], -1).tolist() + [0, 0, 0]),
        (GenerationConfig(do_sample=True, top_k=None, top_p=0.6), torch.softmax(logits[0, :2], -1).tolist() + [0] * 3),
    ]:
        tokens, logps = Sampler(config)(logits)
        seen = torch.bincount(tokens, minlength=5) / len(tokens)
        probs = torch.as_tensor(probs, dtype=torch.float32)
        assert torch.all((seen - probs).abs() <= 4 * (probs * (1 - probs) / len(tokens)).sqrt() + 1e-9), (seen, probs)
        torch.testing.assert_close(logps.exp(), probs[tokens], atol=1e-5, rtol=0)
    tokens, _ = Sampler(GenerationConfig(do_sample=False))(logits[:3])
    assert tokens.tolist() == [0, 0, 0]


def test_what_the_decode_loop_cannot_honour_goes_to_trls_generate():
    """``decodable``: TRL's own rollout settings pass; a repetition penalty, beams or a static cache do not, and
    ``PrefixSharing`` then hands the rollouts to TRL's ``_generate_single_turn``."""
    trl_like = {"max_new_tokens": 8, "do_sample": True, "pad_token_id": 2, "bos_token_id": 1, "eos_token_id": [2]}
    trl_like |= {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": None, "repetition_penalty": 1.0}
    trl_like |= {"cache_implementation": None}
    assert decodable(GenerationConfig(**trl_like, disable_compile=True))
    for extra in ({"repetition_penalty": 1.1}, {"num_beams": 2}, {"cache_implementation": "static"}):
        assert not decodable(GenerationConfig(**{**trl_like, **extra}))

    class TRL:
        def _generate_single_turn(self, *args):
            return "trl"

    class Trainer(PrefixSharing, TRL):
        args = SimpleNamespace(use_vllm=False)
        use_transformers_continuous_batching, tools, sampler_correction = False, None, False
        generation_config = GenerationConfig(**{**trl_like, "repetition_penalty": 1.1})

    assert Trainer.__new__(Trainer)._generate_single_turn([[5, 6]], None, None, 1) == "trl"


def test_with_vllm_the_sampler_is_trls_and_no_generation_config_is_asked_for():
    """With ``use_vllm`` TRL builds no ``generation_config`` (vLLM samples, and TRL corrects for it itself):
    ``PrefixSharing`` neither reads one nor adds a correction of its own (it raised AttributeError at build)."""

    class Trainer(PrefixSharing):
        args = SimpleNamespace(use_vllm=True, bf16=True, fp16=False, vllm_importance_sampling_correction=True)
        use_transformers_continuous_batching, tools, rollout_func = False, None, None

    assert Trainer.__new__(Trainer)._corrects_sampler() is False


text_piece = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "<", ">", "/", "answer", "\n", " ", "4"])
text_piece |= st.text(alphabet="ab 12<>/\n}{#", max_size=6)


MARKERS = {"tags": "<answer> 4</answer>", "hash": "#### 4\n", "boxed": "\\boxed{4}"}


@settings(max_examples=80, deadline=None)
@given(
    before=st.lists(text_piece, max_size=8),
    marker=st.sampled_from([*MARKERS.values(), ""]),
    after=st.lists(text_piece, max_size=6),
    answer_format=st.sampled_from(list(MARKERS)),
)
def test_stop_rule_ends_a_completion_exactly_when_its_answer_closes(tokenizer, before, marker, after, answer_format):
    """Fed token by token as the decode loop feeds it, ``AnswerStop`` says "answer" at the first token after which
    the text holds a closed answer (``answers.answer_closed``), never before it."""
    tokens = tokenizer("".join(before) + marker + "".join(after), add_special_tokens=False).input_ids
    stop = AnswerStop(tokenizer, answer_format)
    said = [t for t in range(1, len(tokens) + 1) if stop(tokens[:t]) == "answer"]
    closes = [t for t in range(1, len(tokens) + 1) if answer_closed(tokenizer.decode(tokens[:t]), answer_format)]
    assert said[:1] == closes[:1]


def test_stop_strings_end_a_row_at_the_token_that_completes_them(tokenizer):
    """A stop string ends a row at the token that completes it, even inside a token or across tokens; the answer
    rule and the strings work together."""
    stop = AnswerStop(tokenizer, None, ["Question:", "\n\n"])
    tokens = tokenizer("The answer is 4.\n\nQuestion: what", add_special_tokens=False).input_ids
    ends = [t for t in range(1, len(tokens) + 1) if stop(tokens[:t])]
    text = tokenizer.decode(tokens[: ends[0]])
    assert text.endswith("\n\n") and "\n\n" not in tokenizer.decode(tokens[: ends[0] - 1])
    both = AnswerStop(tokenizer, "tags", ["Question:"])
    assert both(tokenizer("<answer>4</answer>", add_special_tokens=False).input_ids) == "answer"
    assert both(tokenizer("4\nQuestion:", add_special_tokens=False).input_ids) == "string"


def test_bf16_rollout_copy_follows_the_weights():
    model = small_llama()
    add_fused_lm_head(model)
    owner = SimpleNamespace(
        args=SimpleNamespace(bf16=True, bf16_rollouts=True),
        is_deepspeed_enabled=False,
        is_fsdp_enabled=False,
        state=SimpleNamespace(global_step=0),
        _rollout=None,
        _rollout_step=None,
    )
    copy = PrefixSharing._rollout_model(owner, model)
    assert copy is not model and {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    assert all(b.dtype == torch.float32 for b in copy.buffers())  # rotary frequencies keep full precision
    assert "forward" not in copy.__dict__  # not TRL's fused head, whose closure calls the original model
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    assert PrefixSharing._rollout_model(owner, model) is copy and copy.model.norm.weight[0] == 1  # same step
    owner.state.global_step = 1
    assert PrefixSharing._rollout_model(owner, model).model.norm.weight[0] == 2  # refreshed after an update
    owner.args.bf16 = False
    assert PrefixSharing._rollout_model(owner, model) is model


def test_a_training_step_logs_the_same_numbers_with_or_without_sharing(tiny_model, tmp_path, monkeypatch):
    """Same numbers either way, and the fast path really ran: a TRL update that stopped calling the overrides would
    turn sharing off without a word (and this comparison would still pass)."""
    from grpo_math import prefix

    calls = {"generate_grouped": 0, "packed_logps": 0}

    def counted(name):
        original = getattr(prefix, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(prefix, name, wrapper)

    counted("generate_grouped"), counted("packed_logps")
    logs, seen = {}, {}
    for share in ("true", "false"):
        out = tmp_path / share
        flags = [
            "train",
            "--config",
            "recipes/smoke.yaml",
            "--model_name_or_path",
            tiny_model,
            "--output_dir",
            str(out),
        ]
        flags += ["--max_steps", "1", "--max_completion_length", "16", "--share_prompt", share, "--bf16", "false"]
        flags += ["--save_steps", "100", "--beta", "0.02"]
        assert cli.main(flags) == 0
        logs[share] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][0]
        seen[share], calls["generate_grouped"], calls["packed_logps"] = dict(calls), 0, 0
    # one rollout batch; packed forwards for the policy (with gradients) and the reference model
    assert seen == {
        "true": {"generate_grouped": 1, "packed_logps": 2},
        "false": {"generate_grouped": 1, "packed_logps": 0},
    }
    keys = ("loss", "reward", "completions/mean_length", "kl", "entropy", "grad_norm")
    for key in keys:
        assert logs["true"][key] == pytest.approx(logs["false"][key], rel=1e-4, abs=1e-6), key


def test_the_trl_methods_the_fast_path_overrides_keep_their_signatures():
    """The overrides take TRL's arguments by position (pyproject pins the TRL minor release they were written
    for); the call sites are covered by the training-step test above."""
    import inspect

    from trl import GRPOTrainer
    from trl.trainer import utils

    def named(method):
        kinds = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
        return [p.name for p in inspect.signature(method).parameters.values() if p.kind not in kinds]

    for name in ("_generate_single_turn", "_get_per_token_logps_and_entropies", "_generate"):
        ours, theirs = named(getattr(PrefixSharing, name)), named(getattr(GRPOTrainer, name))
        assert theirs[: len(ours)] == ours, (name, theirs)
    assert callable(utils._use_triton) and callable(utils.add_fused_lm_head)
    from grpo_math.packing import LogProbs  # stands in for TRL's chunked head, called by position

    assert named(utils._ChunkedLogProbFunction.forward) == named(LogProbs.forward)


def test_rows_set_aside_after_a_first_round_continue_to_the_same_tokens(tiny_model, monkeypatch):
    """``models.generate`` continues rows still going after ``CONTINUE_AFTER`` tokens in a second round: greedy,
    the texts, token counts and flags equal one uninterrupted round, and progress counts every prompt once."""
    from grpo_math import models

    model, tokenizer = models.load_weights(tiny_model, "float32"), models.load_tokenizer(tiny_model)
    prompts = ["What is 2 + 3?", "Tom has 4 apples and eats one. How many are left?", "Half of 48?"]
    runs, seen = [], []
    for after in (1000, 5):
        monkeypatch.setattr(models, "CONTINUE_AFTER", after)
        runs.append(
            models.generate(
                model, tokenizer, prompts, max_new_tokens=12, batch_size=2, progress=lambda *a: seen.append(a)
            )
        )
        runs[-1] = [[(c["text"], c["tokens"], c["truncated"]) for c in out] for out in runs[-1]]
    assert runs[0] == runs[1] and any(tokens > 5 for out in runs[0] for _, tokens, _ in out)
    assert sum(done for done, _ in seen[:2]) == 3  # the first run's two batches


def forward_only_trainer():
    """A ``PrefixSharing`` trainer class over a stand-in for TRL whose own log-prob forward returns "trl"."""

    class TRL:
        def _get_per_token_logps_and_entropies(self, model, input_ids, *args, **kwargs):
            return "trl"

    class Trainer(PrefixSharing, TRL):
        args = SimpleNamespace(share_prompt=True)
        accelerator = SimpleNamespace(unwrap_model=lambda model: model, autocast=contextlib.nullcontext)

    return Trainer


def test_packed_forward_runs_on_a_cpu_and_leaves_other_devices_to_trl():
    """The device branch of ``PrefixSharing._get_per_token_logps_and_entropies``: packed on a CPU, TRL's own forward
    elsewhere (a GPU's flash attention cannot take the block mask: README) or with ``share_prompt`` off."""

    Trainer = forward_only_trainer()
    model, width = small_llama(), 4
    model.config._attn_implementation = "sdpa"
    add_fused_lm_head(model)
    ids, mask = batch([([5, 6, 7], 2)], width)
    logps, _, _ = Trainer.__new__(Trainer)._get_per_token_logps_and_entropies(model, ids, mask, width)
    assert logps.shape == (2, width)
    assert (
        Trainer.__new__(Trainer)._get_per_token_logps_and_entropies(model, ids.to("meta"), mask.to("meta"), width)
        == "trl"
    )
    Trainer.args.share_prompt = False
    assert Trainer.__new__(Trainer)._get_per_token_logps_and_entropies(model, ids, mask, width) == "trl"


def test_sampler_logps_are_the_sampled_tokens_log_probs_and_nan_for_an_appended_eos(monkeypatch):
    """``generate_grouped`` keeps log_softmax(logits / T) of each sampled token (what TRL's importance-sampling
    correction compares with the trained policy), and the EOS appended after a closed answer gets NaN."""
    from grpo_math import rollouts

    class StopFirstRowAfterThree:  # the loop asks rows in order: row 0 is the first of length 3
        def __init__(self, *args):
            self.fired = False

        def __call__(self, tokens):
            if len(tokens) == 3 and not self.fired:
                self.fired = True
                return "answer"
            return None

    monkeypatch.setattr(rollouts, "AnswerStop", StopFirstRowAfterThree)
    model, eos, temperature = small_llama(), 299, 0.7
    config = GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=6, eos_token_id=eos, pad_token_id=2
    )
    prompts = [[5, 6, 7], [5, 6, 7], [8, 9, 10, 11]]
    torch.manual_seed(1)
    rows, logps = generate_grouped(model, prompts, config, 2, [eos], stop=(None, "tags"), sampler_logps=True)
    assert rows[0][-1] == eos and len(rows[0]) == 4 and [len(r) for r in rows[1:]] == [6, 6]
    assert logps[0][3] != logps[0][3] and all(lp == lp for row in logps for lp in row[:3])  # NaN: not sampled
    for prompt, row, lps in zip(prompts, rows, logps):
        sampled = row[:3] if row is rows[0] else row
        with torch.no_grad():
            logits = model(torch.tensor([prompt + sampled])).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(sampled)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(lps[: len(sampled)]), expected, atol=1e-4, rtol=0)


def test_an_appended_eos_stays_in_the_completion_but_out_of_the_loss():
    nan = float("nan")

    class TRL:
        def _generate(self, prompts):
            return [[1], [1]], [[5, 6, 2], [7, 2]], None, ["a", "b"], [[-0.1, -0.2, nan], [-0.3, -0.4]], {}, None, []

    class Trainer(PrefixSharing, TRL):
        args = SimpleNamespace(use_vllm=False)

    prompt_ids, completion_ids, token_mask, *_ = Trainer.__new__(Trainer)._generate(["p", "p"])
    assert completion_ids == [[5, 6, 2], [7, 2]] and token_mask == [[1, 1, 0], [1, 1]]


LOGPS = PrefixSharing._logps


def one_corrected_step(tiny_model, out, bf16, monkeypatch):
    """One smoke-recipe step on the tiny model, rewarded for short completions (the recipe's rewards are all 0
    there, and so would be the loss): its metrics line and the models each log-prob forward ran."""
    from grpo_math import rewards

    monkeypatch.setitem(rewards.REWARDS, "length", functools.partial(rewards.make_length, soft=5, hard=80))
    forwards, logps = [], LOGPS
    monkeypatch.setattr(
        PrefixSharing, "_logps", lambda self, model, *a, **k: [forwards.append(model), logps(self, model, *a, **k)][1]
    )
    flags = ["train", "--config", "recipes/smoke.yaml", "--model_name_or_path", tiny_model, "--output_dir", str(out)]
    flags += ["--max_steps", "1", "--max_completion_length", "12", "--save_steps", "100", "--bf16", bf16]
    assert cli.main([*flags, "--reward_funcs", "length"]) == 0
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0]), forwards


@pytest.mark.parametrize("bf16", ["true", "false"])
def test_mixed_precision_rollouts_get_trls_importance_sampling_correction(
    bf16, tiny_model, tmp_path, cpu_bf16, monkeypatch
):
    """With a mixed-precision loss the sampler is another numerical policy: TRL's correction runs (its metrics are
    logged only inside it); in fp32 nothing is off-policy. Either way the step runs one policy forward with
    gradients and one of the reference model, no old-policy forward (on policy: ``correct_in_loss``)."""
    log, forwards = one_corrected_step(tiny_model, tmp_path, bf16, monkeypatch)
    corrected = "sampling/importance_sampling_ratio/mean" in log
    assert corrected == (bf16 == "true"), sorted(log)
    assert len(forwards) == 2
    if corrected:
        assert 0 <= log["sampling/sampling_logp_difference/mean"] < 0.5


def test_the_correction_from_the_loss_forward_is_trls(tiny_model, tmp_path, cpu_bf16, monkeypatch):
    """On policy, the importance-sampling ratio computed from the loss forward's detached log-probs gives the step
    TRL's old-policy forward gives: same loss, gradient norm and correction metrics, one forward fewer."""
    ours, ours_forwards = one_corrected_step(tiny_model, tmp_path / "in-loss", "true", monkeypatch)
    monkeypatch.setattr(PrefixSharing, "_on_policy", lambda self: False)
    trls, trls_forwards = one_corrected_step(tiny_model, tmp_path / "trl", "true", monkeypatch)
    assert len(trls_forwards) == len(ours_forwards) + 1
    keys = ["loss", "grad_norm", "reward"] + [k for k in trls if k.startswith("sampling/")]
    assert len(keys) == 8 and {k: ours[k] for k in keys} == pytest.approx(
        {k: trls[k] for k in keys}, rel=1e-5, abs=1e-9
    )


@pytest.mark.parametrize("window,packed", [(4, False), (1000, True)])
def test_a_sliding_window_shorter_than_the_batch_leaves_the_forward_to_trl(window, packed):
    """transformers applies no window to a custom 4D mask: a packed forward is exact only where the window never
    bites (it is at least the batch's token count), and TRL's path runs otherwise."""
    from transformers import MistralConfig, MistralForCausalLM

    Trainer = forward_only_trainer()
    config = MistralConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=window, pad_token_id=2,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    model = MistralForCausalLM(config)
    add_fused_lm_head(model)
    ids, mask = batch([([5, 6, 7, 8, 9], 2)], 4)
    out = Trainer.__new__(Trainer)._get_per_token_logps_and_entropies(model, ids, mask, 4)
    assert (out != "trl") == packed


class Bigram(torch.nn.Module):
    """A stand-in language model whose next token is ``following[last token]`` (else ``default``), whatever the other
    rows and the cache hold: a script for the decode loop."""

    def __init__(self, following: dict[int, int], default: int, vocab: int):
        super().__init__()
        self.config = LlamaConfig(vocab_size=vocab, hidden_size=8, num_hidden_layers=1, num_attention_heads=1)
        self.table = torch.full((vocab,), default)
        self.table[list(following)] = torch.tensor(list(following.values()))

    device, dtype = torch.device("cpu"), torch.float32

    def forward(self, input_ids, past_key_values=None, **kwargs):
        logits = torch.full((len(input_ids), 1, len(self.table)), -1e4)
        logits[torch.arange(len(input_ids)), 0, self.table[input_ids[:, -1]]] = 0.0
        return SimpleNamespace(logits=logits)


def test_answer_stop_on_a_continued_row_reads_what_the_first_round_wrote(tokenizer):
    """A row continued after a first round (``models.generate``) has its answer's opening in its prompt: the stop
    rule must read the completion from where it began (``already``), or it never sees the answer close."""
    prompt = tokenizer("What is 2 + 2?\n", add_special_tokens=False).input_ids
    first = tokenizer("<think>\n2 + 2 = 4\n</think>\n<answer>4", add_special_tokens=False).input_ids
    close = tokenizer("</answer>", add_special_tokens=False).input_ids
    more, eos = tokenizer(" more", add_special_tokens=False).input_ids[0], tokenizer.eos_token_id
    script = [first[-1], *close, more]
    model = Bigram(dict(zip(script, script[1:])), more, len(tokenizer))
    config = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    row = [prompt + first]
    continued = generate_grouped(model, row, config, eos, [eos], stop=(tokenizer, "tags"), already=[len(first)])
    blind = generate_grouped(model, row, config, eos, [eos], stop=(tokenizer, "tags"))
    assert continued == [[*close, eos]] and blind == [[*close, *[more] * (8 - len(close))]]


@pytest.mark.parametrize(
    "dtype, onednn",
    [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, True), (torch.float32, False)],
    ids=str,
)
def test_packed_linears_give_the_same_logits_and_leave_the_model_as_it_was(dtype, onednn, monkeypatch):
    """``packed_linears`` (oneDNN with the weights reordered once, q/k/v and gate/up as one product each) computes
    what ``F.linear`` computes, at SmolLM2-135M's widths for a prefill and for decode steps of 1, 16 and 64 rows: in
    bf16 bit for bit, in fp32 within fp32 rounding (oneDNN sums in another order than MKL); it runs 4 products a
    layer (not 7) plus the head; afterwards the model's layers are plain ``nn.Linear`` again (training needs their
    gradients). On a CPU without oneDNN's bf16 kernels (AVX2 alone) a bf16 model is not packed, without oneDNN
    nothing is."""
    from grpo_math import kernels

    if onednn and dtype not in kernels.onednn_dtypes():
        pytest.skip(f"this CPU has no oneDNN {dtype} kernels: the packed branch cannot run here")
    if dtype == torch.bfloat16:
        monkeypatch.setattr(kernels, "onednn_bf16", lambda: onednn)
    elif not onednn:  # a PyTorch built without oneDNN
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    widths = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3}
    model = small_llama(std=0.05, attention_bias=True, **widths)  # biases, as Qwen2's q/k/v have
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p.data)
    model = model.to(dtype).eval()
    products, product = [], torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: products.append(1) or product(*a))
    for rows, length in [(3, 9), (1, 1), (16, 1), (64, 1)]:
        ids = torch.randint(3, 300, (rows, length))
        with torch.no_grad():
            plain = model(input_ids=ids).logits
            with kernels.packed_linears(model, rows):
                assert ("forward" in model.model.layers[0].mlp.up_proj.__dict__) == onednn
                products.clear()
                packed = model(input_ids=ids).logits
        if dtype == torch.bfloat16:
            assert torch.equal(plain, packed), (rows, length)
        else:
            torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5, msg=f"{rows} rows, {length} tokens")
        assert len(products) == (4 * len(model.model.layers) + 1 if onednn else 0)
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("token_truncate", [[0.5, 2.0, 1.0]]),
        ("token_mask", [[0.0, 0.0, 1.0]]),
        ("sequence_truncate", [[2.0]]),
        ("sequence_mask", [[0.0]]),
    ],
)
def test_the_correction_in_the_loss_truncates_or_masks_as_trls_modes_say(mode, expected):
    """``_correct`` with the loss forward's log-probs: per-token or per-sequence ratios exp(policy - sampler),
    clipped to [0.5, 2] or zeroed outside it, as TRL's ``vllm_importance_sampling_mode``; a NaN sampler log-prob (an
    appended EOS) and the padding count as no correction."""
    from collections import defaultdict

    class Trainer(PrefixSharing):
        vllm_importance_sampling_mode, vllm_importance_sampling_clip_min, vllm_importance_sampling_clip_max = (
            mode,
            0.5,
            2.0,
        )
        accelerator, model = SimpleNamespace(gather=lambda t: t), SimpleNamespace(training=True)
        _metrics = {"train": defaultdict(list)}

    nan = float("nan")
    inputs = {
        "completion_mask": torch.tensor([[1, 1, 1, 0]]),
        "sampling_per_token_logps": torch.tensor([[-1.0, -3.0, nan, 0.0]]),
    }
    logps = torch.tensor([[-2.0, -1.0, -0.5, -9.0]], requires_grad=True)  # ratios e^-1, e^2, (NaN), (padding)
    trainer = Trainer.__new__(Trainer)
    trainer._correct(inputs, logps)
    ratio = inputs["importance_sampling_ratio"]
    assert not ratio.requires_grad
    torch.testing.assert_close(ratio[:, :3] if ratio.shape[1] > 1 else ratio, torch.tensor(expected))
    assert trainer._metrics["train"]["sampling/sampling_logp_difference/max"] == [2.0]
