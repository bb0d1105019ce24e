"""Offline fit of micro-policies on recorded demonstrations (each query's first action, no ensemble):
|a_pred - a_expert| per action dimension (every 4th step of every 2nd episode of the 10% validation split of
data/demos/libero_spatial, as `vlacache train` splits it) and how often the gripper command agrees, beside the
same error of always answering the demonstrations' mean action (a policy that learned nothing), and how far the
policy moves on each episode's first frame (|xyz| of its action) beside the expert's first 8 moves (a policy
that stands still there never leaves it). argv: policy folders or shipped names, optionally first `--demos FOLDER`
(default data/demos/libero_spatial), `--backbone NAME` (default openvla; one camera), `--image blank` (a black
frame instead of the camera's: does the image reach the action at all?), `--split train` (as many training
episodes instead: a fit much closer there than on held-out episodes is overfitting) and `--cache POLICY` (a cache
policy's name or inline JSON, default no_cache; the queries are 4 steps apart, so reuse draws on K/V 4 steps
old: does FastV or reuse change the fit?).
    python scripts/offline_check.py micro_openvla_libero_spatial runs/train/<run>/policy
    python scripts/offline_check.py --demos data/demos/maniskill_tabletop --backbone cogact micro_cogact_maniskill
    python scripts/offline_check.py --demos data/demos/maniskill_tabletop --backbone cogact \
        --cache '{"label": "fastv", "pruner": {"name": "fastv", "layer": 1, "ratio": 0.5}}' micro_cogact_maniskill"""
import json
import sys

import numpy as np
import torch

import vlacache
from vlacache.experiment import build_backbone
from vlacache.train.bc import NOOP_TOLERANCE, split_episodes
from vlacache.train.demos import load_demos
from vlacache.types import Observation

torch.set_num_threads(1)
args = sys.argv[1:]
options = {"--demos": "data/demos/libero_spatial", "--backbone": "openvla", "--image": "camera", "--split": "val",
           "--cache": "no_cache"}
while args[:1] and args[0] in options:
    options[args[0]], args = args[1], args[2:]
folder, backbone_name, blank = options["--demos"], options["--backbone"], options["--image"] == "blank"
cache = json.loads(options["--cache"]) if options["--cache"].startswith("{") else options["--cache"]
demos = load_demos(folder)
train, val = split_episodes(list(range(len(demos))), 0.1, 0)
val = val[::2]  # every 2nd held-out episode (15 of 30 with 300 demonstrations)
if options["--split"] == "train":
    val = train[::max(1, len(train) // len(val))][:len(val)]
(suite_statistics,) = demos.statistics.values()  # written by `vlacache demos` over every stored transition
mean_action = np.asarray(suite_statistics["action"]["mean"])
for policy in args:
    bb = build_backbone({"name": backbone_name, "checkpoint": policy, "device": "cpu"})
    errs, grip, base, first, first_move = [], [], [], [], []
    with vlacache.attach(bb, cache) as vla:
        for i in val:
            e = demos[i]
            vla.reset()
            for t in range(0, len(e["actions"]), 4):
                image = np.zeros_like(e["primary"][t]) if blank else e["primary"][t]
                a = np.asarray(vla.predict(Observation(images={"primary": image},
                                                       instruction=e["instruction"])).actions[0, 0], dtype=np.float64)
                if t == 0:  # does the policy leave the first frame? (the expert: its first 8 steps that move)
                    first.append(np.linalg.norm(a[:3]))
                    moves = np.linalg.norm(e["actions"][:, :3], axis=1)
                    first_move.append(moves[moves > NOOP_TOLERANCE][:8].mean())
                errs.append(np.abs(a - e["actions"][t]))
                base.append(np.abs(mean_action - e["actions"][t]))
                grip.append((a[6] > 0.5) == (e["actions"][t][6] > 0.5))
    errs = np.array(errs)
    print(json.dumps({"policy": policy, "image": options["--image"], "split": options["--split"],
                      "cache": options["--cache"],
                      "episodes": len(val), "steps": len(errs),
                      "mean_abs_err": np.round(errs.mean(0), 4).tolist(),
                      "mean_action_abs_err": np.round(np.array(base).mean(0), 4).tolist(),
                      "gripper_agree": round(float(np.mean(grip)), 4),
                      "first_frame_xyz_norm": round(float(np.mean(first)), 4),
                      "expert_first_moves_xyz_norm": round(float(np.mean(first_move)), 4)}), flush=True)
