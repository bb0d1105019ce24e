"""What drawing the cameras costs a LIBERO step, and what a chunk saves by drawing them once.

Interleaved rounds on one simulator: the same 8 random actions from the same initial state, once through
`step()` (every step drawn) and once through `run_actions()` (drawn at the chunk's last action only). Prints
milliseconds per env step for each and their ratio; with --out, writes them as JSON.
    python scripts/libero_chunk_cost.py [--rounds 6] [--resolution 128] [--render fast] [--out results/bench/x.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from vlacache.envs.libero import LiberoEnv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--render", default="fast", choices=["fast", "official"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    env = LiberoEnv(LiberoEnv.Config(tasks=[0], init_states=[0], resolution=args.resolution, render=args.render))
    chunk = np.concatenate([np.random.default_rng(0).uniform(-0.8, 0.8, (8, 6)), np.zeros((8, 1))], axis=1)
    times: dict[str, list[float]] = {"step": [], "run_actions": []}
    for _ in range(args.rounds):
        for way in times:
            env.reset(env.episodes()[0])
            start = time.perf_counter()
            if way == "step":
                for action in chunk:
                    env.step(action)
            else:
                env.run_actions(chunk, len(chunk))
            times[way].append((time.perf_counter() - start) / len(chunk) * 1000)
    env.close()
    ms = {way: statistics.median(values) for way, values in times.items()}
    report = {"ms_per_env_step_median": ms, "rounds": args.rounds, "resolution": args.resolution,
              "render": args.render, "speedup": ms["step"] / ms["run_actions"]}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
