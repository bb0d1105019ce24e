"""Dropping visual tokens inside the forward: exact against the independent reference with
the dropped keys masked, composed with reuse, through decode passes, FastV's ranking, batches of episodes."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from reference import fastv_dropped, reference_forward
from test_engine import LAYOUT, L, nested_plan, run_step, two_steps

from vlacache import CachedVLA, CacheEngine, CachePolicy, PruneRule, ReusePlan
from vlacache.backbones.common.prismatic import cache_keyword

VISUAL = LAYOUT.vision["cam"].positions()  # positions 1..25


@dataclass(frozen=True)
class FirstEligible:
    """Drops the first `n` eligible visual tokens (by position): a rule whose choice the test knows."""

    n: int

    def __call__(self, attention, eligible):
        order = torch.sort((~eligible).float() * 1e6 + torch.arange(eligible.shape[1]), dim=1).indices
        return order[:, : self.n]


def dropped_mask(plan, rule, batch):
    """The positions the rule drops: the first n visual tokens that no layer of the plan reuses."""
    busy = torch.zeros(batch, L, dtype=torch.bool)
    if plan.reused[-1].shape[1]:
        busy.scatter_(1, plan.reused[-1], True)
    eligible = ~busy[:, VISUAL]
    chosen = rule.choose(torch.zeros(batch, 1, len(VISUAL)), eligible)
    mask = torch.zeros(batch, L, dtype=torch.bool)
    return mask.scatter_(1, VISUAL[chosen], True)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("with_reuse", [False, True])
def test_dropped_tokens_match_the_masked_reference(attn, with_reuse):
    lm = tiny_llama(attn, kv_heads=2)
    e1, e2 = two_steps()
    rule = PruneRule(2, FirstEligible(6))
    plan = nested_plan() if with_reuse else ReusePlan.empty(2, 4)
    plan.prune = (rule,)
    drop = dropped_mask(plan, rule, 2)
    per_layer = [None, None, drop, drop]
    positions = torch.arange(L)
    with torch.no_grad(), CacheEngine(lm.model) as engine:
        run_step(lm, engine, e1, None)
        engine.end_step()
        logits, cache = run_step(lm, engine, e2, plan)
        record = engine.end_step()
        _, ref_kv1, _ = reference_forward(lm, e1, positions)
        ref_logits, _, _ = reference_forward(lm, e2, positions, reused=plan.reused if with_reuse else None,
                                             previous_kv=ref_kv1, dropped=per_layer)
    assert record.dropped_per_layer == [0, 0, 6, 6]
    assert torch.equal(engine.episode.signals["void"], drop)
    text = LAYOUT.text.positions()
    torch.testing.assert_close(logits[:, text], ref_logits[:, text], atol=1e-5, rtol=0)
    # sensitive: without the drop the reference differs
    plain, _, _ = reference_forward(lm, e2, positions, reused=plan.reused if with_reuse else None, previous_kv=ref_kv1)
    assert (plain[:, -1] - ref_logits[:, -1]).abs().max() > 1e-4


def test_decode_passes_do_not_see_dropped_keys():
    lm = tiny_llama()
    e1, _ = two_steps(batch=1)
    rule = PruneRule(1, FirstEligible(10))
    plan = ReusePlan.empty(1, 4)
    plan.prune = (rule,)
    drop = dropped_mask(plan, rule, 1)
    per_layer = [None, drop, drop, drop]
    kw = cache_keyword(lm.forward)
    with torch.no_grad(), CacheEngine(lm.model) as engine:
        logits, cache = run_step(lm, engine, e1, plan)
        ref_logits, ref_kv, _ = reference_forward(lm, e1, torch.arange(L), dropped=per_layer)
        token = logits[:, -1].argmax(-1)
        for i in range(5):
            emb = lm.get_input_embeddings()(token)[:, None]
            out = lm(inputs_embeds=emb, position_ids=torch.tensor([[L + i]]), use_cache=True, **{kw: cache})
            ref_step, ref_kv, _ = reference_forward(lm, emb, torch.tensor([L + i]), past=ref_kv, dropped=per_layer)
            torch.testing.assert_close(out.logits[:, -1], ref_step[:, -1], atol=1e-5, rtol=0)
            token = out.logits[:, -1].argmax(-1)
        engine.end_step()


def test_fastv_drops_the_tokens_the_last_position_attends_to_least():
    """FastV's official selection (its inplace mode): at layer K the visual tokens the last position attends to
    least in layer K-1, averaged over heads; the lowest R of them, on attention from the independent forward."""
    lm = tiny_llama("eager")
    e1, _ = two_steps(batch=2)
    policy = CachePolicy.from_config({"label": "fastv", "pruner": {"name": "fastv", "layer": 2, "ratio": 0.5}})
    from vlacache.strategy import PlanContext

    plan = policy.plan(PlanContext(step=0, batch_size=2, num_layers=4, layout=LAYOUT, current={}, previous=None, stats=None))
    assert plan.is_empty and [r.layer for r in plan.prune] == [2]
    with torch.no_grad(), CacheEngine(lm.model) as engine:
        run_step(lm, engine, e1, plan)
        record = engine.end_step()
        attentions = []
        reference_forward(lm, e1, torch.arange(L), attentions=attentions)
    assert torch.equal(engine.episode.signals["void"], fastv_dropped(attentions[1], VISUAL, L))  # ranked in layer 1
    assert record.dropped_per_layer == [0, 0, 12, 12]


STATIC_FASTV = {"label": "static+fastv", "selector": {"name": "pixel-cosine", "tau": 0.99, "top_k": None},
                "relevance": {"name": "none"}, "scheduler": {"name": "constant", "fraction": 1.0, "start_layer": 2},
                "gate": {"name": "full-first-step"}, "pruner": {"name": "fastv", "layer": 1, "ratio": 0.25}}


def test_reuse_and_pruning_compose_and_void_tokens_are_never_reused(tiny, frames):
    with CachedVLA(tiny, CachePolicy.from_config(STATIC_FASTV)) as vla:
        results = [vla.predict(f) for f in frames]
    layers = len(tiny.decoder.layers)
    num_visual = results[0].stats.num_visual
    length = results[0].stats.tokens_per_layer[0]  # layer 0: nothing reused (start_layer 2), nothing dropped
    for r in results:
        dropped, reused = r.stats.dropped_per_layer, r.stats.reused_per_layer
        assert dropped == [0] + [num_visual // 4] * (layers - 1)
        assert r.stats.tokens_per_layer == [length - c - d for c, d in zip(reused, dropped)]
    assert any(r.stats.reuse_ratio > 0 for r in results[1:])


def test_pruned_batch_equals_separate_runs(tiny, frames):
    images = [f.images["primary"] for f in frames]
    streams = [images, images[::-1]]
    instruction = frames[0].instruction
    from vlacache import Observation

    alone = []
    for stream in streams:
        with CachedVLA(tiny, CachePolicy.from_config(STATIC_FASTV)) as vla:
            alone.append([vla.predict(Observation({"primary": im}, instruction)) for im in stream])
    with CachedVLA(tiny, CachePolicy.from_config(STATIC_FASTV)) as vla:
        for t in range(len(images)):
            step = vla.predict(Observation({"primary": np.stack([s[t] for s in streams])}, [instruction] * 2))
            for b in range(2):
                torch.testing.assert_close(step.logits[b], alone[b][t].logits[0], atol=1e-4, rtol=0)
                np.testing.assert_allclose(step.actions[b], alone[b][t].actions[0], atol=1e-5)


def test_pruning_settings_are_checked(tiny):
    from vlacache import ConfigError

    with pytest.raises(ConfigError, match="layer must be >= 1"):
        CachedVLA(tiny, CachePolicy.from_config({"label": "x", "pruner": {"name": "fastv", "layer": 0}}))
    with pytest.raises(ConfigError, match="ratio"):
        CachedVLA(tiny, CachePolicy.from_config({"label": "x", "pruner": {"name": "fastv", "ratio": 1.5}}))



def expected_raters_drop(attention_layer, eligible, count):
    """SparseVLM's choice recomputed from the reference's attention probabilities [B, H, L, L] of one layer."""
    text = LAYOUT.text.positions()
    rows = attention_layer.mean(1)[:, text][:, :, VISUAL]  # [B, n_text, V]
    to_image = rows.mean(-1)
    raters = (to_image >= to_image.mean(1, keepdim=True)).float()
    scores = (rows * raters[..., None]).sum(1) / raters.sum(1, keepdim=True)
    lowest = scores.masked_fill(~eligible, float("inf")).topk(count, dim=1, largest=False).indices
    return torch.zeros(eligible.shape[0], L, dtype=torch.bool).scatter_(1, VISUAL[lowest], True)


def test_text_raters_prune_progressively():
    lm = tiny_llama("eager")
    e1, _ = two_steps(batch=2)
    policy = CachePolicy.from_config({"label": "sparsevlm",
                                      "pruner": {"name": "text-raters", "layers": [1, 2], "ratios": [0.2, 0.2]}})
    from vlacache.strategy import PlanContext

    plan = policy.plan(PlanContext(step=0, batch_size=2, num_layers=4, layout=LAYOUT, current={}, previous=None, stats=None))
    with torch.no_grad(), CacheEngine(lm.model) as engine:
        run_step(lm, engine, e1, plan)
        record = engine.end_step()
        attentions = []
        reference_forward(lm, e1, torch.arange(L), attentions=attentions)
        first = expected_raters_drop(attentions[0], torch.ones(2, len(VISUAL), dtype=torch.bool), 5)
        attentions = []
        reference_forward(lm, e1, torch.arange(L), attentions=attentions, dropped=[None, first, first, first])
        second = expected_raters_drop(attentions[1], ~first[:, VISUAL], 5)
    assert record.dropped_per_layer == [0, 5, 10, 10]
    assert torch.equal(engine.episode.signals["void"], first | second)


def test_pruner_layers_must_fit_the_decoder(tiny):
    from vlacache import ConfigError

    with pytest.raises(ConfigError, match="absolute layers"):
        CachedVLA(tiny, CachePolicy.from_config({"label": "x", "pruner": {"name": "sparsevlm"}}))  # 2/32 -> 0 on 4 layers


def expected_mass_drop(attention_layer, eligible, keep_mass, cap):
    """The layer-dynamic choice recomputed row by row from the reference's attention [B, H, L, L] of one layer:
    per row the fewest tokens holding keep_mass of the eligible attention stay, the batch drops the smallest
    surplus (at most cap), lowest attention first."""
    text = LAYOUT.text.positions()
    scores = attention_layer.mean(1)[:, text][:, :, VISUAL].mean(1).double()  # [B, V]
    surplus = []
    for row in range(scores.shape[0]):
        values = sorted(scores[row][eligible[row]].tolist(), reverse=True)
        kept, mass = 0, 0.0
        while kept < len(values) and mass < keep_mass * sum(values):
            mass += values[kept]
            kept += 1
        surplus.append(len(values) - kept)
    count = min(min(surplus), cap)
    lowest = scores.masked_fill(~eligible, float("inf")).topk(count, dim=1, largest=False).indices
    return torch.zeros(eligible.shape[0], L, dtype=torch.bool).scatter_(1, VISUAL[lowest], True), count


def test_layer_dynamic_drops_what_lies_outside_the_attention_mass():
    lm = tiny_llama("eager")
    e1, _ = two_steps(batch=2)
    policy = CachePolicy.from_config({"label": "layer-dynamic", "pruner": {
        "name": "layer-dynamic", "layers": [1, 3], "keep_mass": 0.6, "max_ratio": 0.3}})
    from vlacache.strategy import PlanContext

    plan = policy.plan(PlanContext(step=0, batch_size=2, num_layers=4, layout=LAYOUT, current={}, previous=None, stats=None))
    cap = int(0.3 * len(VISUAL))
    with torch.no_grad(), CacheEngine(lm.model) as engine:
        run_step(lm, engine, e1, plan)
        record = engine.end_step()
        attentions = []
        reference_forward(lm, e1, torch.arange(L), attentions=attentions)
        first, n1 = expected_mass_drop(attentions[0], torch.ones(2, len(VISUAL), dtype=torch.bool), 0.6, cap)
        attentions = []
        reference_forward(lm, e1, torch.arange(L), attentions=attentions, dropped=[None, first, first, first])
        second, n2 = expected_mass_drop(attentions[2], ~first[:, VISUAL], 0.6, cap)
    assert 0 < n1 and 0 < n2  # the counts follow the attention, not a fixed ratio
    assert record.dropped_per_layer == [0, n1, n1, n1 + n2]
    assert torch.equal(engine.episode.signals["void"], first | second)
