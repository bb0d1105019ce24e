"""How stale reused K/V get (engine/staleness.py) and drift-aware reuse."""

import numpy as np
import pytest
import torch

from vlacache import CachedVLA, CachePolicy, ConfigError, InputError, Observation

PATCH = 14  # the tiny preset's patch size (224 px, 16 x 16 grid)


def policy(selector: dict) -> CachePolicy:
    return CachePolicy.from_config({"label": "x", "selector": selector, "relevance": {"name": "none"},
                                    "scheduler": {"name": "constant", "fraction": 1.0}, "gate": {"name": "full-first-step"}})


def drifting_frames(frames, steps: int, per_step: int):
    """The first frame with its top-left patch brightened by `per_step` grey levels more at every step: each step
    looks static next to the previous one, the drift over several steps does not."""
    base = frames[0].images["primary"].astype(np.int16)
    out = []
    for t in range(steps):
        image = base.copy()
        image[:PATCH, :PATCH] = np.clip(base[:PATCH, :PATCH] + per_step * t, 0, 255)
        out.append(Observation({"primary": image.astype(np.uint8)}, frames[0].instruction))
    return out


def candidates_of_patch0(vla, observations):
    """Per step: whether patch 0 was reused, and the step's staleness report and the engine's anchors/ages."""
    out = []
    for obs in observations:
        result = vla.predict(obs)
        start = result.plan.info.get("candidates", {}).get("primary")
        out.append((None if start is None else bool(start[0, 0]), result.stats.staleness,
                    vla.engine.episode.staleness))
    return out


def test_ages_count_steps_since_computed_and_anchors_keep_that_frame(tiny, frames):
    observations = drifting_frames(frames, 4, per_step=1)
    with CachedVLA(tiny, policy({"name": "pixel-cosine", "tau": 0.99, "top_k": None})) as vla:
        steps = candidates_of_patch0(vla, observations)
    reused, report, staleness = zip(*steps)
    assert reused == (None, True, True, True)  # the paper's selector never notices the slow drift
    assert report[0] is None
    assert [r["reused_age_max"] for r in report[1:]] == [1.0, 2.0, 3.0]
    drift = [r["reused_drift_max"] for r in report[1:]]
    assert drift == sorted(drift) and drift[0] > 0  # piles up against the frame the K/V came from
    last = staleness[-1]
    assert int(last.ages["primary"][0, 0]) == 3
    # the anchor (a model-input image) still holds the first frame's patch 0, not the latest one's
    first, latest = (tiny.prepare(o).query_images["primary"][0, :PATCH, :PATCH] for o in (observations[0], observations[-1]))
    anchor = last.anchors["primary"][0, :PATCH, :PATCH]
    assert torch.equal(anchor, first) and not torch.equal(anchor, latest)


def test_drift_aware_recomputes_a_patch_that_drifted_from_its_anchor(tiny, frames):
    observations = drifting_frames(frames, 6, per_step=2)
    selector = {"name": "drift-aware", "tau": 0.99, "top_k": None, "anchor_tau": 0.9999, "max_age": None}
    with CachedVLA(tiny, policy(selector)) as vla:
        steps = candidates_of_patch0(vla, observations)
    reused = [r for r, _, _ in steps]
    assert reused[1] is True and False in reused[2:]  # reused while close to its anchor, then recomputed
    after = reused.index(False, 2)
    assert int(steps[after][2].ages["primary"][0, 0]) == 0  # recomputed: a fresh anchor
    if after + 1 < len(reused):
        assert reused[after + 1] is True  # ... which it is close to again


def test_staleness_limit_recomputes_every_token_in_time(tiny, frames):
    identical = [Observation({"primary": frames[0].images["primary"]}, frames[0].instruction)] * 7
    selector = {"name": "drift-aware", "tau": 0.99, "top_k": None, "anchor_tau": 0.99, "max_age": 2}
    with CachedVLA(tiny, policy(selector)) as vla:
        results = [vla.predict(obs) for obs in identical]
    ratios = [r.stats.reuse_ratio for r in results]
    assert ratios == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert max(r.stats.staleness["reused_age_max"] for r in results if r.stats.staleness) == 2


def test_drift_aware_settings_are_checked(tiny):
    with pytest.raises(ConfigError, match="max_age"):
        CachedVLA(tiny, policy({"name": "drift-aware", "max_age": 0}))


@pytest.mark.parametrize("env_steps_per_query", [1, 2, 8])
def test_the_cadence_reaches_the_age_accounting(tiny, frames, env_steps_per_query):
    """Ages count queries; with N env steps between queries (the executed chunk) the same K/V are N times as
    many env steps old, and a limit in env steps recomputes them after max_age_env_steps / N queries."""
    identical = [Observation({"primary": frames[0].images["primary"]}, frames[0].instruction)] * 7
    selector = {"name": "drift-aware", "tau": 0.99, "top_k": None, "anchor_tau": 0.99, "max_age": None,
                "max_age_env_steps": 4}
    with CachedVLA(tiny, policy(selector), env_steps_per_query=env_steps_per_query) as vla:
        results = [vla.predict(obs) for obs in identical]
    reports = [r.stats.staleness for r in results if r.stats.staleness]
    for report in reports:
        assert report["reused_age_env_steps_max"] == report["reused_age_max"] * env_steps_per_query
        assert report["reused_age_env_steps_mean"] == pytest.approx(report["reused_age_mean"] * env_steps_per_query)
    # K/V at most 4 env steps old: reused for 4 queries in a row at 1 env step per query, 2 at 2, never at 8
    chained = 4 // env_steps_per_query
    period = [0.0] + [1.0] * chained
    expected = (period * 7)[:7]
    assert [r.stats.reuse_ratio for r in results] == expected
    assert max((r["reused_age_env_steps_max"] for r in reports), default=0) == chained * env_steps_per_query


def test_the_cadence_must_be_a_positive_int(tiny):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="env_steps_per_query must be an int >= 1"):
            CachedVLA(tiny, None, env_steps_per_query=bad)
    with pytest.raises(ConfigError, match="max_age_env_steps must be >= 1"):
        CachedVLA(tiny, policy({"name": "drift-aware", "max_age_env_steps": 0}))
