"""Resuming across a change to the code that decides outcomes, when the change provably changes none.

A results folder is refused when the code of a strategy, backbone or env in use changed (`fingerprint.py`):
the episodes still to run might behave differently from those recorded. A behaviour-preserving refactor (code
moved into a shared module, names made public) changes that code too. `vlacache run --verify-code-change`
then re-runs, for each such policy, its first recorded episode under the new code, with the thread count it was
recorded with (`torch_threads`: float rounding, and so the trajectory, depend on it), and resumes only if the
record comes out the same in every outcome field; `run.json` keeps that evidence with the new build.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..experiment import ExperimentConfig, build_backbone, build_env, build_policy

#: what must come out the same: the outcome, and every statistic of the episode that reuse decisions shape
OUTCOME_FIELDS = ("success", "env_steps", "queries", "reuse_ratio", "reused_per_layer", "flops_mean", "reused_age")


def first_episode(records: list[dict], label: str) -> dict | None:
    """The policy's earliest finished episode without an error (by finish time), or None."""
    mine = [r for r in records if r.get("policy") == label and r.get("error") is None]
    return min(mine, key=lambda r: r.get("finished_at") or 0.0) if mine else None


def reproduce(config: ExperimentConfig, label: str, record: dict) -> dict[str, Any]:
    """Run `record`'s episode again with the current code and the record's thread count; the fields of
    OUTCOME_FIELDS that differ (empty: reproduced exactly), with what was recorded and what came out."""
    from .runner import env_steps_per_query, run_episode  # the runner imports this room's fingerprint module

    spec = next((s for s in config.policies if build_policy(s).label == label), None)
    if spec is None:
        raise ValueError(f"policy '{label}' is not in this experiment's policies")
    # a record older than `torch_threads`: what Lightning gives each of the run's processes on this machine
    threads = record.get("torch_threads") or max(1, (os.cpu_count() or 1) // max(1, config.launcher.devices))
    before = torch.get_num_threads()
    env = build_env(config.env, config.perturbation)
    try:
        episode = next((e for e in env.episodes() if (e.task, e.init_state, e.seed) ==
                        (record["task"], record["init_state"], record.get("seed"))), None)
        if episode is None:
            raise ValueError(f"episode {record['task']} / init state {record['init_state']} is not in the env any more")
        torch.set_num_threads(threads)
        backbone = build_backbone(config.backbone)
        from ..runtime import CachedVLA

        with CachedVLA(backbone, build_policy(spec), **config.fast_path.options(),
                       env_steps_per_query=env_steps_per_query(config, backbone)) as vla:
            again = run_episode(vla, env, episode, config, None)
    finally:
        torch.set_num_threads(before)
        env.close()
    differ = {key: {"recorded": record.get(key), "now": again.get(key)} for key in OUTCOME_FIELDS
              if key in record and record.get(key) != again.get(key)}
    return {"episode": f"{record['task']}|{record['init_state']}", "torch_threads": threads, "differ": differ,
            "error": again.get("error")}
