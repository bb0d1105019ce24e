"""A short demonstration folder in the format `vlacache demos` writes, shared by the training tests."""

import json

import numpy as np

from vlacache.envs.replay import save_recording
from vlacache.train.demos import INDEX, write_statistics

INSTRUCTIONS = ["pick up the black bowl next to the ramekin and place it on the plate",
                "pick up the black bowl on the stove and place it on the plate"]


def write_demo_folder(folder):
    """Four short episodes in the format `vlacache demos` writes (index.jsonl, one .npz per episode) into folder."""
    rng = np.random.default_rng(0)
    with open(folder / INDEX, "w") as index:
        for e in range(4):
            steps = 10 + e
            name = f"libero_spatial_task{e % 2}_seed{100000 + e}.npz"
            ramp = np.linspace(0, 255, 128, dtype=np.float32)
            image = np.stack([np.broadcast_to(ramp, (128, 128))] * 3, -1)
            frames = np.stack([np.roll(image, 3 * t, axis=1) for t in range(steps)]).astype(np.uint8)
            actions = np.concatenate([rng.uniform(-0.8, 0.8, (steps, 6)), (np.arange(steps) < 5)[:, None]], 1)
            save_recording(folder / name, {"primary": frames, "wrist": frames[:, ::-1]}, INSTRUCTIONS[e % 2],
                           rng.normal(size=(steps, 8)).astype(np.float32), actions=actions.astype(np.float32),
                           task=np.array(f"libero_spatial/{e % 2}"), seed=np.array(100000 + e))
            index.write(json.dumps({"task": f"libero_spatial/{e % 2}", "seed": 100000 + e, "success": True,
                                    "steps": steps, "file": name, "wall_s": 1.0}) + "\n")
        index.write(json.dumps({"task": "libero_spatial/1", "seed": 100009, "success": False, "steps": 220,
                                "file": None, "wall_s": 1.0}) + "\n")
    write_statistics(folder, "libero_spatial")
    return folder
