"""Batched episodes: each batch row is its own episode; a batch equals B separate runs."""

import numpy as np
import pytest
import torch

from vlacache import CachedVLA, CachePolicy, InputError, Observation, ReusePlan

STEPS = 6


def other_instruction(backbone, instruction):
    """A different instruction that tokenizes to as many tokens (a batch shares one prompt length)."""
    length = len(backbone.prompt_ids(instruction))
    swaps = [("black", word) for word in ("white", "red", "blue", "green", "small", "big")] + [("pick up", "lift")]
    for candidate in [instruction.replace(old, new, 1) for old, new in swaps]:
        if candidate != instruction and len(backbone.prompt_ids(candidate)) == length:
            return candidate
    pytest.fail("no candidate instruction has the same token length")


def streams(backbone, frames):
    """Per row, per step: (observation, whether the row's episode restarts before this step by reset(rows))."""
    image = [f.images["primary"] for f in frames]
    instruction = frames[0].instruction
    new = other_instruction(backbone, instruction)
    rows = [
        [(image[t], instruction, False) for t in range(STEPS)],  # one episode
        [(image[STEPS - 1 - t], instruction if t < 4 else new, False) for t in range(STEPS)],  # new instruction at 4
        [(image[t], instruction, t == 3) for t in range(STEPS)],  # its env resets at step 3
    ]
    return [[(Observation({"primary": img}, text), restart) for img, text, restart in row] for row in rows]


# per-row staleness (engine/staleness.py) decides this one's candidates: anchors and ages must follow each row
DRIFT_AWARE = {"label": "drift-aware", "selector": {"name": "drift-aware", "tau": 0.996, "top_k": 100, "anchor_tau": 0.999,
                                                    "max_age": 3},
               "relevance": {"name": "none"}, "scheduler": {"name": "constant", "fraction": 1.0},
               "gate": {"name": "full-first-step"}}


@pytest.mark.parametrize("policy", ["static_reuse", "static_reuse_filter", DRIFT_AWARE], ids=["static", "filter", "drift"])
def test_a_batch_of_episodes_equals_separate_runs(tiny, frames, policy):
    rows = streams(tiny, frames)
    alone = []
    for row in rows:
        with CachedVLA(tiny, CachePolicy.from_config(policy)) as vla:
            results = []
            for obs, restart in row:
                if restart:
                    vla.reset()
                results.append(vla.predict(obs))
            alone.append(results)
    batched = []
    with CachedVLA(tiny, CachePolicy.from_config(policy)) as vla:
        for t in range(STEPS):
            restart = [b for b, row in enumerate(rows) if row[t][1]]
            if restart:
                vla.reset(rows=restart)
            observations = [row[t][0] for row in rows]
            batch = Observation({"primary": np.stack([o.images["primary"] for o in observations])},
                                [o.instruction for o in observations])
            batched.append(vla.predict(batch))
    padded_steps = 0
    for t, step in enumerate(batched):
        if t:
            assert step.plan.row_counts == [alone[b][t].plan.counts for b in range(len(rows))]
        padded_steps += step.plan.spliced is not None
        for b in range(len(rows)):
            torch.testing.assert_close(step.logits[b], alone[b][t].logits[0], atol=1e-4, rtol=0)
            np.testing.assert_allclose(step.actions[b], alone[b][t].actions[0], atol=1e-5)
    # the rows reused different amounts (so the batch padded), and a fresh row did not stop the others reusing
    assert padded_steps >= 2
    assert batched[3].plan.row_counts[2] == [0] * len(tiny.decoder.layers)
    assert sum(batched[3].plan.row_counts[0]) > 0
    assert batched[4].plan.row_counts[1] == [0] * len(tiny.decoder.layers)  # its new instruction


def test_combined_plan_is_the_common_prefix_and_splices_the_rest():
    a = ReusePlan.from_order(torch.tensor([[5, 3, 7]]), [1, 3])
    b = ReusePlan.from_order(torch.tensor([[4, 6]]), [2, 2])
    plan = ReusePlan.combine([a, b], length=10)
    assert plan.counts == [1, 2]
    assert plan.reused[0].tolist() == [[5], [4]] and plan.reused[1].tolist() == [[3, 5], [4, 6]]
    assert plan.spliced[1][0].nonzero().flatten().tolist() == [3, 5, 7]
    assert plan.spliced[0][1].nonzero().flatten().tolist() == [4, 6]
    plan.validate(2, 2, 10)
    plan.spliced[1][0, 3] = False
    with pytest.raises(ValueError, match="also be spliced"):
        plan.validate(2, 2, 10)


def test_reset_rows_needs_a_backbone_whose_own_state_is_per_row(tiny):
    from vlacache.backbones.cogact import build_preset

    with CachedVLA(build_preset("tiny", seed=0), CachePolicy.from_config("static_reuse")) as vla:
        with pytest.raises(InputError, match="whole batch"):
            vla.reset(rows=[1])
    with CachedVLA(tiny, CachePolicy.from_config("static_reuse")) as vla:
        vla.reset(rows=[0])  # nothing to forget yet: fine


@pytest.mark.parametrize("policy", ["static_reuse", DRIFT_AWARE], ids=["static", "drift"])
def test_rows_leave_the_batch_and_the_others_keep_their_caches(tiny, frames, policy):
    """Envs whose episodes ended leave the batch (keep_rows); the rest go on exactly as alone, reusing."""
    rows = streams(tiny, frames)[:2] + [[(Observation({"primary": f.images["primary"]}, f.instruction), False) for f in frames]]
    alone = []
    for row in rows:
        with CachedVLA(tiny, CachePolicy.from_config(policy)) as vla:
            alone.append([vla.predict(obs) for obs, _ in row])
    with CachedVLA(tiny, CachePolicy.from_config(policy)) as vla:
        members = [0, 1, 2]
        for t in range(STEPS):
            if t == 3:
                members = [2, 0]
                vla.keep_rows([2, 0])
            step = vla.predict(Observation.stack([rows[b][t][0] for b in members]))
            for i, b in enumerate(members):
                torch.testing.assert_close(step.logits[i], alone[b][t].logits[0], atol=1e-4, rtol=0)
                assert step.plan.row_counts[i] == alone[b][t].plan.counts
            if t == 3:
                assert not step.stats.episode_reset and sum(step.plan.counts) > 0
