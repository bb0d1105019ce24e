"""`vlacache record` (vlacache.eval.recording): one episode's observations to a compact file that the replay env
plays back. The episode runs through the runner's one rollout loop (`run_batch`), so a chunked policy executes
`execute_chunk` actions per query exactly as under `vlacache run`; the file holds the observations the policy
queried on (all cameras, proprio), one per query."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..experiment import ExperimentConfig, build_backbone, build_env, build_policy
from ..runtime import CachedVLA
from ..types import InputError
from .results import check_writable_file
from .runner import env_steps_per_query, run_batch


def record_episode(config: ExperimentConfig, out: str | Path, max_steps: int | None = None, episode_index: int = 0) -> Path:
    """Drive the env with the experiment's first policy and save every observation it queried on. `max_steps`:
    at most this many env steps (default: the config's, else the env's limit)."""
    from vlacache.envs.replay import save_recording

    if Path(out).suffix != ".npz":
        raise InputError(f"--out {out}: a recording is an .npz file (numpy would write {out}.npz); "
                         f"e.g. --out {Path(out).with_suffix('.npz')}")
    if max_steps is not None and (isinstance(max_steps, bool) or max_steps < 1):
        raise InputError(f"--steps must be a positive number of env steps (leave it out for the whole episode), "
                         f"got {max_steps}")
    out = check_writable_file(out, "the recording", "pass a writable path, e.g. --out /tmp/episode.npz")
    config = dataclasses.replace(config, max_steps=max_steps if max_steps is not None else config.max_steps, videos=False)
    config.check()
    env = build_env(config.env, config.perturbation)
    frames: dict[str, list[np.ndarray]] = {}
    proprio: list[np.ndarray] = []
    instruction: list[str] = []

    def keep(_episode, obs) -> None:
        for camera, image in obs.images.items():
            frames.setdefault(camera, []).append(np.asarray(image, dtype=np.uint8))
        if obs.proprio is not None:
            proprio.append(np.asarray(obs.proprio, dtype=np.float32))
        instruction[:] = [obs.instruction]

    try:
        episodes = env.episodes()
        if not 0 <= episode_index < len(episodes):
            raise InputError(f"--episode {episode_index} is out of range: the env lists {len(episodes)} episodes "
                             f"(0 to {len(episodes) - 1})")
        backbone = build_backbone(config.backbone)
        with CachedVLA(backbone, build_policy(config.policies[0]),
                       env_steps_per_query=env_steps_per_query(config, backbone)) as vla:
            record = next(run_batch(vla, [env], [(episodes[episode_index], 1)], config, None, on_query=keep))
    finally:
        env.close()
    if record["error"] is not None:
        raise RuntimeError(f"the episode raised before it could be recorded in full: {record['error']}")
    if not frames:
        raise RuntimeError("the episode ended before the first query; nothing to record")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_recording(out, {c: np.stack(f) for c, f in frames.items()}, str(instruction[0]),
                   np.stack(proprio) if len(proprio) == len(next(iter(frames.values()))) else None)
    return out
