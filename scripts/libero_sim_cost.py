"""What the LIBERO simulator costs a closed-loop episode on a CPU: a reset, and the camera draws of a chunk.

Interleaved rounds on one simulator (task 0, initial state 0, render: fast):
- reset: a hard reset (a new simulator) whose render context is made once, already without multisampling, against
  the earlier path that made it and then remade it fast (`use_fast_render`); seconds per reset.
- chunk: the same 8 random actions from the same initial state, once through `step()` (every step drawn) and once
  through `run_actions()` (drawn at the chunk's last action only); milliseconds per env step.
Prints medians and ratios; with --out, writes them as JSON.
    python scripts/libero_sim_cost.py [--rounds 6] [--resolution 128] [--out results/bench/x.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from vlacache.envs.libero import LiberoEnv, build_simulators_without_multisampling


def reset_seconds(env: LiberoEnv, make_once: bool) -> float:
    robosuite_env = env._env.env
    vars(robosuite_env).pop("_initialize_sim", None)  # the class's: the context is made, then remade fast
    if make_once:
        build_simulators_without_multisampling(robosuite_env)
    start = time.perf_counter()
    env.reset(env.episodes()[0])
    return time.perf_counter() - start


def step_ms(env: LiberoEnv, chunk: np.ndarray, drawn_once: bool) -> float:
    env.reset(env.episodes()[0])
    start = time.perf_counter()
    if drawn_once:
        env.run_actions(chunk, len(chunk))
    else:
        for action in chunk:
            env.step(action)
    return (time.perf_counter() - start) / len(chunk) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    env = LiberoEnv(LiberoEnv.Config(tasks=[0], init_states=[0], resolution=args.resolution, render="fast"))
    env.reset(env.episodes()[0])
    chunk = np.concatenate([np.random.default_rng(0).uniform(-0.8, 0.8, (8, 6)), np.zeros((8, 1))], axis=1)
    resets: dict[str, list[float]] = {"context_made_twice": [], "context_made_once": []}
    steps: dict[str, list[float]] = {"step": [], "run_actions": []}
    for _ in range(args.rounds):
        for way in resets:
            resets[way].append(reset_seconds(env, way == "context_made_once"))
        for way in steps:
            steps[way].append(step_ms(env, chunk, way == "run_actions"))
    build_simulators_without_multisampling(env._env.env)
    env.close()
    s = {way: statistics.median(values) for way, values in resets.items()}
    ms = {way: statistics.median(values) for way, values in steps.items()}
    report = {"s_per_reset_median": s, "reset_speedup": s["context_made_twice"] / s["context_made_once"],
              "ms_per_env_step_median": ms, "chunk_speedup": ms["step"] / ms["run_actions"],
              "rounds": args.rounds, "resolution": args.resolution, "render": "fast"}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
