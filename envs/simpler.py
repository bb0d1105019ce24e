"""SIMPLER Bridge (WidowX) tasks as ManiSkill3 ports them, with the SIMPLER evaluation protocol.

Protocol (SimplerEnv `real2sim_eval_maniskill3.py`): one env per task, `obs_mode="rgb+segmentation"`, shader
pack "default"; episode i resets with `seed=seed+i, options={"episode_id": seed+i}` (the episode id picks the
object layout); the `3rd_view_camera` image is the policy input ('primary'), the instruction comes from
`env.unwrapped.get_language_instruction()`; the episode runs to ManiSkill's `max_episode_steps` (60 control
steps at 5 Hz, 120 for the eggplant task; `terminated` is ignored) and `info["success"]` at the last step is
the verdict. Model actions are 7-d [dxyz, droll, dpitch, dyaw, gripper] as in Bridge data: the rotation
goes to axis-angle (`euler2axangle`) and the gripper (1 = open) becomes 2 * (g > 0.5) - 1, as SIMPLER feeds
Octo / RT-1-X on Bridge.

Any ManiSkill3 task works through the same adapter (e.g. `PickCube-v1`, which ships in the wheel): pick the
camera, obs_mode, control_mode and a fallback instruction in the config.

mani_skill / sapien are imported lazily: this module imports without them. Setup: scripts/setup_simpler.sh.
The Bridge tasks need downloaded assets; they are checked before gym.make, and a missing asset raises
MissingAssetsError at once with the exact fetch instructions (ManiSkill's own y/n download prompt is never
reached, so nothing hangs and no half-made asset folder is left behind).
"""

from __future__ import annotations

import difflib
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vlacache.env import Env, EpisodeSpec
from vlacache.errors import VlacacheError
from vlacache.registry import register_env
from vlacache.types import InputError, Observation

BRIDGE_TASKS = (
    "PutCarrotOnPlateInScene-v1",
    "PutSpoonOnTableClothInScene-v1",
    "StackGreenCubeOnYellowCubeBakedTexInScene-v1",
    "PutEggplantInBasketScene-v1",
)

# Instructions for ManiSkill tabletop tasks, which define none (`get_language_instruction`); the config's
# `instruction` overrides them.
TABLETOP_INSTRUCTIONS = {
    "PushCube-v1": "push the cube onto the red and white target",
    "PullCube-v1": "pull the cube onto the red and white target",
    "StackCube-v1": "stack the red cube on the green cube",
    "PlaceSphere-v1": "place the sphere in the bin",
    "PickCube-v1": "pick up the cube and move it to the goal",
    "LiftPegUpright-v1": "lift the peg upright",
}

# ManiSkill 3.0.1 data sources the Bridge tasks load (mani_skill/utils/assets/data.py), relative to ASSET_DIR.
BRIDGE_DATA = "tasks/bridge_v2_real2sim_dataset"
WIDOWX_DIR = "robots/widowx"
ASSET_SOURCES = {
    "bridge_v2_real2sim": (BRIDGE_DATA, "https://huggingface.co/datasets/haosulab/ManiSkill_bridge_v2_real2sim/resolve/main/bridge_v2_real2sim_dataset.zip"),
    "widowx250s": (WIDOWX_DIR, "https://github.com/haosulab/ManiSkill-WidowX250S/archive/refs/tags/v0.2.0.zip"),
}

_FLAT = ("real_inpainting/bridge_real_eval_1.png", "stages/bridge_table_1_v1.glb")
_SINK = ("real_inpainting/bridge_sink.png", "stages/bridge_table_1_v2.glb")
_JSON = "custom/info_bridge_custom_v0.json"
_BAKED_JSON = "custom/info_bridge_custom_baked_tex_v0.json"
# Files each task reads under BRIDGE_DATA (base_env.py / put_on_in_scene.py of mani-skill 3.0.1).
BRIDGE_TASK_FILES: dict[str, tuple[str, ...]] = {
    "PutCarrotOnPlateInScene-v1": (_JSON, *_FLAT, *(f"custom/models/{m}/collision.obj" for m in (
        "bridge_carrot_generated_modified", "bridge_plate_objaverse_larger"))),
    "PutSpoonOnTableClothInScene-v1": (_JSON, *_FLAT, *(f"custom/models/{m}/collision.obj" for m in (
        "bridge_spoon_generated_modified", "table_cloth_generated_shorter"))),
    "StackGreenCubeOnYellowCubeBakedTexInScene-v1": (_BAKED_JSON, *_FLAT, *(f"custom/models/{m}/collision.obj" for m in (
        "baked_green_cube_3cm", "baked_yellow_cube_3cm"))),
    "PutEggplantInBasketScene-v1": (_JSON, *_SINK, *(f"custom/models/{m}/collision.obj" for m in (
        "eggplant", "dummy_sink_target_plane", "sink"))),
}

LAVAPIPE_ICDS = ("/usr/share/vulkan/icd.d/lvp_icd.json", "/usr/share/vulkan/icd.d/lvp_icd.x86_64.json")
GPU_ICDS = ("/usr/share/vulkan/icd.d/nvidia_icd.json", "/etc/vulkan/icd.d/nvidia_icd.json")


class MissingAssetsError(VlacacheError, FileNotFoundError):
    """ManiSkill assets a task needs are not on disk; the message says what to fetch and where to put it."""

    def __str__(self) -> str:  # FileNotFoundError would format (errno, strerror)
        return str(self.args[0])


def maniskill_asset_dir() -> Path:
    """Where mani_skill looks for downloaded data: $MS_ASSET_DIR/data, default ~/.maniskill/data (as mani_skill/__init__.py)."""
    root = os.getenv("MS_ASSET_DIR", os.path.join(os.path.expanduser("~"), ".maniskill"))
    return Path(root) / "data"


def _urdf_missing(urdf: Path) -> list[str]:
    """The URDF itself, or the mesh files it references that are absent (a half-copied robot folder)."""
    if not urdf.is_file():
        return [urdf.name]
    text = urdf.read_text(errors="replace")
    meshes = sorted(set(re.findall(r'filename="([^"]+)"', text)))
    return [m for m in meshes if "://" not in m and not (urdf.parent / m).is_file()]


def missing_assets(task_ids: list[str] | tuple[str, ...], asset_dir: Path | None = None) -> dict[str, tuple[Path, list[str]]]:
    """asset id -> (expected folder, missing files) for the known Bridge tasks among `task_ids`; {} when complete."""
    asset_dir = asset_dir or maniskill_asset_dir()
    missing: dict[str, tuple[Path, list[str]]] = {}
    bridge = [t for t in task_ids if t in BRIDGE_TASK_FILES]
    if not bridge:
        return missing
    robot = asset_dir / WIDOWX_DIR
    lost = _urdf_missing(robot / "wx250s.urdf")
    if lost:
        missing["widowx250s"] = (robot, lost)
    data = asset_dir / BRIDGE_DATA
    lost = sorted({f for t in bridge for f in BRIDGE_TASK_FILES[t] if not (data / f).is_file()})
    if lost:
        missing["bridge_v2_real2sim"] = (data, lost)
    return missing


def missing_assets_message(task_ids: list[str] | tuple[str, ...], missing: dict[str, tuple[Path, list[str]]]) -> str:
    asset_dir = maniskill_asset_dir()
    env_note = (f"MS_ASSET_DIR={os.environ['MS_ASSET_DIR']}" if os.getenv("MS_ASSET_DIR")
                else "MS_ASSET_DIR is not set, so ManiSkill uses ~/.maniskill")
    lines = [f"SIMPLER Bridge assets are missing for {', '.join(t for t in task_ids if t in BRIDGE_TASK_FILES)} "
             f"(ManiSkill asset root here: {asset_dir}; {env_note}):"]
    for asset_id, (folder, lost) in missing.items():
        if not folder.exists():
            shown = "the folder does not exist"
        else:
            shown = "incomplete, missing " + ", ".join(lost[:4]) + (f" and {len(lost) - 4} more" if len(lost) > 4 else "")
        lines.append(f"  - asset '{asset_id}': expected folder {folder} ({shown})")
    lines.append("This machine cannot download them (ManiSkill would try at gym.make). On a machine with internet and "
                 "mani-skill==3.0.1, run:")
    for asset_id in missing:
        lines.append(f"    python -m mani_skill.utils.download_asset {asset_id} -y")
    lines.append("which writes them under ~/.maniskill/data/ (or $MS_ASSET_DIR/data/ there). Copy these folders here:")
    for asset_id in missing:
        rel = ASSET_SOURCES[asset_id][0]
        lines.append(f"    ~/.maniskill/data/{rel}/  ->  {asset_dir / rel}/")
    lines.append("(or set MS_ASSET_DIR to a folder whose data/ holds them). Direct downloads, unzipped with the top "
                 "folder renamed to the target name above:")
    for asset_id in missing:
        lines.append(f"    {asset_id}: {ASSET_SOURCES[asset_id][1]}")
    return "\n".join(lines)


def check_assets(task_ids: list[str] | tuple[str, ...]) -> None:
    """Raise MissingAssetsError (at once, no import of mani_skill, no prompt) when a Bridge task lacks assets."""
    missing = missing_assets(task_ids)
    if missing:
        raise MissingAssetsError(missing_assets_message(task_ids, missing))


def setup_vulkan() -> str | None:
    """Point the Vulkan loader at Mesa lavapipe (CPU) unless the user chose an ICD or an NVIDIA ICD exists."""
    if os.getenv("VK_ICD_FILENAMES") or os.getenv("VK_DRIVER_FILES"):
        return os.getenv("VK_ICD_FILENAMES") or os.getenv("VK_DRIVER_FILES")
    if any(os.path.exists(p) for p in GPU_ICDS):
        return None
    for icd in LAVAPIPE_ICDS:
        if os.path.exists(icd):
            os.environ["VK_ICD_FILENAMES"] = icd
            return icd
    return None


@contextmanager
def _no_download_prompt(task: str) -> Iterator[None]:
    """Make ManiSkill's y/n asset prompt raise instead of reading stdin (a second line of defence)."""
    from mani_skill.utils import download_asset

    original = download_asset.prompt_yes_no

    def refuse(message: str) -> bool:
        raise MissingAssetsError(
            f"ManiSkill asked to download assets for {task} (it said: {message.strip()}). This adapter never downloads; "
            f"fetch them on a networked machine with `python -m mani_skill.utils.download_asset <asset id> -y` and "
            f"copy them under {maniskill_asset_dir()}. See scripts/setup_simpler.sh."
        )

    download_asset.prompt_yes_no = refuse
    try:
        yield
    finally:
        download_asset.prompt_yes_no = original


def _scalar(value: Any) -> Any:
    """ManiSkill info values are batched tensors [1]; return Python scalars (or arrays) for env 0."""
    try:
        import torch

        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, np.ndarray):
        value = value[0] if value.ndim >= 1 and value.shape[0] == 1 else value
        return value.item() if np.ndim(value) == 0 else value
    return value


@register_env("simpler")
class SimplerEnv(Env):
    """SIMPLER Bridge tasks in ManiSkill3 (or any ManiSkill3 task), one episode per (task, episode id)."""

    @dataclass
    class Config:
        task_ids: list[str] = field(default_factory=lambda: list(BRIDGE_TASKS))
        num_episodes: int = 24  # per task; Bridge carrot/spoon/stack have 24 layouts (eggplant 64; ids wrap)
        seed: int = 0  # episode i: seed = episode_id = seed + i (SimplerEnv maniskill3 protocol)
        camera: str = "3rd_view_camera"  # mapped to 'primary'; PickCube-v1: base_camera
        wrist_camera: str | None = None  # mapped to 'wrist' (e.g. hand_camera of robot panda_wristcam); None: none
        obs_mode: str = "rgb+segmentation"  # the only mode the Bridge tasks support; other tasks: "rgb"
        # None: the task's default (Bridge: arm_pd_ee_target_delta_pose_align2_gripper_pd_joint_pos)
        control_mode: str | None = None
        shader_pack: str = "default"  # SIMPLER uses "default" (ManiSkill also has "minimal", "rt")
        rotation: str = "euler_to_axangle"  # or "none": pass action[3:6] through
        gripper: str = "binarize"  # model g in [0,1], 1 = open -> 2*(g>0.5)-1; "linear": 2g-1; "none": as is
        max_steps: int | None = None  # None: ManiSkill's max_episode_steps for the task
        stop_on_success: bool = False  # SIMPLER runs every episode to the step limit
        instruction: str | None = None  # for a task without get_language_instruction; None: TABLETOP_INSTRUCTIONS
        proprio: bool = True  # agent qpos as Observation.proprio
        resolution: int | None = None  # every sensor camera rendered at this square size; None: the task's own
        seeds: list | None = None  # explicit episode seeds (one episode per task and seed); None: seed + i
        robot_uids: str | None = None  # None: the task's default robot (StackCube-v1: panda_wristcam; "panda": no hand camera)

    def __init__(self, config: "SimplerEnv.Config | None" = None) -> None:
        self.config = config or self.Config()
        c = self.config
        if not c.task_ids:
            raise InputError("simpler env: task_ids is empty; e.g. ['PutCarrotOnPlateInScene-v1']")
        if c.rotation not in ("euler_to_axangle", "none"):
            raise InputError(f"simpler env: rotation must be 'euler_to_axangle' or 'none', got {c.rotation!r}")
        if c.gripper not in ("binarize", "linear", "none"):
            raise InputError(f"simpler env: gripper must be 'binarize', 'linear' or 'none', got {c.gripper!r}")
        check_assets(c.task_ids)  # before importing mani_skill: fails in milliseconds
        setup_vulkan()
        try:
            import gymnasium  # noqa: F401
            import mani_skill.envs  # noqa: F401  (registers the tasks)
            from mani_skill.utils.registration import REGISTERED_ENVS
        except ImportError as error:
            raise ImportError(f"the simpler env needs mani-skill==3.0.1 and sapien==3.0.3 ({error}); "
                              "run scripts/setup_simpler.sh") from error
        for task in c.task_ids:
            if task not in REGISTERED_ENVS:
                near = difflib.get_close_matches(task, list(REGISTERED_ENVS), n=3)
                hint = f" Did you mean {', '.join(near)}?" if near else ""
                raise InputError(f"unknown ManiSkill task '{task}'.{hint} Bridge tasks: {', '.join(BRIDGE_TASKS)}")
        self._registry = REGISTERED_ENVS
        self._env = None
        self._task: str | None = None
        self._instruction = ""
        self.t = 0

    # ----------------------------------------------------------------------------------------------------
    @property
    def max_steps(self) -> int:
        if self.config.max_steps:
            return self.config.max_steps
        task = self._task or self.config.task_ids[0]
        return int(self._registry[task].max_episode_steps or 1000)

    def episodes(self) -> list[EpisodeSpec]:
        c = self.config
        seeds = c.seeds if c.seeds is not None else [c.seed + i for i in range(c.num_episodes)]
        return [EpisodeSpec(task=t, init_state=int(s), seed=int(s)) for t in c.task_ids for s in seeds]

    def task_index(self, task: str) -> int:
        return self.config.task_ids.index(task)

    def _make(self, task: str):
        if self._env is not None and self._task == task:
            return self._env
        self.close()
        import gymnasium as gym

        check_assets([task])
        sensors: dict[str, Any] = dict(shader_pack=self.config.shader_pack)
        if self.config.resolution:
            sensors.update(width=self.config.resolution, height=self.config.resolution)
        kwargs: dict[str, Any] = dict(obs_mode=self.config.obs_mode, num_envs=1, sensor_configs=sensors)
        if self.config.control_mode:
            kwargs["control_mode"] = self.config.control_mode
        if self.config.robot_uids:
            kwargs["robot_uids"] = self.config.robot_uids
        try:
            with _no_download_prompt(task):
                env = gym.make(task, **kwargs)
        except RuntimeError as error:
            if "vk" not in str(error).lower() and "vulkan" not in str(error).lower():
                raise
            raise RuntimeError(
                f"SAPIEN could not start Vulkan ({error}; VK_ICD_FILENAMES={os.getenv('VK_ICD_FILENAMES')}). On a CPU "
                "machine install Mesa lavapipe >= 25 (Debian 12: mesa-vulkan-drivers from bookworm-backports; stock "
                "Mesa 22 does not work): run scripts/setup_simpler.sh"
            ) from error
        self._env, self._task = env, task
        cameras = list(env.unwrapped._sensors.keys()) if hasattr(env.unwrapped, "_sensors") else []
        for camera in (self.config.camera, self.config.wrist_camera):
            if camera is not None and camera not in cameras:
                self.close()
                raise InputError(f"task {task} has no camera '{camera}'; its cameras: {', '.join(cameras) or '(none)'}")
        shape = env.unwrapped.single_action_space.shape
        if shape != (7,):
            self.close()
            raise InputError(f"task {task} with control mode '{env.unwrapped.control_mode}' takes {shape} actions; "
                             "this adapter feeds 7-d [dxyz, drot, gripper] actions: pick an EE delta-pose control mode "
                             "(e.g. pd_ee_delta_pose)")
        return env

    def _observation(self, obs: dict) -> Observation:
        try:
            rgb = obs["sensor_data"][self.config.camera]["rgb"]
        except KeyError as error:
            raise InputError(f"observation has no rgb for camera '{self.config.camera}' (obs_mode={self.config.obs_mode!r}); "
                             "use an obs_mode with rgb") from error
        images = {"primary": _rgb(rgb)}
        if self.config.wrist_camera is not None:
            images["wrist"] = _rgb(obs["sensor_data"][self.config.wrist_camera]["rgb"])
        proprio = None
        if self.config.proprio and "agent" in obs and "qpos" in obs["agent"]:
            proprio = _to_numpy(obs["agent"]["qpos"])[0].astype(np.float32)
        return Observation(images=images, instruction=self._instruction, proprio=proprio)

    def reset(self, episode: EpisodeSpec | None = None) -> Observation:
        episode = episode or self.episodes()[0]
        env = self._make(episode.task)
        # a rebuilt scene: PhysX keeps contact state across plain resets, so an episode would depend on the ones
        # before it in this simulator (the same seed and actions diverge once objects touch)
        options: dict[str, Any] = {"reconfigure": True}
        if episode.task in BRIDGE_TASK_FILES or hasattr(env.unwrapped, "xyz_configs"):
            import torch

            options["episode_id"] = torch.tensor([episode.init_state])
        with _no_download_prompt(episode.task):
            obs, _ = env.reset(seed=episode.seed, options=options)
        getter = getattr(env.unwrapped, "get_language_instruction", None)
        if getter is not None:
            text = getter()
            self._instruction = str(text[0] if isinstance(text, (list, tuple)) else text)
        elif self.config.instruction or episode.task in TABLETOP_INSTRUCTIONS:
            self._instruction = self.config.instruction or TABLETOP_INSTRUCTIONS[episode.task]
        else:
            raise InputError(f"task {episode.task} has no get_language_instruction(); set the env config's 'instruction'")
        self.t = 0
        return self._observation(obs)

    def convert_action(self, action: Any) -> np.ndarray:
        """Model action [dxyz, droll, dpitch, dyaw, gripper] -> the env's 7-d action (SIMPLER conventions)."""
        return to_simpler_action(action, self.config.rotation, self.config.gripper)

    def step(self, action: Any) -> tuple[Observation, float, bool, dict[str, Any]]:
        if self._env is None:
            raise RuntimeError("simpler env: call reset() before step()")
        with warnings.catch_warnings():  # mani_skill calls np.isnan on a torch tensor (numpy 2 deprecation)
            warnings.filterwarnings("ignore", message=".*__array_wrap__.*", category=DeprecationWarning)
            obs, reward, terminated, truncated, info = self._env.step(self.convert_action(action))
        self.t += 1
        out = {k: _scalar(v) for k, v in info.items() if k not in ("episode", "final_info", "final_observation")}
        success = bool(out.get("success", False))
        out["success"] = success
        done = self.t >= self.max_steps or (self.config.stop_on_success and success)
        return self._observation(obs), float(_scalar(reward)), done, out

    def close(self) -> None:
        if self._env is not None:
            try:
                self._env.close()
            finally:
                self._env, self._task = None, None


def to_simpler_action(action: Any, rotation: str = "euler_to_axangle", gripper: str = "binarize") -> np.ndarray:
    """A model action [dxyz, droll, dpitch, dyaw, gripper] -> SIMPLER's 7-d env action: rotation
    'euler_to_axangle' (as SimplerEnv's OpenVLA policy) or 'none'; gripper g (1 = open) 'binarize' -> 2*(g>0.5)-1,
    'linear' -> 2g-1, 'none' -> as is."""
    a = np.asarray(_to_numpy(action), dtype=np.float64).reshape(-1)
    if a.shape != (7,):
        raise InputError(f"simpler env takes one 7-d action [dx, dy, dz, droll, dpitch, dyaw, gripper], got shape {a.shape}")
    out = a.copy()
    if rotation == "euler_to_axangle":
        from transforms3d.euler import euler2axangle

        axis, angle = euler2axangle(a[3], a[4], a[5])
        out[3:6] = np.asarray(axis) * angle
    if gripper == "binarize":
        out[6] = 1.0 if a[6] > 0.5 else -1.0
    elif gripper == "linear":
        out[6] = 2.0 * a[6] - 1.0
    return out.astype(np.float32)


def _rgb(rgb: Any) -> np.ndarray:
    """One camera's first env's image, uint8 [H, W, 3]."""
    return np.ascontiguousarray(_to_numpy(rgb)[0][..., :3]).astype(np.uint8, copy=False)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)
