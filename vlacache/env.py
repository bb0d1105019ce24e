"""The environment interface: anything that yields Observations and takes actions."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from .types import Observation


@dataclass(frozen=True)
class EpisodeSpec:
    """One episode to run: which task, which initial state, which seed. The runner's unit of work and resume."""

    task: str
    init_state: int = 0
    seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.task}|{self.init_state}|{self.seed}"


class Env(ABC):
    """A control environment. Observations use the camera names backbones expect ('primary', 'wrist').

    `step` takes ONE action [action_dim] in the model's convention (the env adapter converts it, e.g. the
    gripper sign) and returns (observation, reward, done, info); info['success'] is the env's verdict.
    """

    max_steps: int = 1000

    def episodes(self) -> list[EpisodeSpec]:
        """Every episode this env config asks for, in a stable order."""
        return [EpisodeSpec("default")]

    @abstractmethod
    def reset(self, episode: EpisodeSpec | None = None) -> Observation:
        """Start an episode (the first of `episodes()` when None) and return its first observation."""

    @abstractmethod
    def step(self, action: np.ndarray) -> tuple[Observation, float, bool, dict[str, Any]]:
        """Apply one action; return (observation, reward, done, info)."""

    def close(self) -> None:
        """Release simulator resources."""

    def run_actions(self, actions: np.ndarray, budget: int) -> tuple[Observation, bool, dict[str, Any], int]:
        """Apply actions [n, action_dim] one by one until the episode is done or `budget` steps ran; returns
        (last observation, done, info, steps taken)."""
        obs, done, info, taken = None, False, {}, 0
        for action in actions:
            obs, _, done, info = self.step(action)
            taken += 1
            if done or taken >= budget:
                break
        return obs, done, info, taken

    def start_actions(self, actions: np.ndarray, budget: int) -> None:
        """`run_actions` begun: an env in a worker process (`vlacache.eval.env_workers`) runs it while the
        caller starts the other envs of a batch; here it simply runs. `finish_actions()` returns its result."""
        try:
            self._pending = ("ok", self.run_actions(actions, budget))
        except Exception as exc:
            self._pending = ("error", exc)

    def finish_actions(self) -> tuple[Observation, bool, dict[str, Any], int]:
        """The result of the last `start_actions`, or the exception it raised."""
        status, value = self.__dict__.pop("_pending")
        if status == "error":
            raise value
        return value
