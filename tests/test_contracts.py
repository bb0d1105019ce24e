"""Contracts every registered component keeps, checked for whatever is registered when the tests are collected
(a new strategy or backbone is picked up without a test of its own):

- every strategy, in its slot of an otherwise plain policy, attaches to every tiny backbone, or is refused at
  attach time with a reason; attached, it runs two steps (the episode's full first step, then the same frames
  again, which the plain selector finds static), and every step whose plan reuses and drops nothing is
  bit-identical to the backbone without a cache;
- every backbone's tiny preset saves in its released layout and loads back to the same actions.
"""

import numpy as np
import pytest
import torch

from vlacache import CachedVLA, CachePolicy, ConfigError, Observation
from vlacache.registry import BACKBONES, STRATEGIES, STRATEGY_KINDS

BASE = {"selector": {"name": "pixel-cosine", "tau": 0.99, "top_k": None}, "relevance": {"name": "none"},
        "scheduler": {"name": "constant", "fraction": 1.0}, "gate": {"name": "full-first-step"}}
STRATEGY_CASES = [(kind, name) for kind in STRATEGY_KINDS for name in STRATEGIES[kind].names()]
BACKBONE_NAMES = BACKBONES.names()


@pytest.fixture(scope="module")
def backbones():
    built = {}
    for name in BACKBONE_NAMES:
        cls = BACKBONES.get(name)
        built[name] = cls.from_config(cls.Config(preset="tiny", device="cpu"))
    return built


def observations(backbone, frames):
    """The same frames twice: the second step may reuse everything static."""
    first = frames[0].images["primary"]
    images = {camera: first if i == 0 else np.ascontiguousarray(first[::-1]) for i, camera in enumerate(backbone.cameras)}
    proprio = np.zeros(8, dtype=np.float32) if getattr(backbone, "uses_proprio", False) else None
    return [Observation(images, frames[0].instruction, proprio)] * 2


_PLAIN: dict[str, list] = {}


def plain_steps(backbone_name, backbone, steps):
    """The backbone without a cache on the same steps (once per backbone)."""
    if backbone_name not in _PLAIN:
        _PLAIN[backbone_name] = run(backbone, None, steps)
    return _PLAIN[backbone_name]


def run(backbone, policy, steps):
    with CachedVLA(backbone, policy) as vla:
        vla.reset()
        return [vla.predict(obs) for obs in steps]


@pytest.mark.parametrize("backbone_name", BACKBONE_NAMES)
@pytest.mark.parametrize("kind, name", STRATEGY_CASES)
def test_every_strategy_attaches_runs_and_is_exact_when_it_reuses_nothing(backbones, frames, kind, name, backbone_name):
    backbone = backbones[backbone_name]
    settings = STRATEGIES[kind].get(name).example
    policy = CachePolicy.from_config({"label": f"{kind}:{name}", **BASE, kind: {"name": name, **settings}})
    steps = observations(backbone, frames)
    try:
        cached = run(backbone, policy, steps)
    except ConfigError as refusal:  # refused at attach time, with a reason
        assert len(str(refusal)) > 30 and name in str(refusal), str(refusal)
        with pytest.raises(ConfigError):
            CachedVLA(backbone, policy)  # ... and by the constructor, before any step
        return
    plain = plain_steps(backbone_name, backbone, steps)
    assert sum(cached[0].plan.counts) == 0  # the first step of an episode is always full
    exact = 0
    for step, (mine, reference) in enumerate(zip(cached, plain)):
        assert np.isfinite(mine.actions).all() and mine.actions.shape == reference.actions.shape
        if sum(mine.plan.counts) == 0 and not mine.plan.prune:
            assert torch.equal(mine.logits, reference.logits), f"step {step}: nothing reused, yet other logits"
            np.testing.assert_array_equal(mine.actions, reference.actions)
            exact += 1
    assert exact >= 1 or all(step.plan.prune for step in cached)  # a pruner drops tokens by design


@pytest.mark.parametrize("backbone_name", BACKBONE_NAMES)
def test_every_backbone_saves_and_loads_in_its_released_layout(backbones, frames, tmp_path, backbone_name):
    backbone = backbones[backbone_name]
    backbone.save_pretrained(tmp_path / backbone_name)
    cls = BACKBONES.get(backbone_name)
    loaded = cls.from_config(cls.Config(checkpoint=str(tmp_path / backbone_name), device="cpu", dtype="float32"))
    steps = observations(backbone, frames)[:1]
    a, b = run(backbone, None, steps)[0], run(loaded, None, steps)[0]
    assert torch.equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.actions, b.actions)
