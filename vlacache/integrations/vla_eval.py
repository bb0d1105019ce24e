"""vlacache as a model server of allenai's vla-eval (PyPI `vla-eval`): its benchmark orchestrator (LIBERO, SIMPLER,
...) drives any vlacache backbone + cache policy over its websocket protocol.

    python -m vlacache.integrations.vla_eval micro_oft_libero policy=vla_cache --port 8000
    UV_NO_PROJECT=1 vla-eval serve -c configs/vla_eval/serve_micro_oft_libero.yaml --address 127.0.0.1:8000
    vla_eval.api.evaluate(VlaCacheModelServer("micro_oft_libero"), eval_config, docker=False)

What it does with vla-eval's conventions:
  * cameras: LIBERO sends `agentview` (-> 'primary') and `wrist` (-> 'wrist'), already rotated 180 degrees and
    at 256 px; SIMPLER sends `primary`. The server asks for the wrist image and the 8-d state
    (`send_wrist_image`, `send_state`, `quat_no_antipodal`: robosuite's own axis-angle, as vlacache's LIBERO env
    and the OFT evaluation compute it) only when the backbone uses them.
  * actions: the serve config's `benchmark` converts the model's actions to what the env takes (libero: gripper
    -1 open / +1 close; simpler: axis-angle rotation, gripper +1 open / -1 close; vla-eval binarises again).
    A chunk of actions goes back as one (chunk, 7) array and vla-eval's chunk buffer plays it out; the next
    query comes when the buffer is empty (`execute_chunk` actions later).
  * episodes: every websocket session (one per evaluation shard) is its own episode; EPISODE_START makes the
    session's next query a full forward, EPISODE_END frees its K/V. Sessions never share a cache. With
    `--max-batch-size N` (vla-eval's `max_batch_size`) the queries that arrive together run as one batch of
    episodes where their prompt lengths and image sizes agree (PolicyService.predict_many).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any, Mapping

import numpy as np

from vlacache.integrations.service import PolicyService, check_can_serve, load_serve_config
from vlacache.types import InputError

logger = logging.getLogger(__name__)

try:
    from vla_eval.model_servers.base import SessionContext
    from vla_eval.model_servers.predict import PredictModelServer
    from vla_eval.specs import (GRIPPER_CLOSE_POS, GRIPPER_RAW, IMAGE_RGB, LANGUAGE, POSITION_DELTA, ROTATION_AA,
                                STATE_EEF_POS_AA_GRIP, DimSpec)
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError("vlacache.integrations.vla_eval needs vla-eval: pip install vla-eval==0.8.0 (or, from the vlacache "
                      f"clone's root: pip install -e '.[vla-eval]'); {error}") from None

# vla-eval's camera names -> vlacache's (LIBERO: agentview / wrist; SIMPLER: primary).
VLA_EVAL_CAMERAS = {"agentview": "primary", "wrist": "wrist", "primary": "primary"}
BENCHMARK_CAMERAS = {"libero": {"primary": "agentview", "wrist": "wrist"}, "simpler": {"primary": "primary"}}


class VlaCacheModelServer(PredictModelServer):
    """A vla-eval `PredictModelServer` serving a vlacache backbone + cache policy, one episode per session.

    `config`: a serve config (a shipped name in configs/serve/, a YAML path or a mapping; `ServeConfig`);
    `overrides`: key=value strings on it. The remaining keyword arguments are PredictModelServer's
    (`action_ensemble`, `max_batch_size`, ...); `chunk_size` comes from the serve config.
    """

    def __init__(self, config: str | None = None, overrides: list[str] | None = None, **kwargs: Any) -> None:
        self._start(PolicyService(load_serve_config(config, overrides), default_cameras=VLA_EVAL_CAMERAS), kwargs)

    @classmethod
    def for_service(cls, service: PolicyService, **kwargs: Any) -> "VlaCacheModelServer":
        """A server around an existing PolicyService (e.g. a backbone already in memory)."""
        server = cls.__new__(cls)
        server._start(service, kwargs)
        return server

    def _start(self, service: PolicyService, kwargs: dict[str, Any]) -> None:
        if "chunk_size" in kwargs:
            raise InputError("set the chunk in the serve config (execute_chunk=N), not chunk_size")
        self.service = service
        self.episodes: list[dict[str, Any]] = []  # per finished episode: vla-eval's result + vlacache's statistics
        super().__init__(chunk_size=service.chunk, **kwargs)

    # -- what the server needs and gives ---------------------------------------------------------------------
    def get_observation_params(self) -> dict[str, Any]:
        """What the benchmark must send, and (key `vlacache`, which no benchmark takes: vla-eval logs that it is not
        forwarded) what is served: vla-eval keeps these params in its result file's `server_info`."""
        backbone, params = self.service.backbone, {"vlacache": self.service.served()}
        if "wrist" in backbone.cameras:
            params["send_wrist_image"] = True
        if backbone.uses_proprio:
            params["send_state"] = True
            if self.service.config.benchmark == "libero":
                params["quat_no_antipodal"] = True
        return params

    def get_action_spec(self) -> dict[str, DimSpec]:
        gripper = GRIPPER_CLOSE_POS if self.service.config.benchmark == "libero" else GRIPPER_RAW
        return {"position": POSITION_DELTA, "rotation": ROTATION_AA, "gripper": gripper}

    def get_observation_spec(self) -> dict[str, DimSpec]:
        spec: dict[str, DimSpec] = {"language": LANGUAGE}
        names = BENCHMARK_CAMERAS.get(self.service.config.benchmark, {})
        for camera in self.service.backbone.cameras:
            spec[names.get(camera, camera)] = IMAGE_RGB
        if self.service.backbone.uses_proprio:
            spec["state"] = STATE_EEF_POS_AA_GRIP
        return spec

    # -- episodes and queries ---------------------------------------------------------------------------------
    async def on_episode_start(self, config: dict[str, Any], ctx: SessionContext) -> None:
        self.service.start_episode(ctx.session_id)
        await super().on_episode_start(config, ctx)

    async def on_episode_end(self, result: dict[str, Any], ctx: SessionContext) -> None:
        summary = self.service.episode_summary(ctx.session_id)
        logger.info("vlacache episode %s: %s", ctx.episode_id, summary)
        self.episodes.append({"vla_eval_episode": ctx.episode_id, "result": result, **summary})
        self.service.end_session(ctx.session_id)
        await super().on_episode_end(result, ctx)

    async def on_observation(self, obs: Mapping[str, Any], ctx: SessionContext) -> None:
        """With `max_batch_size` > 1, an observation is checked on its own before it may join a batch: a bad one
        fails its own session only (vla-eval fails every query of a batch that raises)."""
        if self.max_batch_size > 1:
            self.service.check_observation(self._observation(obs))
        await super().on_observation(obs, ctx)

    def predict(self, obs: Mapping[str, Any], ctx: SessionContext) -> dict[str, np.ndarray]:
        actions, _ = self.service.predict(ctx.session_id, self._observation(obs))
        return self._reply(actions)

    def predict_batch(self, obs_batch: list, ctx_batch: list) -> list[dict[str, np.ndarray]]:
        """Queries of several sessions at once (`max_batch_size` > 1): one batch of episodes where they can share
        a forward (PolicyService.predict_many), each session still its own episode."""
        observations = [self._observation(obs) for obs in obs_batch]
        actions = self.service.predict_many([ctx.session_id for ctx in ctx_batch], observations)
        return [self._reply(a) for a in actions]

    def _observation(self, obs: Mapping[str, Any]):
        images = obs.get("images")
        if not isinstance(images, Mapping):
            raise InputError(f"a vla-eval observation carries images as a camera -> image mapping, got {type(images).__name__}")
        return self.service.observation(images, obs.get("task_description"), obs.get("states", obs.get("state")))

    @staticmethod
    def _reply(actions: np.ndarray) -> dict[str, np.ndarray]:
        return {"actions": actions[0] if len(actions) == 1 else actions}


def main(argv: list[str] | None = None) -> int:
    """`python -m vlacache.integrations.vla_eval [CONFIG] [key=value ...] [--host H] [--port P]`; also takes
    vla-eval's own launcher flags (`--config YAML --args.config=... --port N`, what `vla-eval serve` passes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--config" or a.startswith("--config=") or a.startswith("--args.") for a in argv):
        from vla_eval.model_servers.serve import run_server

        sys.argv = [sys.argv[0], *argv]
        run_server(VlaCacheModelServer)
        return 0
    parser = argparse.ArgumentParser(prog="python -m vlacache.integrations.vla_eval",
                                     description="serve a vlacache backbone + cache policy to vla-eval")
    parser.add_argument("config", nargs="?", default=None, help="serve config: a shipped name (configs/serve/) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. policy=no_cache")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-8s %(name)s: %(message)s")
    from vla_eval.model_servers.serve import serve

    check_can_serve(args.host, args.port, load_serve_config(args.config, args.overrides))
    server = VlaCacheModelServer(args.config, args.overrides, max_batch_size=args.max_batch_size)
    print(f"vlacache: serving {server.service.config.name} to vla-eval on ws://{args.host}:{args.port}, "
          f"{server.service.threads}", flush=True)
    try:
        serve(server, host=args.host, port=args.port)
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
