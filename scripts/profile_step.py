"""Where a control step's time goes, per cache policy: the step's sections (StepStats latencies, median ms) and
torch.profiler's operator table (self CPU time per step), over recorded episodes.

    python scripts/profile_step.py --out results/bench/profile_micro_oft_after.txt
    python scripts/profile_step.py --policies static_reuse vla_cache_drift_age1 fastv --threads 1

Runs on whichever vlacache is imported (PYTHONPATH=<another checkout> profiles that one the same way), so a
change can be profiled before and after with one script.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import vlacache
from vlacache.eval.bench import collect_episodes
from vlacache.experiment import build_backbone, build_env, build_policy
from vlacache.runtime import LATENCY_PARTS, CachedVLA

FASTV = {"label": "fastv", "pruner": {"name": "fastv", "layer": 1, "ratio": 0.5, "query": "last"}}


def policy_spec(name: str):
    return FASTV if name == "fastv" else name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="micro_oft_libero_spatial")
    parser.add_argument("--demos", default="data/demos/libero_spatial")
    parser.add_argument("--pattern", default="*_seed10000[0-1].npz")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--policies", nargs="+", default=["no_cache", "static_reuse", "vla_cache_drift_age1", "fastv"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ops", type=int, default=15, help="operator rows per policy")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone = build_backbone(args.backbone)
    env = build_env({"name": "replay", "path": args.demos, "pattern": args.pattern})
    episodes = collect_episodes(env, None, args.steps)
    env.close()
    steps = sum(len(e) for e in episodes)
    commit = subprocess.run(["git", "-C", str(Path(vlacache.__file__).parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    lines = [f"vlacache at {commit or '?'} (plus any uncommitted change), backbone {args.backbone}, {len(episodes)} "
             f"episodes x {args.steps} steps of {args.demos}/{args.pattern}, torch threads {args.threads}", ""]
    for name in args.policies:
        vla = CachedVLA(backbone, None if name == "no_cache" else build_policy(policy_spec(name)))
        for obs in episodes[0]:  # warm-up
            vla.predict(obs)
        latencies = {part: [] for part in (*LATENCY_PARTS, "total")}
        reuse = []
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for frames in episodes:
                vla.reset()
                for obs in frames:
                    stats = vla.predict(obs).stats
                    reuse.append(stats.reuse_ratio)
                    for part in latencies:
                        latencies[part].append(stats.latency_ms[part])
        vla.detach()
        sections = "  ".join(f"{part} {statistics.median(v):.2f}" for part, v in latencies.items())
        lines += [f"== {name}: median ms per step (under the profiler): {sections}; mean reuse {statistics.mean(reuse):.1%}",
                  f"{'operator':44s} {'calls/step':>10s} {'self us/step':>13s}"]
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.ops]
        lines += [f"{e.key[:44]:44s} {e.count / steps:10.1f} {e.self_cpu_time_total / steps:13.1f}" for e in events]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
