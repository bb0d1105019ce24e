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


# -- v1.5: recycling ------------------------------------------------------------------------------------------

def official_cluster_and_merge(x, cluster_num, noise):
    """SparseVLM v1.5's `cluster_and_merge` (llava/model/language_model/utils.py), written out step by step; its
    global-generator noise comes in as `noise` [B, N]."""
    batch, count, width = x.shape
    dist_matrix = (x[:, :, None, :] - x[:, None, :, :]).norm(dim=-1, p=2) / width ** 0.5
    dist_nearest, _ = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp() + noise * 1e-6
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    _, index_down = torch.topk(dist * density, k=cluster_num, dim=-1)
    idx_cluster = torch.stack([dist_matrix[b, index_down[b]] for b in range(batch)]).argmin(dim=1)
    for b in range(batch):
        idx_cluster[b, index_down[b]] = torch.arange(cluster_num)
    idx = idx_cluster + torch.arange(batch)[:, None] * cluster_num
    all_weight = torch.zeros(batch * cluster_num, 1).index_add_(0, idx.reshape(-1), torch.ones(batch * count, 1)) + 1e-6
    norm_weight = 1.0 / all_weight[idx]
    merged = torch.zeros(batch * cluster_num, width).index_add_(0, idx.reshape(-1), (x * norm_weight).reshape(-1, width))
    return merged.reshape(batch, cluster_num, width)


def official_noise(count):
    from vlacache.strategies.pruners import NOISE_SEED

    return torch.rand(1, count, generator=torch.Generator().manual_seed(NOISE_SEED))


def test_density_peak_clusters_equal_the_official_cluster_and_merge():
    from vlacache.strategies.pruners import density_peak_clusters

    tokens = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(3))
    tokens[:, 20:] += 3.0  # two groups, so centres and assignments are not arbitrary
    ours = density_peak_clusters(tokens, 5)
    for row in range(2):
        official = official_cluster_and_merge(tokens[row:row + 1], 5, official_noise(40))
        torch.testing.assert_close(ours[row], official[0], atol=1e-5, rtol=1e-5)


def official_v15_forward(lm, embeds, keeps, prompt_length):
    """SparseVLM v1.5's decoder loop (llava/model/language_model/modelling_sparse_llama.py) on one row [n, D], the
    prompt followed by n - prompt_length tokens decoded after it: after each pruning layer the raters' attention
    (mean over heads) keeps the best `keep` visual tokens, the best 30% of the dropped ones are clustered (from
    that layer's output) and inserted after the kept ones, and the shorter sequence runs on at positions
    0, 1, 2, ... Returns the final hidden states of the tokens after the image, the visual count per stage and how
    many of the image's own tokens are left at the end."""
    from reference import _rms, reference_layers

    raters = [r - 49 for r in official_raters(embeds[:prompt_length])]
    x, v_start, v_num = embeds[None], 1, 48
    own = list(range(48))  # which image token each visual position holds (None: a cluster)
    counts = []
    for index in range(len(lm.model.layers)):
        maps = []
        with torch.no_grad():
            x, _ = reference_layers(lm, x, torch.arange(x.shape[1]), layers=[index], attentions=maps)
        if index not in STAGES:
            continue
        t_start = v_start + v_num
        relation = maps[0][0].mean(dim=0)[[t_start + r for r in raters]][:, v_start:t_start].mean(dim=0)
        keep = torch.zeros(v_num, dtype=torch.bool)
        keep[relation.topk(min(keeps[STAGES.index(index)], v_num - 1)).indices] = True
        dropped = torch.nonzero(~keep).flatten()
        m = int(dropped.shape[0] * 0.3) + 1
        best = relation[dropped].topk(m).indices
        clusters = official_cluster_and_merge(x[:, v_start + dropped[best]], int(m / 10) + 1, official_noise(m))
        kept = v_start + torch.nonzero(keep).flatten()
        own = [own[i - v_start] for i in kept.tolist()] + [None] * clusters.shape[1]
        x = torch.cat([x[:, :v_start], x[:, kept], clusters, x[:, t_start:]], dim=1)
        v_num = kept.shape[0] + clusters.shape[1]
        counts.append(v_num)
    left = sum(token is not None for token in own)
    return _rms(x, lm.model.norm.weight, lm.config.rms_norm_eps)[0, v_start + v_num:], counts, left


@pytest.mark.parametrize("keep", [None, [8, 4, 2]], ids=["shipped", "harsh"])
def test_sparsevlm_v15_equals_the_official_shrinking_forward_prefill_and_decode(keep):
    """The engine keeps every slot and renumbers positions; the official code cuts the sequence. Same numbers, for
    the prompt and for two tokens decoded after it (each at its layer's usable cache length)."""
    lm = tiny_llama(layers=LAYERS, seed=4)
    embeds = torch.randn(2, L + 2, 64, generator=torch.Generator().manual_seed(9))
    policy = CachePolicy.from_config("sparsevlm_v15")
    if keep is not None:
        policy.pruner.config.keep = keep
    policy.check(LAYERS)
    ctx = PlanContext(step=0, batch_size=2, num_layers=LAYERS, layout=LAYOUT, current={}, previous=None, stats=None)
    plan = policy.plan(ctx)
    decoded = []
    with torch.no_grad(), CacheEngine(lm.model) as engine:
        cache = engine.begin_step(plan, LAYOUT, 2)
        keyword = cache_keyword(lm.model.forward)
        out = lm.model(inputs_embeds=embeds[:, :L], position_ids=torch.arange(L)[None], use_cache=True,
                       **{keyword: cache})
        prompt = out.last_hidden_state[:, 49:]
        with pytest.raises(ValueError, match="compile"):
            engine.keys_dropped(L + 1)
        for t in range(2):
            step = lm.model(inputs_embeds=embeds[:, L + t:L + t + 1], position_ids=torch.tensor([[L + t]]),
                            use_cache=True, **{keyword: cache})
            decoded.append(step.last_hidden_state)
        record = engine.end_step()
    keeps = [300 * 48 // 576, 200 * 48 // 576, 110 * 48 // 576] if keep is None else keep
    for row in range(2):
        official, counts, left = official_v15_forward(lm, embeds[row], keeps, L)
        torch.testing.assert_close(prompt[row], official[:L - 49], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.cat(decoded, 1)[row], official[L - 49:], atol=1e-4, rtol=1e-4)
        assert [record.dropped_per_layer[s + 1] for s in STAGES] == [48 - c for c in counts]
        # void next step: every slot whose own token is gone, including the slots that hold clusters
        assert int(engine.episode.signals["void"][row, 1:49].sum()) == 48 - left
    if keep is not None:
        assert counts[0] == 8 + 2  # 40 dropped: the best 13 make 2 clusters


def test_recycling_is_refused_beside_reuse_and_on_a_bidirectional_prompt():
    import numpy as np

    import vlacache
    from vlacache import ConfigError
    from vlacache.backbones.pi0 import PI0Backbone, build_preset

    with pytest.raises(ConfigError, match="selector 'none'"):
        CachePolicy.from_config({"selector": {"name": "pixel-cosine"}, "pruner": {"name": "sparsevlm-v1.5"}}).check(LAYERS)
    from vlacache.backbones.openvla.tiny import build_preset as openvla_preset

    shallow = {"label": "v15", "pruner": {"name": "sparsevlm-v1.5", "layers": [1, 2, 3], "keep": [8, 4, 2]}}
    with pytest.raises(ConfigError, match="compile=False"):
        vlacache.CachedVLA(openvla_preset("tiny"), CachePolicy.from_config(shallow), compile=True)
    backbone = build_preset(PI0Backbone, "tiny", noise="fixed")
    vla = vlacache.attach(backbone, CachePolicy.from_config(shallow))
    rng = np.random.default_rng(0)
    obs = vlacache.Observation(images={n: rng.integers(0, 255, (56, 56, 3), dtype=np.uint8) for n in ("primary", "wrist")},
                               instruction="pick up the bowl", proprio=np.zeros(8, dtype=np.float32))
    with pytest.raises(ValueError, match="not causal"):
        vla.predict(obs)
    vla.detach()
