"""Fixed-shape reuse buckets: fewer tokens reused, never more or others; exact against the reference."""

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from reference import reference_forward

from vlacache import CachedVLA, CachePolicy, ConfigError, LayerScheduler, PlanContext, ReusePlan, register_strategy
from vlacache.engine import ReuseBuckets
from vlacache.types import Span, TokenLayout, VisionSpan

RAMP = [0.0, 0.3, 0.55, 0.8, 1.0, 1.0]


@register_strategy("scheduler", "test-ramp")
class RampScheduler(LayerScheduler):
    """A schedule whose reused set grows with depth, so every layer adds tokens."""

    @dataclass
    class Config:
        fractions: list = field(default_factory=lambda: list(RAMP))

    def fractions(self, ctx):
        return list(self.config.fractions)[: ctx.num_layers]


def test_bucket_specs_and_errors():
    assert ReuseBuckets.from_spec(None) is None
    assert ReuseBuckets.from_spec(4).fractions == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert ReuseBuckets.from_spec([0.5, 0.25]).fractions == (0.0, 0.25, 0.5)
    assert ReuseBuckets.from_spec(4).counts(10) == [0, 2, 5, 7, 10]
    assert ReuseBuckets.from_spec(4).round_down([0, 1, 2, 6, 9, 10], 10) == [0, 0, 2, 5, 7, 10]
    for bad, match in ((0, ">= 1"), ([1.5], r"\[0, 1\]"), ("half", "count n"), (True, "count n")):
        with pytest.raises(ConfigError, match=match):
            ReuseBuckets.from_spec(bad)


def two_camera_context(seed=0):
    """Two cameras of 4x4 patches (16 px each), most patches unchanged, a few moved."""
    g = torch.Generator().manual_seed(seed)
    layout = TokenLayout(
        length=40,
        vision={"primary": VisionSpan(1, 17, rows=4, cols=4, patch_size=4),
                "wrist": VisionSpan(17, 33, rows=4, cols=4, patch_size=4)},
        text=Span(33, 40),
    )
    previous = {c: torch.randint(0, 255, (2, 16, 16, 3), generator=g, dtype=torch.uint8) for c in layout.vision}
    current = {c: img.clone() for c, img in previous.items()}
    moved = torch.randint(0, 255, (2, 16, 16, 3), generator=g, dtype=torch.uint8)
    current["primary"][:, :4] = moved[:, :4]  # first patch row moves
    current["wrist"][:, :, 12:] = moved[:, :, 12:]  # last patch column moves
    for img in current.values():  # tiny pixel noise elsewhere gives every static patch a distinct similarity
        img[:, :, :, 0] = (img[:, :, :, 0].int() + torch.randint(0, 2, (2, 16, 16), generator=g)).clamp(max=255).to(torch.uint8)
    return PlanContext(step=1, batch_size=2, num_layers=len(RAMP), layout=layout, current=current, previous=previous, stats=None)


def ramp_policy():
    return CachePolicy.from_config(
        {"selector": {"name": "pixel-cosine", "tau": 0.95, "top_k": None}, "scheduler": {"name": "test-ramp"}}
    )


def test_policy_plan_reuses_each_cameras_most_similar_prefix():
    ctx = two_camera_context()
    policy = ramp_policy()
    plan = policy.plan(ctx)
    plan.validate(2, len(RAMP), 40)
    candidates = policy.selector.select(ctx)
    for layer, fraction in enumerate(RAMP):
        for b in range(2):
            expected = []
            for camera, span in ctx.layout.vision.items():
                mask, score = candidates[camera].mask[b], candidates[camera].score[b]
                ranked = sorted(torch.nonzero(mask).flatten().tolist(), key=lambda i: -float(score[i]))
                n = int(candidates[camera].mask.sum(1).min())
                expected += [span.start + i for i in ranked[: int(np.floor(fraction * n + 1e-9))]]
            assert plan.reused[layer][b].tolist() == sorted(expected)


def test_buckets_give_up_the_least_reusable_tokens_and_keep_nesting():
    ctx = two_camera_context()
    plan = ramp_policy().plan(ctx)
    buckets = ReuseBuckets.from_spec(4)
    num_visual = ctx.layout.num_visual
    rounded = buckets.apply(plan, num_visual)
    rounded.validate(2, len(RAMP), 40)
    assert rounded.counts != plan.counts, "the test plan must need rounding"
    assert rounded.info["unbucketed_counts"] == plan.counts
    for layer in range(len(RAMP)):
        assert rounded.counts[layer] in buckets.counts(num_visual)
        assert rounded.counts[layer] <= plan.counts[layer]
        for b in range(2):
            allowed = set(plan.reused[layer][b].tolist())
            kept = set(rounded.reused[layer][b].tolist())
            assert kept <= allowed
            # a token the policy reused from a shallower layer is given up only after every deeper newcomer
            for shallower in range(layer):
                if rounded.counts[layer] >= plan.counts[shallower]:
                    assert set(plan.reused[shallower][b].tolist()) <= kept
    # both cameras give up tokens when a layer's newcomers are cut (interleaved by rank, not camera by camera)
    cut = next(i for i in range(1, len(RAMP)) if plan.counts[i - 1] < rounded.counts[i] < plan.counts[i])
    newcomers = set(rounded.reused[cut][0].tolist()) - set(plan.reused[cut - 1][0].tolist())
    cameras = {name for p in newcomers for name, s in ctx.layout.vision.items() if s.start <= p < s.stop}
    assert cameras == {"primary", "wrist"}


def test_validate_checks_nesting_per_batch_row():
    # row 0 reuses 3 at layer 0 but not at layer 1; row 1 happens to reuse 3 at layer 1
    bad = ReusePlan([torch.tensor([[3], [5]]), torch.tensor([[4, 5], [3, 5]])])
    with pytest.raises(ValueError, match="not nested"):
        bad.validate(2, 2, 10)


def test_truncated_rejects_more_than_the_plan():
    plan = ReusePlan([torch.tensor([[3]]), torch.tensor([[3, 4]])])
    with pytest.raises(ValueError, match="between 0"):
        plan.truncated([1, 3])
    assert plan.truncated([0, 1]).reused[1].tolist() == [[3]]


def test_bucketed_steps_match_the_reference_and_use_few_shapes(tiny, frames):
    lm = tiny.model.language_model
    policy = {"selector": {"name": "pixel-cosine", "tau": 0.996, "top_k": 100},
              "scheduler": {"name": "constant", "fraction": 1.0, "start_layer": 1}}
    buckets = ReuseBuckets.from_spec(4)
    free = CachedVLA(tiny, CachePolicy.from_config(policy))
    with CachedVLA(tiny, CachePolicy.from_config(policy), buckets=4) as vla:
        embeds = [tiny.embed(tiny.prepare(o)) for o in frames[:3]]
        steps = [vla.predict(o) for o in frames[:3]]
        unbucketed = [free.predict(o) for o in frames[:3]]
    free.detach()
    num_visual = steps[0].stats.num_visual
    assert any(sum(s.plan.counts) for s in steps[1:])
    for step, loose in zip(steps, unbucketed):
        assert all(c in buckets.counts(num_visual) for c in step.plan.counts)
        assert all(c <= u for c, u in zip(step.plan.counts, loose.plan.counts))
    positions = torch.arange(embeds[0].shape[1])
    with torch.no_grad():
        _, kv, _ = reference_forward(lm, embeds[0], positions)
        for embed, step in zip(embeds[1:], steps[1:]):
            ref, kv, _ = reference_forward(lm, embed, positions, reused=step.plan.reused, previous_kv=kv)
            torch.testing.assert_close(step.logits, ref[:, -1], atol=1e-5, rtol=0)
