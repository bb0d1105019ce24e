"""`vlacache record` (vlacache.eval.recording): one episode's observations to a compact file that the replay env
plays back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..experiment import ExperimentConfig, build_backbone, build_env, build_policy
from ..runtime import CachedVLA
from .results import check_writable_file


def record_episode(config: ExperimentConfig, out: str | Path, max_steps: int | None = None, episode_index: int = 0,
                   progress: bool = True) -> Path:
    """Drive the env with the experiment's first policy and save every observation it produced."""
    from vlacache.envs.replay import save_recording

    config.check()
    out = check_writable_file(out, "the recording", "pass a writable path, e.g. --out /tmp/episode.npz")
    env = build_env(config.env, config.perturbation)
    episodes = env.episodes()
    if not 0 <= episode_index < len(episodes):
        raise ValueError(f"episode index {episode_index} out of range: the env lists {len(episodes)} episodes")
    backbone = build_backbone(config.backbone)
    limit = max_steps or config.max_steps or env.max_steps
    frames: dict[str, list[np.ndarray]] = {}
    proprio: list[np.ndarray] = []
    try:
        with CachedVLA(backbone, build_policy(config.policies[0])) as vla:
            obs = env.reset(episodes[episode_index])
            instruction = obs.instruction
            done = False
            for _ in tqdm(range(limit), desc="record", disable=not progress, unit="obs"):
                for camera, image in obs.images.items():
                    frames.setdefault(camera, []).append(np.asarray(image, dtype=np.uint8))
                if obs.proprio is not None:
                    proprio.append(np.asarray(obs.proprio, dtype=np.float32))
                if done:
                    break
                action = vla.predict(obs).actions[0, 0]
                obs, _, done, _ = env.step(action)
    finally:
        env.close()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_recording(out, {c: np.stack(f) for c, f in frames.items()}, str(instruction),
                   np.stack(proprio) if len(proprio) == len(next(iter(frames.values()))) else None)
    return out
