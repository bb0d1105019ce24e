"""The engine on decoders other than Llama: tiny Qwen2 and Gemma2 from stock transformers.

Gemma2 alternates sliding-window (window 16 < 40 tokens) and global layers, with its own norms and scaling.

Reference: full compute of every row with stock modeling code, through a cache that overwrites the reused
rows with last step's K/V (no row dropping, no hooks). For Llama it is checked against the plain-torch
reference too, so the two references vouch for each other.
"""

import pytest
import torch
from reference import reference_forward
from transformers import (DynamicCache, Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from vlacache import CacheEngine, ReusePlan, StatsRequest
from vlacache.backbones.common.prismatic import cache_keyword
from vlacache.types import Span, TokenLayout, VisionSpan

L = 40
LAYOUT = TokenLayout(length=L, vision={"cam": VisionSpan(1, 26, rows=5, cols=5, patch_size=14)}, text=Span(26, L))
COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.2)


def build(kind, attn="sdpa"):
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**COMMON, attn_implementation=attn)).eval()
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**COMMON, attn_implementation=attn)).eval()
    cfg = Gemma2Config(**COMMON, head_dim=16, sliding_window=16, query_pre_attn_scalar=16, attn_implementation=attn,
                       attn_logit_softcapping=None, final_logit_softcapping=None)
    return Gemma2ForCausalLM(cfg).eval()


class OverwriteCache(DynamicCache):
    """Full compute; the reused rows of each layer's new K/V are replaced by last step's before attention."""

    def __init__(self, reused, previous, **kwargs):
        super().__init__(**kwargs)
        self.reused, self.previous = reused, previous

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.reused is not None and self.reused[layer_idx].shape[1]:
            key_states, value_states = key_states.clone(), value_states.clone()
            pk, pv = self.previous[layer_idx]
            for b, rows in enumerate(self.reused[layer_idx]):
                key_states[b, :, rows], value_states[b, :, rows] = pk[b, :, rows], pv[b, :, rows]
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def overwrite_reference(lm, embeds, reused=None, previous=None):
    cache = OverwriteCache(reused, previous)  # full-length layers, even for sliding-window attention
    out = lm(inputs_embeds=embeds, position_ids=torch.arange(L)[None], use_cache=True, **{cache_keyword(lm.forward): cache})
    kv = {i: (cache.layers[i].keys, cache.layers[i].values) for i in range(len(cache.layers))}
    return out.logits, kv


def steps(seed=1):
    g = torch.Generator().manual_seed(seed)
    e1 = torch.randn(2, L, 64, generator=g)
    e2 = e1.clone()
    e2[:, 8:16] += 0.5 * torch.randn(2, 8, 64, generator=g)
    e2[:, 26:] += 0.2 * torch.randn(2, L - 26, 64, generator=g)
    return e1, e2


PLAN = ReusePlan([
    torch.tensor([[3, 4], [5, 9]]),
    torch.tensor([[3, 4, 10, 11, 20], [5, 9, 12, 13, 14]]),
    torch.tensor([[3, 4, 10, 11, 20, 21, 22], [1, 5, 9, 12, 13, 14, 25]]),
    torch.tensor([[3, 4, 10, 11, 20, 21, 22], [1, 5, 9, 12, 13, 14, 25]]),
])


def cached_steps(lm, e1, e2, plan):
    kw = cache_keyword(lm.forward)
    with CacheEngine(lm.model) as engine:
        logits = []
        for embeds, p in ((e1, None), (e2, plan)):
            cache = engine.begin_step(p, LAYOUT, 2, StatsRequest())
            logits.append(lm(inputs_embeds=embeds, position_ids=torch.arange(L)[None], use_cache=True, **{kw: cache}).logits)
            engine.end_step()
    return logits


def test_overwrite_reference_agrees_with_the_plain_torch_reference():
    lm = build("llama")
    e1, e2 = steps()
    with torch.no_grad():
        _, kv1 = overwrite_reference(lm, e1)
        ours, _ = overwrite_reference(lm, e2, PLAN.reused, kv1)
        _, ref_kv1, _ = reference_forward(lm, e1, torch.arange(L))
        theirs, _, _ = reference_forward(lm, e2, torch.arange(L), reused=PLAN.reused, previous_kv=ref_kv1)
    torch.testing.assert_close(ours[:, -1], theirs[:, -1], atol=1e-5, rtol=0)


# transformers has no sdpa path for Gemma2: eager only
CASES = [("qwen2", "sdpa"), ("qwen2", "eager"), ("gemma2", "eager")]


@pytest.mark.parametrize("kind,attn", CASES)
def test_zero_reuse_is_bit_identical(kind, attn):
    lm = build(kind, attn)
    e1, e2 = steps()
    with torch.no_grad():
        plain = [lm(inputs_embeds=e, position_ids=torch.arange(L)[None]).logits for e in (e1, e2)]
        cached = cached_steps(lm, e1, e2, ReusePlan.empty(2, 4))
    for a, b in zip(plain, cached):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind,attn", CASES)
def test_realistic_reuse_matches_the_overwrite_reference(kind, attn):
    lm = build(kind, attn)
    e1, e2 = steps()
    with torch.no_grad():
        cached = cached_steps(lm, e1, e2, PLAN)[1]
        _, kv1 = overwrite_reference(lm, e1)
        reference, _ = overwrite_reference(lm, e2, PLAN.reused, kv1)
        unspliced, _ = overwrite_reference(lm, e2)
    for b in range(2):
        kept = torch.ones(L, dtype=torch.bool)
        kept[PLAN.reused[-1][b]] = False
        torch.testing.assert_close(cached[b][kept], reference[b][kept], atol=1e-5, rtol=0)
    assert (unspliced[:, -1] - reference[:, -1]).abs().max() > 1e-3  # the comparison can fail
