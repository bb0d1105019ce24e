"""The learned selector next to the hand-set rows on the demonstrations its training held out for validation.

Replays the validation episodes of `configs/train/learned_reuse_micro_oft.yaml` (the same split: the same
max_episodes, val_fraction and seed) at the OFT micro-policy's closed-loop cadence (one query per 8 recorded
steps, whole episodes, no window resets) and reports per policy the reuse ratio and the deviation the training
penalises: |a_cached - a_nocache| in half the q01..q99 range, mean over the chunk, worst action dimension. A
one-pixel camera shift of the no-cache model is the yardstick.

    python scripts/learned_selector_validation.py --out results/train/learned_reuse_micro_oft/validation_comparison.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from vlacache import attach
from vlacache.experiment import build_backbone, load_config
from vlacache.train.demos import load_demos
from vlacache.train.reuse import ReuseTrainConfig, action_deviation, action_scale, held_out_split, query_episodes
from vlacache.types import Observation

POLICIES = ["vla_cache", "vla_cache_drift", "vla_cache_learned",
            {"label": "fastv", "pruner": {"name": "fastv", "layer": 1, "ratio": 0.5, "query": "last"}},
            {"label": "layer-dynamic", "selector": {"name": "none"},
             "pruner": {"name": "layer-dynamic", "layers": [1, 2, 3], "keep_mass": 0.9, "max_ratio": 0.3}}]


def summary(deviations: list[float], reuse: list[float], tolerance: float) -> dict[str, float]:
    d = np.asarray(deviations)
    return {"queries": len(d), "reuse": float(np.mean(reuse)), "deviation_mean": float(d.mean()),
            "deviation_p50": float(np.percentile(d, 50)), "deviation_p90": float(np.percentile(d, 90)),
            "within_tolerance": float(np.mean(d <= tolerance))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(ReuseTrainConfig, "learned_reuse_micro_oft", "train")
    _, val = held_out_split(config, load_demos(config.demos))
    episodes = query_episodes(val, config.query_every)
    backbone = build_backbone(config.backbone)
    scale = action_scale(backbone)

    def deviation(a: np.ndarray, b: np.ndarray) -> float:
        return action_deviation(a, b, scale)

    with attach(backbone, "no_cache") as plain:
        reference = [[plain.predict(o).actions for o in e.observations] for e in episodes]
        shifted = [deviation(plain.predict(Observation({c: np.roll(i, 1, axis=1) for c, i in o.images.items()},
                                                       o.instruction, o.proprio)).actions, r)
                   for e, refs in zip(episodes, reference) for o, r in zip(e.observations[1:], refs[1:])]
    rows = {"no cache, cameras shifted by 1 px": summary(shifted, [0.0] * len(shifted), config.tolerance)}
    for spec in POLICIES:
        deviations, reuse = [], []
        with attach(backbone, spec) as vla:
            for episode, refs in zip(episodes, reference):
                vla.reset()
                for q, (obs, ref) in enumerate(zip(episode.observations, refs)):
                    result = vla.predict(obs)
                    if q:
                        deviations.append(deviation(result.actions, ref))
                        reuse.append(result.stats.reuse_ratio)
        rows[vla.policy.label] = summary(deviations, reuse, config.tolerance)
    out = {"episodes": len(episodes), "query_every": config.query_every, "tolerance": config.tolerance, "rows": rows}
    with open(args.out, "w") as handle:
        json.dump(out, handle, indent=1)
    for label, row in rows.items():
        print(f"{label:<36} reuse {row['reuse']:.3f}  deviation mean {row['deviation_mean']:.4f}  "
              f"p90 {row['deviation_p90']:.4f}  within {config.tolerance}: {row['within_tolerance']:.2f}")


if __name__ == "__main__":
    main()
