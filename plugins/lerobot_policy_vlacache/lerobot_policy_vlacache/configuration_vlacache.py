"""The LeRobot policy config of vlacache: which vlacache serve config (backbone + cache policy) to run."""

from __future__ import annotations

from dataclasses import dataclass, field

from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import FeatureType
from lerobot.optim.optimizers import AdamWConfig
from vlacache.integrations.service import with_device

# LeRobot's LIBERO env (after its env processor) -> vlacache's backbone cameras.
LIBERO_CAMERAS = {"observation.images.image": "primary", "observation.images.image2": "wrist"}


@PreTrainedConfig.register_subclass("vlacache")
@dataclass
class VlaCacheConfig(PreTrainedConfig):
    """`--policy.type=vlacache`: a vlacache backbone + cache policy behind LeRobot's policy API (inference only).

    serve_config: a vlacache serve config: a shipped name (configs/serve/, e.g. micro_oft_libero) or a YAML path.
    policy: the cache policy (vla_cache, no_cache, static_reuse, ...); null keeps the serve config's.
    overrides: key=value overrides on the serve config, e.g. ["execute_chunk=4", "backbone.device=cuda"].
    n_action_steps: actions of each predicted chunk executed before the next query; null: the serve
        config's (`execute_chunk`, else the backbone's whole chunk); never more than the chunk.
    log: a JSONL file getting one line per query (session, step, reuse_ratio, latency); null keeps the serve
        config's `log`.
    cameras: LeRobot image key -> vlacache camera ('primary' / 'wrist'); the default fits LeRobot's LIBERO env.
    state_key: the batch key of the 8-d robot state (sent only to backbones that use proprio).
    flip_images: rotate the images 180 degrees before the model. LeRobot's LIBERO env processor already does
        (as vlacache's LIBERO env), so leave it off for `--env.type=libero`.
    """

    serve_config: str = "micro_oft_libero"
    policy: str | None = None
    overrides: list[str] = field(default_factory=list)
    n_action_steps: int | None = None
    log: str | None = None
    cameras: dict[str, str] = field(default_factory=lambda: dict(LIBERO_CAMERAS))
    state_key: str = "observation.state"
    flip_images: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_action_steps is not None and self.n_action_steps < 1:
            raise ValueError(f"n_action_steps must be a positive integer or null, got {self.n_action_steps}")
        bad = [o for o in self.overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides are key=value strings, got {bad}; e.g. --policy.overrides='[execute_chunk=4]'")

    def serve_overrides(self) -> list[str]:
        """The key=value overrides applied to the serve config (the explicit fields last). LeRobot's
        `--policy.device` places the backbone (the policy has no parameters of its own for `.to(device)` to move),
        unless an override sets backbone.device itself."""
        extra = with_device(list(self.overrides), self.device)
        if self.policy:
            extra.append(f"policy={self.policy}")
        if self.log:
            extra.append(f"log={self.log}")
        return extra

    # -- what LeRobot asks of every policy config ------------------------------------------------------------
    @property
    def observation_delta_indices(self) -> None:
        return None

    @property
    def action_delta_indices(self) -> None:
        return None

    @property
    def reward_delta_indices(self) -> None:
        return None

    def get_optimizer_preset(self) -> AdamWConfig:
        # Never used: vlacache policies are trained with `vlacache train` (VlaCachePolicy.forward says so).
        return AdamWConfig(lr=1e-4)

    def get_scheduler_preset(self) -> None:
        return None

    def validate_features(self) -> None:
        action = (self.output_features or {}).get("action")
        if action is not None and action.type is FeatureType.ACTION and tuple(action.shape)[-1:] != (7,):
            raise ValueError(f"vlacache policies act in 7-d end-effector deltas (LIBERO / SIMPLER); the env "
                             f"wants actions of shape {tuple(action.shape)}")
