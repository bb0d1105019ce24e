"""Observation perturbations for robustness tests (the paper's dynamic background), usable on any env."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlacache.env import Env, EpisodeSpec
from vlacache.registry import register_perturbation
from vlacache.types import Observation


class Perturbation:
    """Changes the images of an observation as a function of the step index within the episode."""

    @dataclass
    class Config:
        cameras: list[str] = field(default_factory=lambda: ["primary"])

    def __init__(self, config=None) -> None:
        self.config = config if config is not None else self.Config()

    def apply(self, image: np.ndarray, t: int) -> np.ndarray:
        raise NotImplementedError


def _texture(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fy, fx, phase = rng.uniform(0.02, 0.12), rng.uniform(0.02, 0.12), rng.uniform(0, 6.28)
        base[..., c] = 127 + 100 * np.sin(fy * y + phase) * np.cos(fx * x + 2 * phase)
    return base


@register_perturbation("dynamic-background")
class DynamicBackground(Perturbation):
    """A textured band scrolling `speed` pixels per step over rows [top, bottom) (fractions of the height),
    blended with `alpha`: the background keeps changing, so pixel-static tests must not reuse it blindly."""

    @dataclass
    class Config:
        cameras: list[str] = field(default_factory=lambda: ["primary"])
        top: float = 0.0
        bottom: float = 0.3
        speed: int = 6
        alpha: float = 0.6
        seed: int = 0

    def apply(self, image: np.ndarray, t: int) -> np.ndarray:
        h, w = image.shape[:2]
        r0, r1 = int(self.config.top * h), int(self.config.bottom * h)
        if r1 <= r0:
            return image
        texture = _texture(r1 - r0, 2 * w, self.config.seed)
        shift = (t * self.config.speed) % w
        band = texture[:, shift : shift + w]
        out = image.astype(np.float32)
        out[r0:r1] = (1 - self.config.alpha) * out[r0:r1] + self.config.alpha * band
        return out.clip(0, 255).astype(np.uint8)


@register_perturbation("moving-distractor")
class MovingDistractor(Perturbation):
    """A coloured disc of `radius` (fraction of the width) bouncing across the image, `speed` px per step."""

    @dataclass
    class Config:
        cameras: list[str] = field(default_factory=lambda: ["primary"])
        radius: float = 0.06
        speed: int = 9
        colour: list[int] = field(default_factory=lambda: [30, 160, 220])

    def apply(self, image: np.ndarray, t: int) -> np.ndarray:
        h, w = image.shape[:2]
        r = max(int(self.config.radius * w), 1)
        span_x, span_y = max(w - 2 * r, 1), max(h // 2 - 2 * r, 1)
        px, py = t * self.config.speed, t * self.config.speed // 2
        cx = r + (px % (2 * span_x) if px % (2 * span_x) < span_x else 2 * span_x - px % (2 * span_x))
        cy = r + (py % (2 * span_y) if py % (2 * span_y) < span_y else 2 * span_y - py % (2 * span_y))
        y, x = np.ogrid[:h, :w]
        out = image.copy()
        out[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = np.asarray(self.config.colour, dtype=np.uint8)
        return out


class PerturbedEnv(Env):
    """Wraps any env so that every observation passes through a perturbation (step 0 = the reset frame)."""

    def __init__(self, env: Env, perturbation: Perturbation) -> None:
        self.env, self.perturbation = env, perturbation
        self.t = 0

    @property
    def max_steps(self) -> int:  # type: ignore[override]
        return self.env.max_steps

    def episodes(self) -> list[EpisodeSpec]:
        return self.env.episodes()

    def _perturb(self, obs: Observation) -> Observation:
        images = dict(obs.images)
        for camera in self.perturbation.config.cameras:
            if camera in images:
                images[camera] = self.perturbation.apply(np.asarray(images[camera]), self.t)
        return Observation(images=images, instruction=obs.instruction, proprio=obs.proprio)

    def reset(self, episode: EpisodeSpec | None = None) -> Observation:
        self.t = 0
        return self._perturb(self.env.reset(episode))

    def step(self, action: np.ndarray) -> tuple[Observation, float, bool, dict[str, Any]]:
        obs, reward, done, info = self.env.step(action)
        self.t += 1
        return self._perturb(obs), reward, done, info

    def close(self) -> None:
        self.env.close()
