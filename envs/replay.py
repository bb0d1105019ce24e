"""Replay of recorded observations as an environment (actions are ignored)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from vlacache.env import Env, EpisodeSpec
from vlacache.registry import register_env
from vlacache.types import InputError, Observation

IMAGE_PREFIX = "image__"


def embedded_frames_path() -> Path:
    """The short demo sequence shipped with the package (a static scene with a moving arm-like object)."""
    return Path(str(resources.files("vlacache") / "data" / "demo_frames.npz"))


def load_recording(path: str | Path) -> tuple[dict[str, np.ndarray], str, np.ndarray | None]:
    """Read a recording: per-camera uint8 frames [T, H, W, 3], the instruction, optional proprio [T, d]."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"recording not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        cameras = {k[len(IMAGE_PREFIX):]: data[k] for k in data.files if k.startswith(IMAGE_PREFIX)}
        if not cameras or "instruction" not in data.files:
            raise InputError(f"{path} is not a vlacache recording (needs '{IMAGE_PREFIX}<camera>' arrays and 'instruction')")
        instruction = str(data["instruction"])
        proprio = data["proprio"] if "proprio" in data.files else None
    lengths = {c: len(f) for c, f in cameras.items()}
    if len(set(lengths.values())) != 1:
        raise InputError(f"{path}: cameras have different frame counts {lengths}")
    return cameras, instruction, proprio


def save_recording(path: str | Path, frames: dict[str, np.ndarray], instruction: str, proprio: np.ndarray | None = None) -> None:
    arrays: dict[str, Any] = {IMAGE_PREFIX + c: np.asarray(f, dtype=np.uint8) for c, f in frames.items()}
    arrays["instruction"] = np.asarray(instruction)
    if proprio is not None:
        arrays["proprio"] = np.asarray(proprio, dtype=np.float32)
    np.savez_compressed(path, **arrays)


@register_env("replay")
class ReplayEnv(Env):
    """Plays a recorded frame sequence back, ignoring actions. `path=None` uses the embedded demo; `repeats`
    lists the same recording as several episodes (init_state 0..repeats-1)."""

    @dataclass
    class Config:
        path: str | None = None
        max_steps: int | None = None
        repeats: int = 1

    def __init__(self, config: "ReplayEnv.Config | None" = None) -> None:
        self.config = config or self.Config()
        self.frames, self.instruction, self.proprio = load_recording(self.config.path or embedded_frames_path())
        total = len(next(iter(self.frames.values())))
        self.length = min(total, self.config.max_steps or total)
        self.t = 0

    def observation(self, t: int) -> Observation:
        proprio = None if self.proprio is None else self.proprio[t]
        return Observation(images={c: f[t] for c, f in self.frames.items()}, instruction=self.instruction, proprio=proprio)

    @property
    def max_steps(self) -> int:
        return self.length

    def episodes(self) -> list[EpisodeSpec]:
        return [EpisodeSpec(task=self.instruction, init_state=i) for i in range(self.config.repeats)]

    def reset(self, episode: EpisodeSpec | None = None) -> Observation:
        self.t = 0
        return self.observation(0)

    def step(self, action: np.ndarray) -> tuple[Observation, float, bool, dict[str, Any]]:
        """The next frame; done once the last frame has been acted on (every frame gets a policy query)."""
        self.t += 1
        return self.observation(min(self.t, self.length - 1)), 0.0, self.t >= self.length, {}
