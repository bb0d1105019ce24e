"""Built-in strategies, policy composition and the register_strategy extension point."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

import vlacache
from vlacache import AttentionStats, CachePolicy, Candidates, PlanContext, TokenSelector, register_strategy
from vlacache.config import ConfigError
from vlacache.policy import build_strategy
from vlacache.registry import RegistryError
from vlacache.types import Span, TokenLayout, VisionSpan

LAYOUT = TokenLayout(length=1 + 16 + 5, vision={"primary": VisionSpan(1, 17, rows=4, cols=4, patch_size=14)}, text=Span(17, 22))


def ctx(current, previous, stats=None, step=1, layers=4):
    return PlanContext(step=step, batch_size=current["primary"].shape[0], num_layers=layers, layout=LAYOUT,
                       current=current, previous=previous, stats=stats)


def scene(seed=0, batch=1):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 255, size=(batch, 56, 56, 3), dtype=np.uint8))


def test_pixel_cosine_grid_alignment_and_topk():
    a = scene()
    b = a.clone()
    b[0, 14:28, 28:42] = 255 - b[0, 14:28, 28:42]  # patch row 1, col 2 -> index 6
    sel = build_strategy("selector", {"name": "pixel-cosine", "tau": 0.996, "top_k": None})
    out = sel.select(ctx({"primary": b}, {"primary": a}))["primary"]
    assert out.mask.shape == (1, 16)
    assert not out.mask[0, 6] and out.mask.sum() == 15
    assert out.score[0, 6] < 0.996 and torch.allclose(out.score[0, torch.arange(16) != 6], torch.ones(15))
    capped = build_strategy("selector", {"name": "pixel-cosine", "top_k": 4}).select(ctx({"primary": b}, {"primary": a}))
    assert capped["primary"].mask.sum() == 4


def test_pixel_cosine_black_patches_are_static_and_sizes_checked():
    black = torch.zeros(1, 56, 56, 3, dtype=torch.uint8)
    out = build_strategy("selector", "pixel-cosine").select(ctx({"primary": black}, {"primary": black}))
    assert out["primary"].mask.all()
    with pytest.raises(ValueError, match="patch grid"):
        build_strategy("selector", "pixel-cosine").select(ctx({"primary": scene()[:, :50]}, {"primary": scene()[:, :50]}))



def test_pixel_cosine_cameras_limits_reuse_to_the_named_cameras():
    two = TokenLayout(length=1 + 32 + 5, text=Span(33, 38), vision={
        "image": VisionSpan(1, 17, rows=4, cols=4, patch_size=14), "wrist": VisionSpan(17, 33, rows=4, cols=4, patch_size=14)})
    frames = {"image": scene(1), "wrist": scene(2)}
    context = PlanContext(step=1, batch_size=1, num_layers=4, layout=two, current=frames, previous=frames, stats=None)
    both = build_strategy("selector", {"name": "pixel-cosine", "top_k": None}).select(context)
    assert both["image"].mask.all() and both["wrist"].mask.all()
    agent = build_strategy("selector", {"name": "pixel-cosine", "top_k": None, "cameras": ["image"]}).select(context)
    assert agent["image"].mask.all() and not agent["wrist"].mask.any()
    assert torch.equal(agent["wrist"].score, both["wrist"].score)
    with pytest.raises(ValueError, match=r"cameras \['left'\] are not inputs.*\['image', 'wrist'\]"):
        build_strategy("selector", {"name": "pixel-cosine", "cameras": ["left"]}).select(context)

def test_cross_view_keeps_the_share_of_static_agent_patches_the_wrist_motion_allows():
    two = TokenLayout(length=1 + 32 + 5, text=Span(33, 38), vision={
        "image": VisionSpan(1, 17, rows=4, cols=4, patch_size=14), "wrist": VisionSpan(17, 33, rows=4, cols=4, patch_size=14)})
    previous = {"image": scene(1, batch=3), "wrist": scene(2, batch=3)}
    image = previous["image"].clone().to(torch.int16)
    for patch in range(16):  # every agent-view patch changes a little, each by a different amount: distinct scores
        r, c = divmod(patch, 4)
        image[:, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] += patch
    wrist = previous["wrist"].clone()
    wrist[1, :14] = 255 - wrist[1, :14]  # row 1: the first patch row of the wrist view changes (4 of 16 patches)
    wrist[2, :28] = 255 - wrist[2, :28]  # row 2: 8 of 16
    current = {"image": image.clamp(0, 255).to(torch.uint8), "wrist": wrist}
    context = PlanContext(step=1, batch_size=3, num_layers=4, layout=two, current=current, previous=previous, stats=None)
    config = {"name": "cross-view", "tau": 0.9, "top_k": None, "motion_camera": "wrist", "max_motion": 0.5}
    out = build_strategy("selector", config).select(context)
    plain = build_strategy("selector", {"name": "pixel-cosine", "tau": 0.9, "top_k": None}).select(context)
    assert plain["image"].mask.all()  # every agent-view patch passes the pixel test
    assert torch.equal(out["wrist"].mask, plain["wrist"].mask)  # the motion camera is judged as the paper does
    assert out["wrist"].mask.sum(dim=1).tolist() == [16, 12, 8]
    assert out["image"].mask.sum(dim=1).tolist() == [16, 8, 0]  # motion 0, 0.25, 0.5 of max_motion 0.5
    kept = out["image"].mask[1]
    assert out["image"].score[1][kept].min() > out["image"].score[1][~kept].max()  # the most similar are kept
    with pytest.raises(ConfigError, match="max_motion must lie in"):
        vlacache.CachePolicy.from_config({"label": "x", "selector": {**config, "max_motion": 0}, "relevance": "none",
                                          "scheduler": "constant", "gate": "full-first-step"}).check(4)
    with pytest.raises(ValueError, match="motion_camera 'left' must be one of several cameras"):
        build_strategy("selector", {**config, "motion_camera": "left"}).select(context)


def stats_with(attention_row, entropy=(4.0, 3.0, 2.0, 2.0)):
    to_keys = {i: attention_row.clone() for i in range(4)}
    return AttentionStats(to_keys=to_keys, entropy={i: torch.tensor([e]) for i, e in enumerate(entropy)})


def test_attention_filter_threshold_and_topk():
    row = torch.zeros(1, LAYOUT.length)
    row[0, 1 + 3] = 1.0  # patch 3 most attended
    row[0, 1 + 7] = 0.6
    row[0, 1 + 9] = 0.4
    cands = {"primary": Candidates(torch.ones(1, 16, dtype=torch.bool), torch.ones(1, 16))}
    threshold = build_strategy("relevance", {"name": "attention", "tau": 0.5})
    out = threshold.filter(ctx({"primary": scene()}, None, stats_with(row)), cands)["primary"].mask
    assert not out[0, 3] and not out[0, 7] and out[0, 9] and out.sum() == 14
    topk = build_strategy("relevance", {"name": "attention", "mode": "topk", "top_k": 1, "layers": [2]})
    assert topk.required_layers(4) == (2,)
    out = topk.filter(ctx({"primary": scene()}, None, stats_with(row)), cands)["primary"].mask
    assert not out[0, 3] and out.sum() == 15
    no_stats = threshold.filter(ctx({"primary": scene()}, None, None), cands)["primary"].mask
    assert no_stats.sum() == 0  # without statistics nothing is known to be safe


def test_entropy_adaptive_follows_the_paper_formula():
    sched = build_strategy("scheduler", {"name": "entropy-adaptive", "k": 1.5})
    fractions = sched.fractions(ctx({"primary": scene()}, None, stats_with(torch.zeros(1, 22))))
    r = [0.0, 0.25, 1 / 3, 0.0]
    expected = [min(1.5 * sum(r[: i + 1]), 1.0) for i in range(4)]
    assert fractions == pytest.approx(expected)
    rising = sched.fractions(ctx({"primary": scene()}, None, stats_with(torch.zeros(1, 22), (2, 3, 4, 5))))
    assert rising == [0.0] * 4


def test_entropy_minmax_reference_variant():
    sched = build_strategy("scheduler", {"name": "entropy-minmax", "apply_layers": [1, 3], "damping": 0.5})
    fractions = sched.fractions(ctx({"primary": scene()}, None, stats_with(torch.zeros(1, 22), (4.0, 2.0, 3.0, 2.0))))
    assert fractions == pytest.approx([0.0, 0.5, 0.5, 0.75])
    # damped along every layer, read at the apply layers: s = [1, 0, .5, .75] gives r = [1, 0, .25, .5]
    fractions = sched.fractions(ctx({"primary": scene()}, None, stats_with(torch.zeros(1, 22), (2.0, 4.0, 3.0, 2.5))))
    assert fractions == pytest.approx([0.0, 0.0, 0.0, 0.5])
    # counts: none before the first apply layer, then max(1, int(r * n)) (r = 0 still removes one token)
    assert sched.counts(fractions, 10) == [0, 1, 1, 5]
    assert sched.counts(fractions, 0) == [0, 0, 0, 0]
    assert build_strategy("scheduler", "constant").counts([0.0, 0.26, 0.5], 10) == [0, 2, 5]


def test_gates():
    c0, c3 = ctx({"primary": scene()}, None, step=0), ctx({"primary": scene()}, None, step=3)
    assert not build_strategy("gate", "full-first-step").allow(c0)
    assert build_strategy("gate", "full-first-step").allow(c3)
    assert build_strategy("gate", "always").allow(c0)
    refresh = build_strategy("gate", {"name": "periodic-refresh", "every": 3})
    assert not refresh.allow(c3) and refresh.allow(c0.__class__(**{**c3.__dict__, "step": 4}))


def test_policy_plan_is_nested_ordered_by_similarity_and_batched():
    a = scene(batch=2)
    b = a.clone()
    b[0, :14, :14] = 0  # batch 0: patch 0 changes
    b[1, 42:, 42:] = 0  # batch 1: patch 15 changes
    policy = CachePolicy.from_config({
        "selector": {"name": "pixel-cosine", "tau": 0.9, "top_k": None},
        "scheduler": {"name": "constant", "fraction": 0.5, "start_layer": 2},
    })
    plan = policy.plan(ctx({"primary": b}, {"primary": a}))
    plan.validate(2, 4, LAYOUT.length)
    assert plan.counts == [0, 0, 7, 7]
    assert 1 + 0 not in plan.reused[3][0].tolist() and 1 + 15 not in plan.reused[3][1].tolist()


def test_empty_reusable_set_is_a_normal_step(tiny, frames):
    noise = np.random.default_rng(0).integers(0, 255, size=(256, 256, 3), dtype=np.uint8)
    with vlacache.attach(tiny, "static_reuse") as vla:
        vla.predict(frames[0])
        step = vla.predict(vlacache.Observation({"primary": noise}, frames[0].instruction))
    assert step.stats.reused_per_layer == [0] * 4 and step.actions.shape == (1, 1, 7)


def test_register_strategy_extension_and_errors():
    @register_strategy("selector", "test-lower-half")
    class LowerHalf(TokenSelector):
        """Every patch in the lower half of the image is a candidate."""

        @dataclass
        class Config:
            score: float = 1.0

        def select(self, c):
            span = c.layout.vision["primary"]
            mask = torch.zeros(c.batch_size, len(span), dtype=torch.bool)
            mask[:, len(span) // 2 :] = True
            return {"primary": Candidates(mask, torch.full(mask.shape, self.config.score))}

    policy = CachePolicy.from_config({"selector": {"name": "test-lower-half", "score": 2.0}})
    plan = policy.plan(ctx({"primary": scene()}, {"primary": scene()}))
    assert plan.counts == [8, 8, 8, 8] and int(plan.reused[0].min()) == 1 + 8
    with pytest.raises(RegistryError, match="already registered"):
        register_strategy("selector", "test-lower-half")(type("Other", (TokenSelector,), {}))
    with pytest.raises(RegistryError, match="pixel-cosine"):
        CachePolicy.from_config({"selector": {"name": "pixel-cosin"}})
    with pytest.raises(ConfigError, match="Valid keys: tau, top_k"):
        CachePolicy.from_config({"selector": {"name": "pixel-cosine", "tua": 0.9}})
    with pytest.raises(RegistryError, match="Valid kinds"):
        register_strategy("selektor", "x")


def test_layers_relative_to_the_depth():
    from vlacache.strategy import resolve_layers

    assert resolve_layers(["15/32"], 32, "x") == (15,)
    assert resolve_layers(["2/32", "6/32", "9/32", "11/32"], 32, "x") == (2, 6, 9, 11)
    assert resolve_layers(["15/32"], 4, "x") == (1,) and resolve_layers(["2/32", "6/32", "9/32", "11/32"], 4, "x") == (0, 1)
    assert resolve_layers([0, -1, "31/32"], 8, "x") == (0, 7)
    for bad, message in ((["32/32"], "0 <= i < n"), (["middle"], "neither an index"), ([8], "does not exist in this 8-layer")):
        with pytest.raises(ConfigError, match=message):
            resolve_layers(bad, 8, "x")
    with pytest.raises(ConfigError, match="neither an index"):
        build_strategy("relevance", {"name": "attention", "layers": ["half"]})


@pytest.mark.parametrize("backbone", ["openvla", "openvla-oft", "cogact"])
@pytest.mark.parametrize("policy", ["reference_code", "reference_code_oft"])
def test_reference_code_policies_run_on_every_preset(frames, backbone, policy):
    from vlacache.experiment import build_backbone

    model = build_backbone({"name": backbone, "preset": "tiny", "device": "cpu"})
    depth = len(model.decoder.layers)
    with vlacache.attach(model, policy) as vla:
        steps = [vla.predict(obs) for obs in frames[:3]]
        assert vla.policy.stats_request(depth).layers == tuple(range(depth))  # entropy of all, relevance of 15/32
        assert vla.policy.relevance.required_layers(depth) == (15 * depth // 32,)
    assert all(np.isfinite(s.actions).all() for s in steps)


def test_absolute_layer_beyond_the_depth_fails_at_attach(tiny):
    policy = {"label": "x", "selector": {"name": "pixel-cosine"},
              "relevance": {"name": "attention", "mode": "topk", "layers": [15]}}
    with pytest.raises(ConfigError, match=r"layer 15 does not exist in this \d+-layer decoder.*'15/32'"):
        vlacache.attach(tiny, policy)
    assert not any(layer._forward_pre_hooks for layer in tiny.decoder.layers)


def test_per_camera_scale_applies_to_any_policy():
    """`cameras: {wrist: s}` scales the scheduler's fractions on that camera only, for whatever the strategies
    are (0: never reuse it); a camera the backbone lacks is named."""
    from vlacache import CachedVLA, Observation
    from vlacache.backbones.openvla_oft import build_preset as build_oft

    oft = build_oft("tiny", seed=0)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
    obs = Observation({"primary": image, "wrist": image[::-1].copy()}, "pick up the bowl", proprio=np.zeros(8, np.float32))
    base = {"label": "s", "selector": {"name": "pixel-cosine", "tau": 0.99, "top_k": None}, "relevance": {"name": "none"},
            "scheduler": {"name": "constant", "fraction": 1.0}, "gate": {"name": "full-first-step"}}

    def reused_per_camera(cameras):
        with CachedVLA(oft, CachePolicy.from_config({**base, "cameras": cameras})) as vla:
            vla.predict(obs)
            plan = vla.predict(obs).plan
        layout = oft.prepare(obs).layout
        return {c: int(((plan.reused[-1] >= s.start) & (plan.reused[-1] < s.stop)).sum()) for c, s in layout.vision.items()}

    full = reused_per_camera(None)
    assert full["primary"] == full["wrist"] > 0
    half = reused_per_camera({"wrist": 0.5})
    assert half["primary"] == full["primary"] and half["wrist"] == full["wrist"] // 2
    assert reused_per_camera({"wrist": 0.0})["wrist"] == 0
    with pytest.raises(ConfigError, match=r"cameras scales \['left'\], which are not cameras of this backbone"):
        reused_per_camera({"left": 0.5})  # refused when attached, before any step
    with pytest.raises(ConfigError, match="must be a number in"):
        CachePolicy.from_config({**base, "cameras": {"wrist": 2}})


def test_top_k_relative_to_the_cameras_patch_count():
    """'130/256' (the reference code's static top-k for 256 patches per camera) keeps the same share of a
    64-patch camera: 32; an absolute count is capped at the camera's patches; bad values are refused by name."""
    import pytest as _pytest

    from vlacache.config import ConfigError
    from vlacache.registry import STRATEGIES
    from vlacache.strategy import resolve_count

    assert resolve_count("130/256", 256, "x") == 130 and resolve_count("130/256", 64, "x") == 32
    assert resolve_count(100, 64, "x") == 64 and resolve_count(None, 64, "x") is None
    cls = STRATEGIES["selector"].get("pixel-cosine")
    selector = cls(cls.Config(tau=0.5, top_k="130/256"))
    mask, score = torch.ones(1, 64, dtype=torch.bool), torch.arange(64, dtype=torch.float32)[None]
    kept = selector._candidates("primary", mask, score).mask
    assert int(kept.sum()) == 32 and bool(kept[0, 32:].all())  # the most similar 32
    for bad in ("300/256", "a/b", -1, 2.5):
        with _pytest.raises(ConfigError, match="selector 'pixel-cosine': .*count"):
            cls(cls.Config(top_k=bad))
