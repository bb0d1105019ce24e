"""Reuse plans recorded on the embedded LIBERO episode (vlacache/data/demo_frames.npz) with the shipped micro-policies,
so a change to the planning code (selectors, relevance filters, schedulers, the policy's ordering, batch
combining, staleness) can be checked to give exactly the plans it gave before.

    python -m tests.plan_fixture   # rewrite tests/fixtures/recorded_plans.json (only when a plan SHOULD change)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlacache.envs.replay import embedded_frames_path, load_recording
from vlacache.experiment import build_backbone, build_policy
from vlacache.runtime import CachedVLA
from vlacache.types import Observation

FIXTURE = Path(__file__).parent / "fixtures" / "recorded_plans.json"
# (backbone, policies): every shipped reuse policy that runs on that backbone
CASES = {
    "micro_oft_libero_spatial": ["static_reuse", "static_reuse_filter", "static_reuse_age1", "vla_cache",
                                 "vla_cache_drift", "vla_cache_drift_age1", "vla_cache_cross_view",
                                 "vla_cache_agentview", "vla_cache_action_aware", "reference_code_oft",
                                 "vla_cache_learned"],
    "micro_openvla_libero_spatial": ["vla_cache", "reference_code", "vla_cache_gated"],
}


def observations(batch: int) -> list[Observation]:
    """The embedded episode's 16 steps; batch row r sees it from step 2r on (looped), so rows plan differently."""
    frames, instruction, proprio = load_recording(embedded_frames_path())
    steps = len(proprio)
    out = []
    for t in range(steps):
        at = [(t + 2 * r) % steps for r in range(batch)]
        out.append(Observation(images={c: np.stack([f[i] for i in at]) for c, f in frames.items()},
                               instruction=[instruction] * batch, proprio=np.stack([proprio[i] for i in at])))
    return out


def plan_record(plan) -> dict:
    """A plan as plain lists: per layer the reused positions of every row, and per layer the spliced positions."""
    return {"reused": [r.tolist() for r in plan.reused],
            "spliced": None if plan.spliced is None else [[m.nonzero().flatten().tolist() for m in s] for s in plan.spliced]}


def record(backbone_name: str, policy: str, batch: int) -> list[dict]:
    backbone = build_backbone(backbone_name)
    vla = CachedVLA(backbone, build_policy(policy))
    try:
        return [plan_record(vla.predict(obs).plan) for obs in observations(batch)]
    finally:
        vla.detach()


def record_all() -> dict:
    return {f"{backbone}/{policy}/batch{batch}": record(backbone, policy, batch)
            for backbone, policies in CASES.items() for policy in policies for batch in (1, 2)}


if __name__ == "__main__":
    FIXTURE.write_text(json.dumps(record_all(), separators=(",", ":")) + "\n")
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")
