"""The `sparsevlm` pruner against a transcription of the official SparseVLM v2.0 selection.

The transcription is written from the official code's formulas (docs/REFERENCE_CODE.md, "Other methods"), on
attention recorded by the independent reference forward (tests/reference.py), stage after stage: each stage's
attention comes from a forward in which the tokens dropped so far are gone. The engine decides inside one
forward from its own recomputed queries. A 32-layer decoder, so the shipped layers (pruning after 2, 6, 15) are
the official ones; two batch rows with different inputs, each transcribed alone.
"""

import math

import pytest
import torch
from conftest import tiny_llama
from reference import _rope, _theta, reference_forward

from vlacache import CacheEngine
from vlacache.backbones.common.prismatic import cache_keyword
from vlacache.policy import CachePolicy
from vlacache.strategy import PlanContext
from vlacache.types import Span, TokenLayout, VisionSpan

LAYERS, L = 32, 64
LAYOUT = TokenLayout(length=L, vision={"cam": VisionSpan(1, 49, rows=6, cols=8, patch_size=14)}, text=Span(49, L))
VISUAL = list(range(1, 49))
STAGES = (2, 6, 15)  # the official pruning layers: the tokens leave from the next layer on


def official_raters(embeds: torch.Tensor) -> list[int]:
    """Post-image positions whose input embedding relates to the image more than average."""
    visual, text = embeds[VISUAL], embeds[49:]
    relation = torch.softmax(visual @ text.T, dim=1).mean(dim=0)
    return [49 + i for i in torch.nonzero(relation > relation.mean()).flatten().tolist()]


def official_stage(attention, raters, remaining, keep, heads, head_dim, theta):
    """One v2.0 stage on one layer's attention [H, L, L]: the gravity correction (attention over the RoPE-only
    scores of all-ones queries and keys), the heads with the most rater-to-image mass, the raters' mean over
    those heads' mean; the best `keep` of the remaining visual tokens stay. Returns the dropped positions."""
    ones = _rope(torch.ones(1, 1, L, head_dim), torch.arange(L), theta)[0, 0]
    corrected = attention / (ones @ ones.T / math.sqrt(head_dim))
    block = corrected[:, raters][:, :, remaining]  # [H, raters, visual]
    top = block.sum(dim=(1, 2)).topk(heads).indices
    relation = block[top].mean(dim=0).mean(dim=0)
    kept = {remaining[i] for i in relation.topk(min(keep, len(remaining) - 1)).indices.tolist()}
    return sorted(set(remaining) - kept)


@pytest.mark.parametrize("heads", ["14/32", 3])
def test_sparsevlm_drops_what_the_official_v2_selection_drops(heads):
    lm = tiny_llama(layers=LAYERS, seed=4)
    config = lm.config
    head_dim = config.hidden_size // config.num_attention_heads
    embeds = torch.randn(2, L, 64, generator=torch.Generator().manual_seed(9))
    policy = CachePolicy.from_config("sparsevlm")
    policy.pruner.config.heads = heads
    ctx = PlanContext(step=0, batch_size=2, num_layers=LAYERS, layout=LAYOUT, current={}, previous=None, stats=None)
    plan = policy.plan(ctx)
    assert [rule.layer for rule in plan.prune] == [3, 7, 16]
    with torch.no_grad(), CacheEngine(lm.model) as engine:
        cache = engine.begin_step(plan, LAYOUT, 2)
        lm(inputs_embeds=embeds, position_ids=torch.arange(L)[None], use_cache=True, **{cache_keyword(lm.forward): cache})
        dropped = engine.keys_dropped(L)
        engine.end_step()
    count_heads = 1 if heads == "14/32" else heads  # 14 of 32 heads is 1 of this decoder's 4
    keeps = [300 * 48 // 576, 200 * 48 // 576, 118 * 48 // 576]
    for row in range(2):
        raters = official_raters(embeds[row])
        assert 0 < len(raters) < L - 49
        gone: list[int] = []
        per_layer = [None] * LAYERS  # the keys no query may attend to, per layer, so far
        for stage, keep in zip(STAGES, keeps):
            maps = []
            with torch.no_grad():
                reference_forward(lm, embeds[row:row + 1], torch.arange(L), attentions=maps, dropped=per_layer)
            remaining = [p for p in VISUAL if p not in gone]
            gone = sorted(gone + official_stage(maps[stage][0], raters, remaining, keep, count_heads, head_dim,
                                                _theta(config)))
            excluded = torch.zeros(1, L, dtype=torch.bool)
            excluded[0, gone] = True
            per_layer[stage + 1:] = [excluded] * (LAYERS - stage - 1)
            engine_gone = torch.nonzero(dropped[stage + 1, row]).flatten().tolist()
            assert engine_gone == gone, f"row {row}, stage after layer {stage}"
        assert len(gone) == 48 - keeps[-1]


def test_sparsevlm_settings_are_checked():
    from vlacache import ConfigError

    with pytest.raises(ConfigError, match="one count per layer"):
        CachePolicy.from_config({"pruner": {"name": "sparsevlm", "keep": ["300/576"]}}).check(LAYERS)
    with pytest.raises(ConfigError, match="absolute layers"):
        CachePolicy.from_config("sparsevlm").check(4)  # 3/32 and 7/32 both fall on layer 0 of a 4-layer decoder


def test_a_stage_keeps_at_most_all_but_one_remaining_token():
    from vlacache.strategies.pruners import KeepRatedByHeads

    choose = KeepRatedByHeads(keep=10, heads=1)
    attention = torch.rand(1, 2, 3, 10)
    eligible = torch.ones(1, 10, dtype=torch.bool)
    embeds = torch.randn(1, 3, 8), torch.randn(1, 10, 8)
    assert choose(attention, eligible, *embeds).shape == (1, 1)  # the official min(keep, remaining - 1)
    assert KeepRatedByHeads(keep=4, heads=1)(attention, eligible, *embeds).shape == (1, 6)
