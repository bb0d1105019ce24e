"""The cost guard: its decisions on a hand-made cost model, what a guarded run computes and reports, the cost model's
calibration and its cache on disk."""

import json

import numpy as np
import pytest

import vlacache.guard as guard_module
from vlacache import CachedVLA
from vlacache.config import ConfigError
from vlacache.experiment import build_policy
from vlacache.guard import CostGuard, CostModel, GuardConfig


def model(**overrides):
    values = dict(key="hand-made", untouched_ms=10.0, engine_ms=0.5, probe_ms=1.0, reuse_ms=1.0, token_layer_ms=0.01)
    return CostModel(**{**values, **overrides})


def test_the_guard_runs_a_plan_only_when_its_saving_covers_the_engine():
    guard = CostGuard(GuardConfig(enabled=True, margin=0.02, max_backoff=4), model())
    # 10 + 0.5 + 1 - 0.01 * 300 = 8.5 ms <= 9.8 ms (10 ms less the 2% margin)
    assert guard.decide(300, probe=False)[0]
    # the probe's 1 ms: 9.5 ms still pays; 250 token-layers (10 ms) do not
    assert guard.decide(300, probe=True)[0]
    runs, why = guard.decide(250, probe=True)
    assert not runs and "10.00 ms > 9.80 ms" in why
    assert not guard.decide(0, probe=False)[0]  # nothing skipped: never through the engine


def test_the_guard_backs_off_doubling_and_a_plan_that_pays_resets_it():
    guard = CostGuard(GuardConfig(enabled=True, max_backoff=4), model())
    waits = []
    for _ in range(5):
        assert not guard.decide(10, probe=False)[0]
        waits.append(guard.wait)
        skipped = 0
        while guard.backing_off():
            skipped += 1
        assert skipped == waits[-1] and guard.wait == 0
    assert waits == [1, 2, 4, 4, 4]
    assert guard.decide(500, probe=False)[0]
    assert not guard.decide(10, probe=False)[0] and guard.wait == 1


def test_guard_settings_are_checked():
    assert GuardConfig.from_spec(True).enabled and not GuardConfig.from_spec(None).enabled
    assert GuardConfig.from_spec({"margin": 0.05}) == GuardConfig(enabled=True, margin=0.05)
    for bad, match in (({"margin": 2}, "margin"), ({"max_backoff": 0}, "max_backoff"), ("yes", "true, false"),
                       ({"speed": 1}, "speed")):
        with pytest.raises(ConfigError, match=match):
            GuardConfig.from_spec(bad)


def guarded(backbone, cost_model, policy="static_reuse"):
    vla = CachedVLA(backbone, build_policy({"label": "guarded", "selector": {"name": "pixel-cosine"},
                                            "guard": True} if policy == "static_reuse" else policy))
    vla.guard.model = cost_model
    return vla


def test_a_guard_that_never_pays_computes_exactly_the_untouched_model(tiny, frames):
    """Every plan declined: nothing reused, and the actions bit-identical to no cache; no hook left on the model."""
    never = model(reuse_ms=1e6)
    baseline, vla = CachedVLA(tiny, None), guarded(tiny, never)
    reasons = []
    for obs in frames[:8]:
        expected, got = baseline.predict(obs), vla.predict(obs)
        assert np.array_equal(expected.actions, got.actions)
        assert got.stats.reuse_ratio == 0.0 and sum(got.stats.reused_per_layer) == 0
        reasons.append(got.plan.info.get("guard", ""))
        assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in tiny.decoder.modules()) == 0
    # record, plan (declined), back off 1, record, plan (declined), back off 2, ...
    assert reasons[0] == "" and "predicted" in reasons[1] and "backing off" in reasons[2]
    assert vla.guard.backoff > 1


def test_a_guard_that_always_pays_changes_nothing(tiny, frames):
    """Every plan pays: the same plans, reuse and actions as the unguarded policy."""
    always = model(token_layer_ms=1e3)
    plain = CachedVLA(tiny, build_policy({"label": "plain", "selector": {"name": "pixel-cosine"}}))
    vla = guarded(tiny, always)
    reused = 0
    for obs in frames[:8]:
        a, b = plain.predict(obs), vla.predict(obs)
        assert a.stats.reused_per_layer == b.stats.reused_per_layer
        assert np.array_equal(a.actions, b.actions)
        reused += sum(b.stats.reused_per_layer)
    assert reused > 0


def test_the_cost_model_is_measured_once_and_cached(tiny, frames, tmp_path, monkeypatch):
    monkeypatch.setenv(guard_module.CACHE_ENV, str(tmp_path))
    vla = CachedVLA(tiny, build_policy({"label": "g", "selector": {"name": "pixel-cosine"}, "guard": True}))
    vla.predict(frames[0])
    files = list((tmp_path / "cost_models").glob("*.json"))
    assert len(files) == 1
    measured = json.loads(files[0].read_text())
    assert measured["untouched_ms"] > 0 and measured["token_layer_ms"] >= 0 and "g" in measured["plan_ms"]

    def refuse(*args, **kwargs):
        raise AssertionError("calibrated again instead of reading the cache")

    monkeypatch.setattr(guard_module, "calibrate", refuse)
    monkeypatch.setattr("vlacache.runtime.calibrate", refuse)
    again = CachedVLA(tiny, build_policy({"label": "g2", "selector": {"name": "pixel-cosine"}, "guard": True}))
    again.predict(frames[0])
    assert again.guard.model.untouched_ms == measured["untouched_ms"]


def test_a_pruner_the_guard_declines_never_prunes(tiny, frames):
    """FastV under a guard whose model says pruning never pays: every step untouched, from the first one on."""
    never = model(reuse_ms=1e6)
    vla = CachedVLA(tiny, build_policy({"label": "fastv-guarded", "pruner": {"name": "fastv", "layer": 1, "ratio": 0.5},
                                        "guard": True}))
    vla.guard.model = never
    baseline = CachedVLA(tiny, None)
    for obs in frames[:4]:
        got = vla.predict(obs)
        assert got.stats.dropped_per_layer is None and np.array_equal(got.actions, baseline.predict(obs).actions)
