"""ManiSkill's motion-planning solutions as a demonstration expert, in the SIMPLER adapter (`envs/simpler.py`).

ManiSkill 3 ships a planner solution per Panda tabletop task (`mani_skill.examples.motionplanning.panda`, mplib's
screw planner). The solutions command absolute joint targets; a VLA commands end-effector deltas. So the
episode runs in the adapter's env in `pd_ee_delta_pose`, and each joint target the solution sends is turned into
the end-effector delta that reaches it (the target's forward kinematics against the current end-effector pose,
as ManiSkill's own trajectory converter computes it), executed, and stored with the observation the policy
would have seen before it: the adapter's camera at the policy's resolution, the instruction, the proprio. The
stored action is in the model's convention ([dxyz, drot, g], g = 1 open / 0 closed), which the adapter (rotation
'none', gripper 'binarize') turns back into exactly the executed action.

Tasks (`PLANNED_TASKS`): those whose goal a camera can see. Excluded: PickCube-v1 (its goal sphere is hidden
from the sensor cameras), LiftPegUpright-v1 (no goal to see, and its solution needs pd_joint_pos grasp tuning),
and the other solutions (draw, peg insertion, plug, tool, pyramid: long-horizon or not on these cameras).

mplib 0.1.1 (ManiSkill 3.0.1's pin) crashes under numpy 2: the recording runs in `.venvs/maniskill`
(numpy 1.26, the system's packages otherwise; `scripts/setup_maniskill.sh`), which `vlacache demos` picks for
a SIMPLER-adapter config by itself.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from vlacache.config import ConfigError
from vlacache.env import EpisodeSpec

CONTROL_MODE = "pd_ee_delta_pose"


@dataclass(frozen=True)
class PlannedTask:
    """A task the planner solves: how many steps the gripper is held still after the solution until the task
    counts as solved (e.g. a sphere still rolling). Its instruction is the adapter's (`TABLETOP_INSTRUCTIONS`)."""

    hold_steps: int = 0


PLANNED_TASKS = {
    "PushCube-v1": PlannedTask(),
    "PullCube-v1": PlannedTask(),
    "StackCube-v1": PlannedTask(),
    "PlaceSphere-v1": PlannedTask(hold_steps=20),
}


def check_task(task: str) -> PlannedTask:
    if task not in PLANNED_TASKS:
        raise ConfigError(f"no motion-planner demonstrations for '{task}'; supported tasks (their goal is in the "
                          f"camera image): {', '.join(PLANNED_TASKS)}")
    return PLANNED_TASKS[task]


def numpy_breaks_mplib() -> bool:
    """mplib 0.1.1 (ManiSkill 3.0.1's pin) crashes the process under numpy 2."""
    return int(np.__version__.split(".")[0]) >= 2


def check_planner() -> None:
    """mplib importable and not under numpy 2 (where mplib 0.1.1 crashes the process)."""
    if numpy_breaks_mplib():
        raise ConfigError(f"ManiSkill's motion planner (mplib 0.1.1) crashes under numpy {np.__version__}; record "
                          "in the maniskill venv: bash scripts/setup_maniskill.sh, then run `vlacache demos` again "
                          "(it switches to .venvs/maniskill by itself)")
    try:
        import mplib  # noqa: F401
        from mani_skill.examples.motionplanning.panda.run import MP_SOLUTIONS  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"the motion planner needs mplib==0.1.1 and mani-skill==3.0.1 ({error}); "
                          "run bash scripts/setup_maniskill.sh") from error


def run_planned_episode(env, episode: EpisodeSpec) -> dict[str, Any]:
    """Solve one episode in the SIMPLER adapter `env` (control mode pd_ee_delta_pose, rotation 'none', gripper
    'binarize'); returns success, steps and, for a success, the arrays of a demonstration."""
    from mani_skill.examples.motionplanning.panda.run import MP_SOLUTIONS

    task = check_task(episode.task)
    env.reset(episode)  # builds the task's env and sets the instruction; the solution resets it again, same seed
    recorder = _Recorder(env)
    with _reports_joint_control(env._env.unwrapped):
        MP_SOLUTIONS[episode.task](recorder.wrapper, seed=int(episode.seed), debug=False, vis=False)
    hold = recorder.last_action()
    hold[:6] = 0.0
    for _ in range(task.hold_steps):
        if recorder.success:
            break
        recorder.step_model_action(hold)
    record: dict[str, Any] = {"success": recorder.success, "steps": len(recorder.actions)}
    if recorder.success:
        record["arrays"] = recorder.arrays(env)
    return record


class _Recorder:
    """The env the solution drives: each joint target becomes an end-effector delta, executed in the adapter's
    env and stored with the observation before it."""

    def __init__(self, env) -> None:
        import gymnasium as gym

        self.env, self.raw = env, env._env
        self.observations: list = []
        self.actions: list[np.ndarray] = []
        self.success = False
        self._obs = None
        self._pinocchio = None
        recorder = self

        class Wrapper(gym.Wrapper):
            def reset(self, **kwargs):
                obs, info = self.env.reset(**kwargs)
                recorder._obs = obs
                return obs, info

            def step(self, action):
                return recorder.step_joint_target(np.asarray(action, dtype=np.float64))

        self.wrapper = Wrapper(self.raw)

    def step_joint_target(self, action: np.ndarray):
        """A solution's [7 joint targets, (7 velocities,) gripper +-1] as the end-effector delta reaching it."""
        agent = self.raw.unwrapped.agent
        controller = agent.controller.controllers["arm"]
        if self._pinocchio is None:
            self._pinocchio = agent.robot.create_pinocchio_model()
        q = agent.robot.get_qpos()[0].cpu().numpy().copy()
        q[:7] = action[:7]
        self._pinocchio.compute_forward_kinematics(q)
        delta = _delta_action(controller, self._pinocchio.get_link_pose(controller.ee_link.index))
        return self.step_model_action(np.r_[delta, (float(action[-1]) + 1.0) / 2.0])

    def step_model_action(self, action: np.ndarray):
        """Execute a model-convention action through the adapter's conversion and store it."""
        self.observations.append(self.env._observation(self._obs))
        self.actions.append(np.asarray(action, dtype=np.float32))
        obs, reward, terminated, truncated, info = self.raw.step(self.env.convert_action(action))
        self._obs = obs
        self.success = bool(np.asarray(_numpy(info.get("success", False))).reshape(-1)[0])
        return obs, reward, terminated, truncated, info

    def last_action(self) -> np.ndarray:
        return self.actions[-1].copy() if self.actions else np.array([0, 0, 0, 0, 0, 0, 1], dtype=np.float32)

    def arrays(self, env) -> dict[str, Any]:
        first = self.observations[0]
        out: dict[str, Any] = {camera: np.stack([o.images[camera] for o in self.observations]).astype(np.uint8)
                               for camera in first.images}
        out["proprio"] = np.stack([o.proprio for o in self.observations]).astype(np.float32)
        out["actions"] = np.stack(self.actions).astype(np.float32)
        out["instruction"] = first.instruction
        return out


def _delta_action(controller, target) -> np.ndarray:
    """The normalised pd_ee_delta_pose action [6] that moves the end effector from where it is to `target` (in the
    robot's root frame), as ManiSkill's converter writes it; position clipped to [-1, 1], rotation to norm 1."""
    import sapien
    from mani_skill.trajectory.utils.actions.conversion import delta_pose_to_pd_ee_delta

    current = controller.ee_pose_at_base.sp
    action = delta_pose_to_pd_ee_delta(controller, sapien.Pose(target.p - current.p, (current * target.inv()).q))
    action = np.asarray(action, dtype=np.float64)
    action[:3] = np.clip(action[:3], -1.0, 1.0)
    norm = np.linalg.norm(action[3:6])
    if norm > 1.0:
        action[3:6] /= norm
    return action


@contextmanager
def _reports_joint_control(env) -> Iterator[None]:
    """Some solutions assert that the env runs joint-position control: while one runs, the task's class reports
    pd_joint_pos (the recorder converts every joint target it sends)."""
    cls = type(env)
    original = cls.__dict__.get("control_mode")
    cls.control_mode = property(lambda self: "pd_joint_pos")
    try:
        yield
    finally:
        if original is None:
            del cls.control_mode
        else:
            cls.control_mode = original


def _numpy(value: Any) -> Any:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else value
