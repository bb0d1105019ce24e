"""VlaCachePolicy: a vlacache PolicyService (backbone + cache policy) as a LeRobot PreTrainedPolicy.

What it does with LeRobot's conventions (checked against lerobot 0.6.1):
  * images: LeRobot hands policies float32 [B, 3, H, W] in [0, 1]; its LIBERO env processor has already rotated
    them 180 degrees, which is what vlacache's LIBERO env gives a model. They go back to uint8 [H, W, 3]
    (exactly: x * 255 rounds to the env's uint8 pixel) and are renamed to the backbone's cameras
    (`observation.images.image` -> primary, `observation.images.image2` -> wrist). uint8 or HWC input works too.
  * state: `observation.state`, LeRobot's 8-d LIBERO state [eef_pos, axis-angle, gripper qpos], the same
    convention as vlacache's proprio; sent only when the backbone uses proprio.
  * actions: the serve config's `benchmark` (libero for the shipped ones) turns the model's actions into the env's
    convention (gripper -1 open / +1 close), so no postprocessing is needed. A chunk is queued and played out
    one action per `select_action`, the next query comes when the queue is empty.
  * episodes: row i of the batch is vlacache session f"row{i}", its own episode with its own K/V cache;
    `reset()` (LeRobot calls it before every rollout) makes every row's next query a full forward. The rows of
    a vectorised env are queried as one batch of episodes (PolicyService.predict_many).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lerobot.policies.pretrained import PreTrainedPolicy
from lerobot_policy_vlacache.configuration_vlacache import VlaCacheConfig
from vlacache.integrations.service import PolicyService, load_serve_config
from vlacache.types import InputError

logger = logging.getLogger(__name__)

TRAINING_HINT = ("vlacache policies are not trained through LeRobot: train with `vlacache train CONFIG` (e.g. "
                 "`vlacache train micro_oft_libero_spatial`) and serve the result here with --policy.serve_config")


def session_id(row: int) -> str:
    """The vlacache session of batch row `row` (one env of a vectorised LeRobot env)."""
    return f"row{row}"


def to_uint8_image(image: Any, flip: bool = False) -> np.ndarray:
    """One LeRobot image (tensor or array; [3, H, W] or [H, W, 3]; float in [0, 1] or uint8) -> uint8 [H, W, 3],
    optionally rotated 180 degrees."""
    array = image.detach().to("cpu") if isinstance(image, Tensor) else torch.as_tensor(np.asarray(image))
    if array.ndim != 3:
        raise InputError(f"expected one image [3, H, W] or [H, W, 3], got shape {tuple(array.shape)}")
    if array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.permute(1, 2, 0)
    if array.shape[-1] == 1:
        array = array.expand(-1, -1, 3)
    if array.shape[-1] != 3:
        raise InputError(f"expected an RGB image, got shape {tuple(array.shape)}")
    if array.dtype != torch.uint8:
        array = array.float()
        if float(array.max()) <= 1.0 + 1e-6:  # LeRobot's [0, 1] floats; otherwise already 0..255
            array = array * 255.0
        array = array.round().clamp(0, 255).to(torch.uint8)
    out = array.numpy()
    if flip:
        out = out[::-1, ::-1]
    return np.ascontiguousarray(out)


def loaded_message(served: dict[str, Any], pretrained_path: Any) -> str:
    """One line saying where the served model's weights come from (LeRobot warns "built from scratch (random
    weights)" whenever --policy.path is missing, which with --policy.type=vlacache is not what happens)."""
    backbone = served.get("backbone") or {}
    weights = backbone.get("checkpoint") or (f"preset '{backbone['preset']}' (random weights)" if backbone.get("preset")
                                             else "the serve config's backbone")
    line = (f"vlacache: weights from {weights} ({backbone.get('name', 'backbone')}, serve config "
            f"'{served.get('name')}', cache policy '{served.get('policy')}')")
    if pretrained_path is None:
        line += ("; LeRobot's 'built from scratch (random weights)' line refers to --policy.type without "
                 "--policy.path: write a policy folder with `python -m lerobot_policy_vlacache.export DIR` and "
                 "pass --policy.path=DIR to run without it")
    return line


class VlaCachePolicy(PreTrainedPolicy):
    """A vlacache backbone + cache policy (a serve config) answering LeRobot's `select_action`, one vlacache
    session per env of the batch. Inference only: `forward` (training) raises."""

    config_class = VlaCacheConfig
    name = "vlacache"

    def __init__(self, config: VlaCacheConfig, service: PolicyService | None = None, **kwargs: Any) -> None:
        super().__init__(config)
        config.validate_features()
        if service is None:
            serve = load_serve_config(config.serve_config, config.serve_overrides())
            service = PolicyService(serve, default_cameras=config.cameras)
        self.service = service
        chunk = service.chunk
        self.n_action_steps = min(config.n_action_steps or chunk, chunk)
        if config.n_action_steps and config.n_action_steps > chunk:
            logger.warning("n_action_steps=%d is more than the %d actions a query returns; using %d",
                           config.n_action_steps, chunk, chunk)
        self._queue: deque[Tensor] = deque()
        self._rows = 0  # batch rows (sessions) seen so far
        self._new_episode = True
        logger.info("vlacache: serving %s (backbone cameras %s, proprio %s), %d action(s) per query",
                    service.config.name, list(service.backbone.cameras), service.backbone.uses_proprio,
                    self.n_action_steps)
        logger.info(loaded_message(service.served(), config.pretrained_path))

    @classmethod
    def from_pretrained(cls, pretrained_name_or_path: Any, *, config: VlaCacheConfig | None = None,
                        **kwargs: Any) -> "VlaCachePolicy":
        """From a vlacache policy folder (`python -m lerobot_policy_vlacache.export DIR`, then `lerobot-eval
        --policy.path=DIR`): its config.json names the serve config, whose backbone checkpoint holds the weights,
        so the folder has no weights file of its own."""
        if config is None:
            config = VlaCacheConfig.from_pretrained(pretrained_name_or_path)
        config.pretrained_path = pretrained_name_or_path
        return cls(config)

    # -- LeRobot's policy API ---------------------------------------------------------------------------------
    def get_optim_params(self) -> dict:
        raise NotImplementedError(TRAINING_HINT)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict | None]:
        raise NotImplementedError(TRAINING_HINT)

    def reset(self) -> None:
        """A new rollout: drop the queued actions; every row's next query starts a new episode (full forward)."""
        self._queue.clear()
        self._new_episode = True  # the sessions are restarted at the next query, when the batch size is known

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], **kwargs: Any) -> Tensor:
        """One vlacache query per row: float32 [B, n_action_steps, 7] actions in the env's convention."""
        size = self._batch_size(batch)
        if self._new_episode:
            for row in range(size):
                self.service.start_episode(session_id(row))
            for row in range(size, self._rows):  # rows of a bigger earlier batch: free their K/V
                self.service.end_session(session_id(row))
            self._rows = size
            self._new_episode = False
        self._rows = max(self._rows, size)
        sessions = [session_id(row) for row in range(size)]
        actions = self.service.predict_many(sessions, [self._observation(batch, row) for row in range(size)])
        return torch.from_numpy(np.stack([np.asarray(a, dtype=np.float32)[: self.n_action_steps] for a in actions]))

    @torch.no_grad()
    def select_action(self, batch: dict[str, Tensor], **kwargs: Any) -> Tensor:
        """The next action of every row, float32 [B, 7]; queries the model when the queued chunk is used up."""
        if not self._queue:
            chunk = self.predict_action_chunk(batch)
            self._queue.extend(chunk.transpose(0, 1))  # n_action_steps x [B, 7]
        return self._queue.popleft()

    # -- LeRobot batch -> vlacache observation -----------------------------------------------------------------
    def _image_keys(self, batch: dict[str, Any]) -> list[str]:
        return [k for k in batch if k.startswith("observation.image")]

    def _batch_size(self, batch: dict[str, Any]) -> int:
        keys = self._image_keys(batch)
        if not keys:
            raise InputError(f"the batch has no image (keys: {sorted(batch)}); vlacache needs the camera images "
                             "under observation.images.* (LeRobot's LIBERO env: --env.type=libero)")
        first = batch[keys[0]]
        return int(first.shape[0]) if getattr(first, "ndim", 0) == 4 else 1

    def _observation(self, batch: dict[str, Any], row: int):
        service, config = self.service, self.config
        wanted = set(service.backbone.cameras)
        images = {}
        for key in self._image_keys(batch):
            if service.cameras.get(key, key) in wanted:
                value = batch[key]
                images[key] = to_uint8_image(value[row] if getattr(value, "ndim", 0) == 4 else value, config.flip_images)
        sent = {service.cameras.get(k, k) for k in images}
        if not wanted <= sent:
            raise InputError(
                f"the model needs camera(s) {sorted(wanted - sent)}; the batch has {self._image_keys(batch)} and "
                f"--policy.cameras maps {config.cameras}. Map a batch key to each, e.g. "
                "--policy.cameras='{observation.images.image: primary, observation.images.image2: wrist}'"
            )
        task = batch.get("task")
        instruction = task[row] if isinstance(task, (list, tuple)) else task
        proprio = None
        if service.backbone.uses_proprio:
            state = batch.get(config.state_key)
            if state is None:
                raise InputError(f"the model needs the robot state and the batch has no '{config.state_key}' "
                                 "(LeRobot's LIBERO env sends it with --env.obs_type=pixels_agent_pos, the default)")
            state = state[row] if getattr(state, "ndim", 1) == 2 else state
            proprio = (state.detach().to("cpu", torch.float32).numpy() if isinstance(state, Tensor)
                       else np.asarray(state, np.float32))
        return service.observation(images, instruction, proprio)
