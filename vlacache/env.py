"""The environment interface: anything that yields Observations and takes actions."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from .types import Observation


class Env(ABC):
    """A control environment. Observations use the camera names backbones expect ('primary', 'wrist')."""

    @abstractmethod
    def reset(self) -> Observation:
        """Start an episode and return its first observation."""

    @abstractmethod
    def step(self, action: np.ndarray) -> tuple[Observation, float, bool, dict[str, Any]]:
        """Apply one action; return (observation, reward, done, info)."""

    def close(self) -> None:
        """Release simulator resources."""
