"""Weights held in bfloat16 and run in float32 one matrix at a time (the real-size CPU benchmarks): exactly the
float32 model loaded from the same bfloat16 checkpoint, with the cache engine reusing or not."""

import numpy as np
import pytest
import torch

from vlacache.backbones.openvla_oft import OpenVLAOFTBackbone, build_preset
from vlacache.eval.held_weights import HeldWeights
from vlacache.experiment import build_policy
from vlacache.runtime import CachedVLA


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("oft-bf16")
    build_preset("tiny", seed=3, dtype=torch.bfloat16).save_pretrained(path)
    return path


def held(path):
    backbone = OpenVLAOFTBackbone.from_pretrained(path, dtype=torch.bfloat16)
    weights = HeldWeights(backbone.model)
    backbone.action_head = backbone.action_head.float()
    backbone.proprio_projector = backbone.proprio_projector.float()
    return backbone, weights


@pytest.mark.parametrize("policy", [None, "static_reuse"])
def test_held_weights_compute_exactly_the_float32_model(bf16_checkpoint, frames, policy):
    reference = OpenVLAOFTBackbone.from_pretrained(bf16_checkpoint, dtype=torch.float32)
    backbone, weights = held(bf16_checkpoint)
    assert backbone.dtype == torch.float32
    linear = backbone.decoder.layers[0].mlp.down_proj
    assert linear.weight.dtype == torch.bfloat16  # held, not converted
    a = CachedVLA(reference, build_policy(policy) if policy else None)
    b = CachedVLA(backbone, build_policy(policy) if policy else None)
    reused = 0
    for obs in frames[:3]:
        x, y = a.predict(obs), b.predict(obs)
        assert torch.equal(x.logits, y.logits)
        np.testing.assert_array_equal(x.actions, y.actions)
        reused += sum(y.plan.counts)
    assert (reused > 0) == (policy is not None)
    assert linear.weight.dtype == torch.bfloat16 and weights.copies > 0 and weights.seconds > 0
    weights.release()
    copies = weights.copies
    with pytest.raises(RuntimeError):  # released: a bfloat16 weight meets float32 rows
        CachedVLA(backbone, None).predict(frames[0])
    assert weights.copies == copies
