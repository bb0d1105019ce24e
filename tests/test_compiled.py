"""Compiled steps: torch.compile (CPU inductor here) of the decoder's layer blocks and of
OpenVLA's decode passes over a static K/V cache. Exact against eager within float tolerance, the same action
tokens, and nothing compiled again once every shape has been seen."""

import numpy as np
import pytest
import torch

from vlacache import CachedVLA, CachePolicy, Observation
from vlacache.engine import compile_counts

REUSE = {"selector": {"name": "pixel-cosine", "tau": 0.996, "top_k": 100},
         "scheduler": {"name": "constant", "fraction": 1.0, "start_layer": 1}}


def run(backbone, frames, **options):
    with CachedVLA(backbone, CachePolicy.from_config(REUSE), buckets=4, **options) as vla:
        steps = [vla.predict(obs) for obs in frames]
        blocks = vla.compiled.blocks if vla.compiled is not None else []
    return steps, blocks


def test_compiled_openvla_matches_eager_and_compiles_nothing_in_steady_state(tiny, frames, capfd):
    eager, _ = run(tiny, frames)
    with CachedVLA(tiny, CachePolicy.from_config(REUSE), buckets=4, compile=True) as vla:
        compiled = [vla.predict(obs) for obs in frames[:3]]  # a full step and reused steps: every shape once
        warm = compile_counts()
        compiled += [vla.predict(obs) for obs in frames[3:]]
        assert compile_counts() == warm, "a steady-state step compiled again"
        blocks = vla.compiled.blocks + vla.compiled.towers
    err = capfd.readouterr().err
    assert "compiling the 6 decode passes" in err and "compiling the vision towers (batch 1)" in err
    assert tiny.vision_towers()[0] in blocks
    assert tiny.decode_pass is None and not any("forward" in vars(b) for b in blocks)  # eager outside its steps

    assert sum(compiled[0].plan.counts) == 0 and all(sum(s.plan.counts) > 0 for s in compiled[1:])
    for e, c in zip(eager, compiled):
        assert e.plan.counts == c.plan.counts
        assert torch.equal(e.tokens, c.tokens)
        torch.testing.assert_close(c.logits, e.logits, atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(c.actions, e.actions)


def test_compiled_oft_prefill_matches_eager(frames):
    from vlacache.backbones.openvla_oft import build_preset

    oft = build_preset("tiny", seed=0)
    with_wrist = [Observation(images={"primary": o.images["primary"], "wrist": np.ascontiguousarray(o.images["primary"][::-1])},
                              instruction=o.instruction, proprio=np.linspace(-1, 1, 8, dtype=np.float32)) for o in frames[:3]]
    eager, _ = run(oft, with_wrist)
    compiled, blocks = run(oft, with_wrist, compile=True)
    assert oft.decode_pass is None and blocks and not any("forward" in vars(b) for b in blocks)
    assert any(sum(s.plan.counts) for s in compiled[1:])
    for e, c in zip(eager, compiled):
        assert e.plan.counts == c.plan.counts
        np.testing.assert_allclose(c.actions, e.actions, atol=1e-5, rtol=1e-5)


def test_eager_and_compiled_share_a_backbone(tiny, frames):
    """Each CachedVLA swaps its compiled blocks in for its own steps only: interleaved, both stay exact."""
    eager = CachedVLA(tiny, CachePolicy.from_config(REUSE))
    compiled = CachedVLA(tiny, CachePolicy.from_config(REUSE), compile=True)
    for obs in frames[:3]:
        a, b = eager.predict(obs), compiled.predict(obs)
        assert torch.equal(a.tokens, b.tokens)
        torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    eager.detach()
    compiled.detach()


FASTV = {"label": "fastv", "pruner": {"name": "fastv", "layer": 1, "ratio": 0.5}}


def test_compiled_decode_after_pruning_matches_eager(tiny, frames, monkeypatch):
    """OpenVLA's compiled decode passes run without the engine's hooks; the keys each layer dropped reach them as a
    tensor (`kept_keys_attention`). Same tokens and logits as eager pruning, nothing compiled in steady state,
    and the dropped keys really are kept out: decoding over them changes the logits."""
    from vlacache.engine.compiled import CompiledSteps

    with CachedVLA(tiny, CachePolicy.from_config(FASTV)) as vla:
        eager = [vla.predict(obs) for obs in frames]
    with CachedVLA(tiny, CachePolicy.from_config(FASTV), compile=True) as vla:
        compiled = [vla.predict(obs) for obs in frames[:2]]
        warm = compile_counts()
        compiled += [vla.predict(obs) for obs in frames[2:]]
        assert compile_counts() == warm, "a steady-state step compiled again"
    assert tiny.decode_pass is None and tiny.causal_lm().config._attn_implementation == "sdpa"
    for e, c in zip(eager, compiled):
        assert e.stats.dropped_per_layer == c.stats.dropped_per_layer and sum(c.stats.dropped_per_layer) > 0
        assert torch.equal(e.tokens, c.tokens)
        torch.testing.assert_close(c.logits, e.logits, atol=1e-5, rtol=1e-5)

    # the same compiled decode passes with the dropped keys left visible decode other tokens
    original = CompiledSteps.keys_dropped
    monkeypatch.setattr(CompiledSteps, "keys_dropped", lambda self, dropped: original(self, None))
    with CachedVLA(tiny, CachePolicy.from_config(FASTV), compile=True) as vla:
        leaky = [vla.predict(obs) for obs in frames]
    assert any(not torch.equal(e.tokens, c.tokens) for e, c in zip(eager, leaky))


def test_compile_mode_is_checked_by_torch(tiny):
    with pytest.raises(RuntimeError, match="mode"):
        CachedVLA(tiny, CachePolicy.from_config(REUSE), compile=True, compile_mode="fastest-please")
