"""Gates that read what the previous step gave (`PlanContext.signals`): the action-aware gate (ADP / SpecPrune)
and Gated VLA-Cache's logit-margin gate."""

import pytest
import torch

from vlacache import CachedVLA, CachePolicy, ConfigError
from vlacache.engine import EpisodeState


def static_with(gate: dict) -> CachePolicy:
    return CachePolicy.from_config({"label": "g", "selector": {"name": "pixel-cosine", "tau": 0.99, "top_k": None},
                                    "relevance": {"name": "none"}, "scheduler": {"name": "constant", "fraction": 1.0},
                                    "gate": gate})


def run(tiny, frames, gate):
    with CachedVLA(tiny, static_with(gate)) as vla:
        return [vla.predict(f) for f in frames]


def test_signals_reach_the_next_plan(tiny, frames):
    with CachedVLA(tiny, static_with({"name": "always"})) as vla:
        first = vla.predict(frames[0])
        signals = vla.engine.episode.signals
    assert torch.equal(signals["actions"], torch.as_tensor(first.actions))
    top = torch.softmax(first.logits.float(), -1).topk(2).values[0]
    assert float(signals["logit_margin"][0]) == pytest.approx(float(top[0] - top[1]))


def test_action_aware_gate_follows_the_last_actions(tiny, frames):
    base = run(tiny, frames, {"name": "full-first-step"})
    never = run(tiny, frames, {"name": "action-aware", "min_motion": 1e9})
    always = run(tiny, frames, {"name": "action-aware", "min_motion": 0.0})
    half = run(tiny, frames, {"name": "action-aware", "min_motion": 1e9, "fine_scale": 0.5})
    assert all(r.stats.reuse_ratio == 0 for r in never)
    assert [r.plan.counts for r in always] == [r.plan.counts for r in base]
    assert all(h.plan.info["gate_scale"] == 0.5 for h in half[1:])
    assert all(sum(h.plan.counts) < sum(b.plan.counts) for h, b in zip(half[1:], base[1:]) if sum(b.plan.counts) > 1)
    assert any(sum(h.plan.counts) > 0 for h in half[1:])


def test_action_aware_gate_thresholds_on_translation_only():
    from vlacache.registry import STRATEGIES
    from vlacache.strategy import PlanContext

    gate = STRATEGIES["gate"].get("action-aware")(STRATEGIES["gate"].get("action-aware").Config(min_motion=0.3))
    ctx = PlanContext(step=3, batch_size=1, num_layers=2, layout=None, current={}, previous={}, stats=None)
    ctx.signals = {"actions": torch.tensor([[[0.1, 0.1, 0.1, 5.0, 5.0, 5.0, 1.0]]])}  # big rotation, small translation
    assert gate.scale(ctx) == 0.0
    ctx.signals = {"actions": torch.tensor([[[0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]])}
    assert gate.scale(ctx) == 1.0
    ctx.signals = None
    assert gate.scale(ctx) == 0.0


def test_logit_margin_gate(tiny, frames):
    base = run(tiny, frames, {"name": "full-first-step"})
    assert all(r.stats.reuse_ratio == 0 for r in run(tiny, frames, {"name": "logit-margin", "min_margin": 1.01}))
    assert ([r.plan.counts for r in run(tiny, frames, {"name": "logit-margin", "min_margin": 0.0})]
            == [r.plan.counts for r in base])


def test_gate_settings_are_checked(tiny):
    with pytest.raises(ConfigError, match="fine_scale"):
        CachedVLA(tiny, static_with({"name": "action-aware", "fine_scale": 2.0}))


def test_signals_follow_rows_through_stack_and_split():
    def state(value):
        return EpisodeState(key=("k",), row_keys=["x"], steps=[2], final_hidden=torch.full((1, 3, 4), value),
                            signals={"logit_margin": torch.tensor([value]), "actions": torch.full((1, 8, 7), value)})

    batch = EpisodeState.stack([state(1.0), None, state(3.0)])
    assert batch.signals["logit_margin"].tolist() == [1.0, 0.0, 3.0] and batch.fresh == {1}
    assert batch.rows([2]).signals["actions"].unique().tolist() == [3.0]


def test_action_aware_gate_holds_the_pruner_back_during_fine_motions():
    from vlacache.strategy import PlanContext

    def prune_rules(gate, actions, step=3):
        policy = CachePolicy.from_config({"label": "p", "pruner": {"name": "fastv", "layer": 1, "ratio": 0.5}, "gate": gate})
        ctx = PlanContext(step=step, batch_size=1, num_layers=4, layout=None, current={}, previous=None, stats=None)
        ctx.signals = None if actions is None else {"actions": torch.tensor([[actions]])}
        return len(policy.plan(ctx).prune)

    fine, coarse = [0.05, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0], [0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    gate = {"name": "action-aware", "min_motion": 0.3}
    assert prune_rules(gate, fine) == 0 and prune_rules(gate, coarse) == 1
    assert prune_rules(gate, None, step=0) == 1  # FastV prunes the first step: no motion is known yet
    assert prune_rules({**gate, "pruning": False}, fine) == 1
    assert prune_rules({"name": "full-first-step"}, fine, step=0) == 1  # other gates leave the pruner alone


def test_logit_margin_gate_is_refused_on_a_backbone_without_action_tokens(tiny):
    """OFT's L1 head has no action-token logits: the gate would veto every step, silently; it is refused."""
    from vlacache.experiment import build_backbone

    oft = build_backbone({"name": "openvla-oft", "preset": "tiny", "device": "cpu"})
    gated = static_with({"name": "logit-margin", "min_margin": 0.2})
    with pytest.raises(ConfigError, match="gate 'logit-margin' reads the confidence of decoded action tokens.*OpenVLA"):
        CachedVLA(oft, gated)
    CachedVLA(tiny, gated).detach()  # OpenVLA decodes action tokens
    CachedVLA(oft, static_with({"name": "action-aware"})).detach()
