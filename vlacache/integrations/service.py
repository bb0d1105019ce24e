"""One model served to evaluation stacks: a backbone + cache policy built from a serve config, one episode per
client session, and the stacks' camera and action conventions.

Every adapter (vla-eval, the openpi websocket protocol, the LeRobot plugin) turns its stack's observation into a
`vlacache.Observation` with `PolicyService.observation` and asks `PolicyService.predict(session, obs)`. Each
session is its own episode: its K/V cache, previous frame and attention statistics are swapped in before its
query and out after (`CachedVLA.save_episode` / `load_episode`), so clients interleaving their steps never see
each other's cache. Queries run one at a time (a lock); `start_episode(session)` makes that session's next query
a full forward.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vlacache.backbone import Backbone
from vlacache.config import ConfigError
from vlacache.config import to_plain
from vlacache.experiment import FastPathConfig, build_backbone, build_policy, load_config, resolve_backbone_spec
from vlacache.images import resize_for_policy
from vlacache.messages import warn
from vlacache.runtime import CachedVLA, EpisodeSnapshot, StepResult, check_fits_positions
from vlacache.threads import use_threads
from vlacache.types import InputError, Observation

# What the client's env expects of an action, per benchmark (the model's gripper g is in [0, 1], 1 = open).
ACTION_CONVENTIONS = ("libero", "simpler", "raw")


@dataclass
class ServeConfig:
    """`vlacache serve` / the integrations: which model and cache policy to serve, and how to talk to the client.

    benchmark: the action convention of the client's env: 'libero' (gripper -> -1 open / +1 close, as the
    OpenVLA / OFT LIBERO evaluations), 'simpler' (euler -> axis-angle rotation, gripper -> +1 open / -1 close, as
    SimplerEnv's OpenVLA policy) or 'raw' (the model's un-normalised actions as they are). cameras: client camera
    name -> backbone camera ('primary', 'wrist'); null: the adapter's defaults. model_resize: resize images to this
    size as the OpenVLA LIBERO evaluation does (JPEG round trip + Lanczos; vlacache.images) before the backbone;
    null: the backbone resizes. execute_chunk: how many actions of each predicted chunk the client executes before
    the next query (null: the whole chunk). log: a JSONL file getting one line per query (session, step, reuse,
    latency); null: none. threads: torch threads of the server (null: torch's default). trained_image_size: the
    frame size the policy was trained on (the micro-policies: 128); frames of another size get one warning.
    """

    name: str = "serve"
    imports: list = field(default_factory=list)  # your modules that register components (vlacache/plugins.py)
    backbone: Any = "micro_oft_libero_spatial"
    policy: Any = "vla_cache"
    benchmark: str = "libero"
    cameras: dict | None = None
    model_resize: int | None = None
    execute_chunk: int | None = None
    fast_path: FastPathConfig = field(default_factory=FastPathConfig)
    log: str | None = None
    threads: int | None = None  # torch threads of the server; null: torch's default
    trained_image_size: int | None = None  # the frames the policy was trained on; other sizes get one warning

    def check(self) -> "ServeConfig":
        if self.benchmark not in ACTION_CONVENTIONS:
            raise ConfigError(f"benchmark must be one of {list(ACTION_CONVENTIONS)}, got {self.benchmark!r}; "
                              "e.g. benchmark=libero")
        for key in ("model_resize", "execute_chunk", "threads", "trained_image_size"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{key} must be a positive integer or null, got {value!r}")
        if self.cameras is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in self.cameras.items()):
            raise ConfigError(f"cameras maps client camera names to backbone cameras, got {self.cameras!r}; "
                              "e.g. cameras: {agentview: primary, wrist: wrist}")
        self.fast_path.check()
        return self


def load_serve_config(source: str | Path | Mapping[str, Any] | None, overrides: list[str] | None = None) -> ServeConfig:
    """A serve config from a YAML path, the name of a shipped one (configs/serve/), a mapping or None (defaults),
    with key=value overrides."""
    return load_config(ServeConfig, source, "serve", overrides)


def to_client_actions(actions: np.ndarray, benchmark: str) -> np.ndarray:
    """Model actions [chunk, 7] (un-normalised, gripper in [0, 1] with 1 = open) -> what the client's env takes."""
    actions = np.asarray(actions, dtype=np.float32)
    if benchmark == "raw":
        return actions
    if benchmark == "libero":
        from vlacache.envs.libero import to_libero_action

        return np.stack([to_libero_action(a, "openvla") for a in actions]).astype(np.float32)
    from vlacache.envs.simpler import to_simpler_action

    return np.stack([to_simpler_action(a) for a in actions])


class PolicyService:
    """A backbone + cache policy answering queries from several client sessions, each its own episode.

    `observation()` maps the client's cameras to the backbone's; `predict(session, obs)` runs one control step
    in that session's episode and returns the actions in the client's convention ([chunk, 7]); `start_episode`
    / `end_session` mark the boundaries. `records` keeps the last queries' numbers (also written to `log`).
    """

    def __init__(self, config: ServeConfig, backbone: Backbone | None = None,
                 default_cameras: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.threads = use_threads(config.threads)  # the header line servers print
        self.backbone = backbone if backbone is not None else build_backbone(config.backbone)
        self.cameras = dict(config.cameras if config.cameras is not None else default_cameras or {})
        for name, camera in self.cameras.items():
            if camera not in self.backbone.cameras:
                raise ConfigError(f"cameras: '{name}' maps to '{camera}', which is not a camera of this backbone "
                                  f"({', '.join(self.backbone.cameras)})")
        self.vla = CachedVLA(self.backbone, build_policy(config.policy), **config.fast_path.options(),
                             env_steps_per_query=self.chunk)  # attaches hooks
        self._episodes: dict[str, EpisodeSnapshot | None] = {}
        self._warned_size = False
        self._episode_ids: dict[str, int] = {}
        self._current: str | None = None
        self._lock = threading.Lock()
        self.records: deque[dict] = deque(maxlen=10000)
        self._log = Path(config.log) if config.log else None
        if self._log is not None:
            self._log.parent.mkdir(parents=True, exist_ok=True)

    @property
    def chunk(self) -> int:
        """Actions per query the client executes: `execute_chunk` (at most the backbone's chunk), else all."""
        return min(self.config.execute_chunk or self.backbone.action_chunk, self.backbone.action_chunk)

    def observation(self, images: Mapping[str, Any], instruction: Any, proprio: Any = None) -> Observation:
        """A vlacache Observation from the client's camera images (renamed by the camera map), instruction and
        robot state; names what is missing and how to send it."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise InputError(f"the observation has no task instruction (got {instruction!r}); send the task's language "
                             "instruction with every observation")
        mapped = {self.cameras.get(name, name): image for name, image in images.items()}
        missing = [c for c in self.backbone.cameras if c not in mapped]
        if missing:
            expected = [name for name, camera in self.cameras.items() if camera in missing]
            raise InputError(
                f"the model needs camera(s) {missing} but the client sent {sorted(images)}; have the client send "
                f"{' / '.join(map(repr, expected)) or 'it'}, or map the client's name in the serve config "
                f"(cameras: {{CLIENT_NAME: {missing[0]}}})"
            )
        chosen = {c: np.asarray(mapped[c]) for c in self.backbone.cameras}
        self._check_trained_size(chosen)
        if self.config.model_resize:
            chosen = {c: resize_for_policy(image, self.config.model_resize) for c, image in chosen.items()}
        if self.backbone.uses_proprio and proprio is None:
            raise InputError("the model needs the robot state (proprio) and the client sent none; enable the client's "
                             "state (vla-eval: send_state; openpi: observation/state; LeRobot: observation.state)")
        return Observation(images=chosen, instruction=instruction,
                           proprio=None if proprio is None else np.asarray(proprio, dtype=np.float32))

    def _check_trained_size(self, images: Mapping[str, np.ndarray]) -> None:
        """One warning per server when the client's frames are not the size the policy was trained on."""
        size = self.config.trained_image_size
        if size is None or self._warned_size:
            return
        other = {c: list(image.shape[-3:-1]) for c, image in images.items() if tuple(image.shape[-3:-1]) != (size, size)}
        if other:
            self._warned_size = True
            warn(f"the client sends {other} px frames; {self.config.name}'s policy was trained on {size} x {size} frames "
                 "rendered as `vlacache demos` renders them: the frames are resized, but success rates measured this "
                 "way are not comparable with BENCHMARKS.md")

    def start_episode(self, session: str) -> None:
        """The session's next query starts a new episode (a full forward, nothing reused)."""
        with self._lock:
            self._episodes[session] = None
            self._episode_ids[session] = self._episode_ids.get(session, -1) + 1
            if self._current == session:
                self._current = None

    def end_session(self, session: str) -> None:
        """Forget the session's episode (its K/V)."""
        with self._lock:
            self._episodes.pop(session, None)
            if self._current == session:
                self._current = None

    def check_observation(self, obs: Observation) -> None:
        """Raise the InputError that `predict` would raise for this observation (images, cameras, instruction and
        its length), without running the model: the backbone's preparation alone."""
        check_fits_positions(self.backbone, self.backbone.prepare(obs).layout)

    def predict(self, session: str, obs: Observation) -> tuple[np.ndarray, StepResult]:
        """One control step of the session's episode: (client actions [chunk, 7], the step's result)."""
        with self._lock:
            self._episode_ids.setdefault(session, 0)
            if self._current != session:
                self._park()
                self.vla.load_episode(self._episodes.get(session))
                self._current = session
            try:
                result = self.vla.predict(obs)
            except BaseException:
                self._episodes[session] = None  # what the failed step left is not trustworthy
                self._current = None
                raise
            self._record(session, result.stats.step, result.stats.reused_per_layer, result)
            return self._client_actions(result, 0), result

    def predict_many(self, sessions: Sequence[str], observations: Sequence[Observation]) -> list[np.ndarray]:
        """One control step in each of several sessions' episodes: the client actions [chunk, 7] of each.
        Sessions whose observations share image sizes and prompt length run as one batch of episodes (each row
        gets what it would alone, within float rounding: tests/test_integrations.py); the others, and every
        session of a backbone with its own episode state (CogACT), run one after another."""
        if len(set(sessions)) != len(sessions):
            raise InputError(f"each session may appear once in a batch, got {list(sessions)}")
        if len(sessions) == 1 or self.backbone.episode_state() is not None:
            return [self.predict(s, o)[0] for s, o in zip(sessions, observations)]
        groups: dict[tuple, list[int]] = {}
        for i, obs in enumerate(observations):
            groups.setdefault(self.backbone.prepare(obs).batch_key(), []).append(i)
        out: list[np.ndarray] = [None] * len(sessions)
        for rows in groups.values():
            if len(rows) == 1:
                out[rows[0]] = self.predict(sessions[rows[0]], observations[rows[0]])[0]
                continue
            for i, actions in zip(rows, self._predict_batch([sessions[i] for i in rows], [observations[i] for i in rows])):
                out[i] = actions
        return out

    def _predict_batch(self, sessions: list[str], observations: list[Observation]) -> list[np.ndarray]:
        with self._lock:
            self._park()
            for session in sessions:
                self._episode_ids.setdefault(session, 0)
            self.vla.load_episode([self._episodes.get(s) for s in sessions])
            try:
                result = self.vla.predict(Observation.stack(observations))
            except BaseException:
                for session in sessions:
                    self._episodes[session] = None
                raise
            counts = result.plan.counts_per_row(len(sessions))
            steps = self.vla.episode_steps()
            actions = []
            for row, session in enumerate(sessions):
                self._episodes[session] = self.vla.save_episode(row=row)
                self._record(session, steps[row] - 1, counts[row], result)
                actions.append(self._client_actions(result, row))
            self.vla.reset()  # the batch's state now lives in the sessions' snapshots
            return actions

    def _park(self) -> None:
        """Save the episode that is loaded (if its session is still open) before another one is loaded."""
        if self._current is not None and self._current in self._episodes:
            self._episodes[self._current] = self.vla.save_episode()
        self._current = None

    def _client_actions(self, result: StepResult, row: int) -> np.ndarray:
        return to_client_actions(result.actions[row][: self.chunk], self.config.benchmark)

    def _record(self, session: str, step: int, reused_per_layer: list[int], result: StepResult) -> None:
        stats = result.stats
        layers = len(reused_per_layer)
        reuse = sum(reused_per_layer) / (layers * stats.num_visual) if layers and stats.num_visual else 0.0
        record = {"time": time.time(), "session": session, "episode": self._episode_ids[session], "step": step,
                  "reuse_ratio": reuse, "reused_per_layer": list(reused_per_layer), "batch": len(result.actions),
                  "flops": stats.flops.get("total"), "latency_ms": stats.latency_ms}
        self.records.append(record)
        if self._log is not None:
            with self._log.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def served(self) -> dict[str, Any]:
        """What is served, for a stack's metadata: the serve config's name, the cache policy (label and every
        strategy's settings), the backbone (its resolved config) and the action convention."""
        policy = self.vla.policy
        return {"name": self.config.name, "policy": policy.label if policy is not None else "no-cache",
                "policy_config": repr(policy), "backbone": to_plain(resolve_backbone_spec(self.config.backbone)),
                "benchmark": self.config.benchmark, "action_chunk": self.chunk, "execute_chunk": self.config.execute_chunk}

    def episode_summary(self, session: str) -> dict[str, Any]:
        """The session's current episode over its queries so far: queries, mean reuse, mean FLOPs and latency."""
        episode = self._episode_ids.get(session)
        mine = [r for r in self.records if r["session"] == session and r["episode"] == episode]
        mean = (lambda xs: float(np.mean(xs)) if xs else None)  # noqa: E731
        return {"session": session, "episode": episode, "queries": len(mine),
                "reuse_ratio": mean([r["reuse_ratio"] for r in mine]),
                "flops_mean": mean([r["flops"] for r in mine if r["flops"] is not None]),
                "latency_ms_mean": mean([r["latency_ms"]["total"] for r in mine if "total" in r["latency_ms"]])}

    def close(self) -> None:
        self.vla.detach()


def check_can_serve(host: str, port: int, config: ServeConfig) -> None:
    """Refuse, before a backbone is built, what would make a server fail later: a port out of range or already
    listening, a query log that cannot be written."""
    import socket

    from vlacache.eval.results import check_writable_file

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535 (0: any free port), got {port!r}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is fine
            probe.bind((host, port))
    except OSError as error:
        raise ConfigError(f"cannot serve on {host}:{port} ({error.strerror or error}): another server may be "
                          "listening there; pass another --port (or --host)") from None
    if config.log:
        check_writable_file(config.log, "the query log", "pass log=<a writable file>")


def with_device(overrides: list[str], device: str | None) -> list[str]:
    """Serve-config overrides that place the backbone on `device` (a stack's own device flag, e.g. LeRobot's
    `--policy.device`), unless they already set `backbone.device`; an empty or None device adds nothing."""
    if not device or any(o.split("=", 1)[0].strip() == "backbone.device" for o in overrides):
        return overrides
    return [*overrides, f"backbone.device={device}"]
