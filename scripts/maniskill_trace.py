"""Where a policy takes the arm in one ManiSkill episode: every Nth step's commanded translation and gripper, the
TCP and the manipulated cube's positions (metres, world frame), and when the task counts as solved. Runs in
the maniskill venv; no cache, one action per query, as `vlacache run` with the ablation's env.
    .venvs/maniskill/bin/python scripts/maniskill_trace.py micro_openvla_maniskill PushCube-v1 0 [--every 6]
    [--steps 200] [--out trace.jsonl]"""
import argparse
import json

import numpy as np
import torch
import yaml

import vlacache
from vlacache.env import EpisodeSpec
from vlacache.experiment import build_backbone, build_env

parser = argparse.ArgumentParser()
parser.add_argument("backbone", help="a shipped backbone config, e.g. micro_cogact_maniskill")
parser.add_argument("task")
parser.add_argument("seed", type=int)
parser.add_argument("--every", type=int, default=6)
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--out", help="also write every step as JSON lines")
args = parser.parse_args()
torch.set_num_threads(1)


def rounded(values) -> list[float]:
    return [round(float(v), 3) for v in values]


env = build_env(yaml.safe_load(open("configs/env/maniskill_tabletop.yaml")))
rows = []
with vlacache.attach(build_backbone(args.backbone), "no_cache") as vla:
    obs = env.reset(EpisodeSpec(args.task, 0, args.seed))
    vla.reset()
    scene = env._env.unwrapped
    cube = scene.cubeA if hasattr(scene, "cubeA") else scene.obj
    for t in range(args.steps):
        action = np.asarray(vla.predict(obs).actions[0, 0], dtype=np.float64)
        obs, _, done, info = env.step(action)
        row = {"step": t, "xyz": rounded(action[:3]), "gripper": round(float(action[6]), 2),
               "tcp": rounded(scene.agent.tcp.pose.p[0]), "cube": rounded(cube.pose.p[0]),
               "success": bool(info.get("success"))}
        rows.append(row)
        if t % args.every == 0 or done:
            print(json.dumps(row), flush=True)
        if done:
            break
if args.out:
    with open(args.out, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
