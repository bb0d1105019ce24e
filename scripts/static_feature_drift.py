"""How much the features of pixel-static patches change between consecutive policy queries (BENCHMARKS.md, the
micro-policy ablation's explanation). For each camera of the OFT micro-policy, over the first steps of recorded
demonstrations: the relative change |e_t - e_{t-1}| / |e_{t-1}| of each patch's decoder-input embedding (vision
towers + projector) and of its K at every decoder layer (full forward, no cache), for patches the paper's test
calls static (pixel cosine >= 0.996) and for the others; and, for static patches, the change of K against the
step at which the patch last changed (what reuse chained over consecutive static steps would serve).

    python scripts/static_feature_drift.py [--demos data/demos/libero_spatial] [--pattern '*_seed10000[0-3].npz']
        [--steps 16] [--out results/bench/micro_oft_static_drift.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from vlacache.envs.replay import ReplayEnv
from vlacache.eval.bench import collect_episodes
from vlacache.experiment import build_backbone
from vlacache.patches import patch_cosine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="micro_oft_libero_spatial")
    parser.add_argument("--demos", default="data/demos/libero_spatial")
    parser.add_argument("--pattern", default="*_seed10000[0-3].npz")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--tau", type=float, default=0.996)
    parser.add_argument("--out", default="results/bench/micro_oft_static_drift.json")
    args = parser.parse_args()

    backbone = build_backbone(args.backbone)
    env = ReplayEnv(ReplayEnv.Config(path=args.demos, pattern=args.pattern))
    episodes = collect_episodes(env, None, args.steps)
    layers = len(backbone.decoder.layers)
    drift: dict[str, dict[str, list[float]]] = {}
    with torch.inference_mode():
        for frames in episodes:
            previous, anchor = None, {}  # anchor: per camera, each patch's keys when it last counted as changed
            for obs in frames:
                inputs = backbone.prepare(obs)
                embeds = backbone.embed(inputs)
                cache = backbone.new_cache()
                backbone.prefill(embeds, inputs, cache)
                keys = [cache.layers[i].keys[0].transpose(0, 1).flatten(1) for i in range(layers)]  # [L, H*hd]
                current = {"images": inputs.query_images, "embeds": embeds[0], "keys": keys}
                if previous is not None:
                    for camera, span in inputs.layout.vision.items():
                        static = patch_cosine(current["images"][camera], previous["images"][camera],
                                              span.rows, span.cols)[0] >= args.tau
                        rows = slice(span.start, span.stop)
                        series = {"embedding": (current["embeds"][rows], previous["embeds"][rows])}
                        series |= {f"keys layer {i}": (current["keys"][i][rows], previous["keys"][i][rows])
                                   for i in range(layers)}
                        # what chained reuse serves: a patch static since it last changed keeps that step's keys
                        stale = anchor.setdefault(camera, [k[rows].clone() for k in previous["keys"]])
                        series |= {f"keys layer {i} vs last recompute": (current["keys"][i][rows], stale[i])
                                   for i in range(layers)}
                        for name, (now, before) in series.items():
                            change = ((now - before).norm(dim=-1) / before.norm(dim=-1).clamp_min(1e-12)).cpu().numpy()
                            for kind, mask in (("static", static), ("changed", ~static)):
                                if kind == "changed" and name.endswith("last recompute"):
                                    continue
                                drift.setdefault(f"{camera} {kind}", {}).setdefault(name, []).extend(
                                    change[mask.cpu().numpy()].tolist())
                        for i in range(layers):
                            stale[i][~static] = current["keys"][i][rows][~static]
                previous = current
    report = {"backbone": args.backbone, "demos": args.demos, "pattern": args.pattern, "episodes": len(episodes),
              "steps": args.steps, "tau": args.tau, "relative_change": {}}
    for group, series in drift.items():
        report["relative_change"][group] = {
            name: {"patches": len(v), "mean": float(np.mean(v)), "p50": float(np.median(v)), "p95": float(np.percentile(v, 95))}
            for name, v in series.items() if v}
    Path(args.out).write_text(json.dumps(report, indent=1))
    for group, series in report["relative_change"].items():
        print(group, {name: round(s["mean"], 3) for name, s in series.items()}, "patches", next(iter(series.values()))["patches"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
