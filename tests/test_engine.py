"""Exactness of the cache engine against no cache and against an independent reference."""

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from reference import reference_forward

from vlacache import CachedVLA, CacheEngine, Observation, ReusePlan, StatsRequest
from vlacache.backbones.common.prismatic import cache_keyword
from vlacache.types import Span, TokenLayout, VisionSpan

L = 40
LAYOUT = TokenLayout(length=L, vision={"cam": VisionSpan(1, 26, rows=5, cols=5, patch_size=14)}, text=Span(26, L))


def run_step(lm, engine, embeds, plan, request=StatsRequest()):
    cache = engine.begin_step(plan, LAYOUT, embeds.shape[0], request)
    kw = {cache_keyword(lm.forward): cache}
    out = lm(inputs_embeds=embeds, position_ids=torch.arange(embeds.shape[1])[None], use_cache=True, **kw)
    return out.logits, cache


def nested_plan(batch=2):
    """Different sets per batch element and per layer, nested, equal counts per layer."""
    a = [[3, 4], [3, 4, 10, 11, 20], [3, 4, 10, 11, 20, 21, 22], [3, 4, 10, 11, 20, 21, 22]]
    b = [[5, 9], [5, 9, 12, 13, 14], [1, 5, 9, 12, 13, 14, 25], [1, 5, 9, 12, 13, 14, 25]]
    return ReusePlan([torch.tensor([x, y][:batch]) for x, y in zip(a, b)])


def two_steps(seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    e1 = torch.randn(batch, L, 64, generator=g)
    e2 = e1.clone()
    e2[:, 8:16] += 0.5 * torch.randn(batch, 8, 64, generator=g)  # some "moving" visual tokens
    e2[:, 26:] += 0.2 * torch.randn(batch, L - 26, 64, generator=g)  # text changes too: exercises the probe rows
    return e1, e2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_zero_reuse_is_bit_identical_to_detached(attn):
    lm = tiny_llama(attn)
    e1, e2 = two_steps()
    with torch.no_grad():
        plain = [lm(inputs_embeds=e).logits for e in (e1, e2)]
        with CacheEngine(lm.model) as engine:
            for e, expected in zip((e1, e2), plain):
                logits, _ = run_step(lm, engine, e, None)
                engine.end_step()
                assert torch.equal(logits, expected)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_realistic_reuse_matches_overwrite_reference(attn, kv_heads):
    lm = tiny_llama(attn, kv_heads=kv_heads)
    e1, e2 = two_steps()
    plan = nested_plan()
    positions = torch.arange(L)
    with torch.no_grad(), CacheEngine(lm.model) as engine:
        run_step(lm, engine, e1, None)
        engine.end_step()
        previous = {i: (k.clone(), v.clone()) for i, (k, v) in engine.episode.prompt_kv.items()}
        logits, cache = run_step(lm, engine, e2, plan)
        engine.end_step()
        _, ref_kv1, _ = reference_forward(lm, e1, positions)
        ref_logits, _, _ = reference_forward(lm, e2, positions, reused=plan.reused, previous_kv=ref_kv1)
    for layer, reused in enumerate(plan.reused):
        for b in range(2):
            k, v = cache.prefill_kv[layer]
            assert torch.equal(k[b][:, reused[b]], previous[layer][0][b][:, reused[b]])
            assert torch.equal(v[b][:, reused[b]], previous[layer][1][b][:, reused[b]])
    deepest = plan.reused[-1]
    # float rounding only: sdpa's blocked CPU kernels round differently on query blocks of another row count
    # (measured up to 1.1e-5 on logits of magnitude 6 on an AVX2-only CPU), far below the sensitivity below
    atol = 1e-5 * float(ref_logits.abs().max().clamp_min(1.0))
    for b in range(2):
        kept = torch.ones(L, dtype=torch.bool)
        kept[deepest[b]] = False
        torch.testing.assert_close(logits[b][kept], ref_logits[b][kept], atol=atol, rtol=0)
    # the reference is sensitive: the same plan without the overwrite gives clearly different logits
    assert (reference_forward(lm, e2, positions)[0][:, -1] - ref_logits[:, -1]).abs().max() > 1e-3


def test_decode_after_cached_prefill_uses_right_positions():
    lm = tiny_llama()
    e1, e2 = two_steps(batch=1)
    plan = nested_plan(batch=1)
    kw = cache_keyword(lm.forward)
    positions = torch.arange(L)
    with torch.no_grad(), CacheEngine(lm.model) as engine:
        run_step(lm, engine, e1, None)
        engine.end_step()
        logits, cache = run_step(lm, engine, e2, plan)
        _, ref_kv1, _ = reference_forward(lm, e1, positions)
        ref_logits, ref_kv, _ = reference_forward(lm, e2, positions, reused=plan.reused, previous_kv=ref_kv1)
        token = logits[:, -1].argmax(-1)
        emb = lm.get_input_embeddings()(token)[:, None]
        at_zero, _, _ = reference_forward(lm, emb, torch.tensor([0]), past=ref_kv)
        for i in range(7):
            emb = lm.get_input_embeddings()(token)[:, None]
            out = lm(inputs_embeds=emb, position_ids=torch.tensor([[L + i]]), use_cache=True, **{kw: cache})
            ref_step, ref_kv, _ = reference_forward(lm, emb, torch.tensor([L + i]), past=ref_kv)
            torch.testing.assert_close(out.logits[:, -1], ref_step[:, -1], atol=1e-5, rtol=0)
            if i == 0:  # decoding at RoPE position 0 (the reference code's defect) would be detectably different
                assert (out.logits[:, -1] - at_zero[:, -1]).abs().max() > 1e-3
            token = out.logits[:, -1].argmax(-1)
        engine.end_step()
    assert engine.episode.prompt_kv[0][0].shape[2] == L  # the stored prompt K/V excludes decoded tokens


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_probe_under_reuse_matches_the_reference_attention(kv_heads):
    """The probe's text rows at every layer of a cached step: query rows recomputed at kept positions, keys
    spliced from the previous step, as the independent reference computes them."""
    lm = tiny_llama(kv_heads=kv_heads)
    e1, e2 = two_steps()
    plan = nested_plan()
    positions, text = torch.arange(L), LAYOUT.text.positions()
    with torch.no_grad(), CacheEngine(lm.model) as engine:
        run_step(lm, engine, e1, None)
        engine.end_step()
        run_step(lm, engine, e2, plan)
        stats = engine.end_step().stats
        _, kv1, _ = reference_forward(lm, e1, positions)
        attentions = []
        reference_forward(lm, e2, positions, reused=plan.reused, previous_kv=kv1, attentions=attentions)
        plain = []
        reference_forward(lm, e2, positions, attentions=plain)
    for layer, probs in enumerate(attentions):
        rows = probs[:, :, text]
        torch.testing.assert_close(stats.to_keys[layer], rows.mean(dim=(1, 2)), atol=1e-5, rtol=0)
        entropy = -(rows * rows.clamp_min(1e-12).log()).sum(-1).mean(dim=(1, 2))
        torch.testing.assert_close(stats.entropy[layer], entropy, atol=1e-4, rtol=0)
    # sensitive: without the splice the deeper layers' attention differs
    assert (plain[-1][:, :, text].mean(dim=(1, 2)) - stats.to_keys[len(plain) - 1]).abs().max() > 1e-4


def test_probe_records_only_the_requested_layers():
    lm = tiny_llama()
    e1, _ = two_steps()
    with torch.no_grad(), CacheEngine(lm.model) as engine:
        run_step(lm, engine, e1, None, request=StatsRequest(layers=(1, 3)))
        assert sorted(engine.end_step().stats.entropy) == [1, 3]
        run_step(lm, engine, e1, None, request=None)
        assert engine.end_step().stats is None


def test_probe_matches_eager_output_attentions():
    lm = tiny_llama("sdpa")
    eager = tiny_llama("eager")
    e1, _ = two_steps()
    text = LAYOUT.text.positions()
    with torch.no_grad():
        attentions = eager(inputs_embeds=e1, output_attentions=True).attentions
        with CacheEngine(lm.model) as engine:
            run_step(lm, engine, e1, None)
            stats = engine.end_step().stats
    for layer, probs in enumerate(attentions):
        rows = probs[:, :, text]
        torch.testing.assert_close(stats.to_keys[layer], rows.mean(dim=(1, 2)), atol=1e-5, rtol=0)
        entropy = -(rows * rows.clamp_min(1e-12).log()).sum(-1).mean(dim=(1, 2))
        torch.testing.assert_close(stats.entropy[layer], entropy, atol=1e-4, rtol=0)


def test_identical_frames_everything_reused_matches_full(tiny, frames):
    layers = len(tiny.decoder.layers)
    obs = frames[2]
    baseline = CachedVLA(tiny, None).predict(obs)
    with CachedVLA(tiny, None) as vla:
        vla.engine.attach()
        first = vla.predict(obs)
        layout = tiny.prepare(obs).layout
        everything = layout.vision["primary"].positions()[None]
        second = vla.predict(obs, plan=ReusePlan([everything] * layers))
    assert second.stats.reused_per_layer == [256] * layers
    assert torch.equal(first.logits, baseline.logits)
    torch.testing.assert_close(second.logits, baseline.logits, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(second.actions, baseline.actions)


def test_openvla_zero_reuse_bit_identical_and_policy_reuse_reference(tiny, frames):
    """Through the real backbone: zero reuse is bit-identical; a policy's plan matches the reference."""
    baseline = CachedVLA(tiny, None)
    with CachedVLA(tiny, None) as vla:
        vla.engine.attach()
        for obs in frames[:3]:
            a, b = baseline.predict(obs), vla.predict(obs, plan=ReusePlan.empty(1, len(tiny.decoder.layers)))
            assert torch.equal(a.logits, b.logits)
            np.testing.assert_array_equal(a.actions, b.actions)
    from vlacache import attach

    lm = tiny.model.language_model
    with attach(tiny, "static_reuse") as vla:
        embeds = [tiny.embed(tiny.prepare(o)) for o in frames[:2]]
        vla.predict(frames[0])
        step = vla.predict(frames[1])
    assert 0 < step.stats.reuse_ratio < 1
    positions = torch.arange(embeds[0].shape[1])
    with torch.no_grad():
        _, kv1, _ = reference_forward(lm, embeds[0], positions)
        ref, _, _ = reference_forward(lm, embeds[1], positions, reused=step.plan.reused, previous_kv=kv1)
    torch.testing.assert_close(step.logits, ref[:, -1], atol=1e-5, rtol=0)


def test_first_step_is_full_and_reset_forgets(tiny, frames):
    with attach_static(tiny) as vla:
        first = vla.predict(frames[0])
        assert first.stats.reused_per_layer == [0] * len(tiny.decoder.layers)
        assert first.stats.episode_reset
        second = vla.predict(frames[1])
        assert sum(second.stats.reused_per_layer) > 0
        vla.reset()
        assert vla.engine.episode.previous_images is None and not vla.engine.episode.prompt_kv
        again = vla.predict(frames[1])
        assert again.stats.reused_per_layer == [0] * len(tiny.decoder.layers)
        assert torch.equal(again.logits, CachedVLA(tiny, None).predict(frames[1]).logits)


def attach_static(backbone):
    from vlacache import attach

    return attach(backbone, "static_reuse")


@pytest.mark.parametrize("change", ["instruction", "batch", "image_size"])
def test_automatic_reset(tiny, frames, change):
    with attach_static(tiny) as vla:
        vla.predict(frames[0])
        assert sum(vla.predict(frames[1]).stats.reused_per_layer) > 0
        image = frames[2].images["primary"]
        if change == "instruction":
            obs = Observation({"primary": image}, "open the top drawer")
        elif change == "batch":
            obs = Observation({"primary": np.stack([image, image])}, frames[2].instruction)
        else:
            obs = Observation({"primary": image[:200, :200]}, frames[2].instruction)
        step = vla.predict(obs)
        assert step.stats.episode_reset
        assert sum(step.stats.reused_per_layer) == 0


def hooks_on(module):
    return len(module._forward_pre_hooks) + len(module._forward_hooks)


def test_engine_rejects_unsupported_attention_and_detaches():
    lm = tiny_llama("sdpa")
    lm.model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa"):
        CacheEngine(lm.model)
    lm.model.config._attn_implementation = "sdpa"
    engine = CacheEngine(lm.model).attach()
    e1, _ = two_steps(batch=1)
    with torch.no_grad():
        run_step(lm, engine, e1, None)
    assert sum(hooks_on(m) for m in lm.modules()) > 0  # mid-step
    engine.detach()
    assert sum(hooks_on(m) for m in lm.modules()) == 0


def test_hooks_only_on_the_layers_a_step_needs_and_none_after_it():
    """A step carries hooks on the layers that reuse (or probe) only; between steps the model carries none."""
    lm = tiny_llama()
    e1, e2 = two_steps(batch=1)
    layers = lm.model.layers
    deep_only = ReusePlan([torch.zeros(1, 0, dtype=torch.long)] * 2 + [torch.tensor([[3, 4, 10]])] * 2)
    with torch.no_grad(), CacheEngine(lm.model) as engine:
        assert sum(hooks_on(m) for m in lm.modules()) == 0  # attached, no step yet
        run_step(lm, engine, e1, None, request=None)  # full step, no statistics: the decoder's hook alone
        assert [hooks_on(layer) + hooks_on(layer.self_attn.q_proj) for layer in layers] == [0, 0, 0, 0]
        assert engine.hooks_attached == 1
        engine.end_step()
        assert sum(hooks_on(m) for m in lm.modules()) == 0
        cache = engine.begin_step(deep_only, LAYOUT, 1, None)
        assert [hooks_on(layer) for layer in layers] == [0, 0, 1, 1]
        assert [hooks_on(layer.self_attn.q_proj) for layer in layers] == [0, 0, 0, 0]
        lm(inputs_embeds=e2, position_ids=torch.arange(L)[None], use_cache=True,
           **{cache_keyword(lm.forward): cache})
        engine.end_step()
        assert sum(hooks_on(m) for m in lm.modules()) == 0
        run_step(lm, engine, e2, None, request=StatsRequest(layers=(1,)))  # a probe of layer 1
        assert [hooks_on(layer) for layer in layers] == [0, 1, 0, 0]
        assert [hooks_on(layer.self_attn.q_proj) for layer in layers] == [0, 1, 0, 0]
        engine.end_step()
        assert sum(hooks_on(m) for m in lm.modules()) == 0


def test_plan_that_is_not_nested_is_rejected():
    lm = tiny_llama()
    e1, e2 = two_steps(batch=1)
    bad = ReusePlan([torch.tensor([[3, 4]]), torch.tensor([[3, 5]]), torch.tensor([[3, 5]]), torch.tensor([[3, 5]])])
    with torch.no_grad(), CacheEngine(lm.model) as engine:
        run_step(lm, engine, e1, None)
        engine.end_step()
        with pytest.raises(ValueError, match="not nested"):
            engine.begin_step(bad, LAYOUT, 1)


def test_a_step_that_raised_mid_prefill_resets_the_episode(tiny, frames):
    with attach_static(tiny) as vla:
        vla.predict(frames[0])
        original = tiny.prefill

        def broken(*args, **kwargs):
            raise RuntimeError("simulated failure inside the model")

        tiny.prefill = broken
        try:
            with pytest.raises(RuntimeError, match="simulated"):
                vla.predict(frames[1])
        finally:
            tiny.prefill = original
        step = vla.predict(frames[2])
    assert step.stats.episode_reset and sum(step.stats.reused_per_layer) == 0
    assert torch.equal(step.logits, CachedVLA(tiny, None).predict(frames[2]).logits)


def test_statistics_reach_the_host_in_one_transfer_with_values_and_dtypes_kept():
    from vlacache.engine.hooks import in_one_transfer, on_host

    to_keys = {0: torch.rand(2, 7, dtype=torch.float64), 3: torch.rand(2, 7).to(torch.bfloat16)}
    entropy = {0: torch.rand(2), 3: torch.rand(2, dtype=torch.float16)}
    moved = in_one_transfer((to_keys, entropy), torch.device("cpu"))
    for before, after in zip((to_keys, entropy), moved):
        assert list(after) == list(before)
        for layer in before:
            assert after[layer].dtype == before[layer].dtype and torch.equal(after[layer], before[layer])
    same = on_host(to_keys, entropy)  # already on the CPU: returned as they are
    assert same[0] is to_keys and same[1] is entropy
