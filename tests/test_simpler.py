"""The SIMPLER / ManiSkill3 env adapter, for real: PickCube-v1 (ships in the mani-skill wheel) rendered by
SAPIEN on the CPU (Mesa lavapipe), the tiny VLA with the cache driving it, and the missing-Bridge-assets error
(immediate, no prompt, nothing written). Setup: scripts/setup_simpler.sh."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vlacache.envs import simpler
from vlacache.envs.simpler import BRIDGE_TASKS, SimplerEnv, missing_assets
from vlacache.types import InputError

pytestmark = pytest.mark.sim  # starts a real simulator

HAVE_MANISKILL = importlib.util.find_spec("mani_skill") is not None
HAVE_VULKAN = simpler.setup_vulkan() is not None or any(os.path.exists(p) for p in simpler.GPU_ICDS)


@pytest.fixture
def _maniskill_present():
    # failures, not skips: the project's setup (scripts/setup.sh) installs ManiSkill and lavapipe
    if not HAVE_MANISKILL:
        pytest.fail("mani-skill is not installed: run `bash scripts/setup.sh` (or scripts/setup_simpler.sh)")


@pytest.fixture
def _vulkan_present():
    if not HAVE_VULKAN:
        pytest.fail("no Vulkan driver (Mesa lavapipe >= 25): run `bash scripts/setup.sh` (or scripts/setup_simpler.sh)")


needs_maniskill = pytest.mark.usefixtures("_maniskill_present")
needs_vulkan = pytest.mark.usefixtures("_vulkan_present")

MAX_STEPS = 6


@pytest.fixture(scope="module")
def pickcube():
    from vlacache.config import load_yaml, resolve_config_path
    from vlacache.experiment import build_env

    spec = load_yaml(resolve_config_path("simpler_pickcube", "env"))
    spec.max_steps = MAX_STEPS
    env = build_env(spec)
    yield env
    env.close()


# ---------------------------------------------------------------------------------------------------------
def test_missing_bridge_assets_fail_at_once_without_prompt(tmp_path):
    """stdin closed, empty MS_ASSET_DIR: the adapter raises in milliseconds with the download commands and the
    target folders, before importing mani_skill; ManiSkill's own y/n prompt (reached by a bare gym.make) is
    turned into the same error; nothing is created under MS_ASSET_DIR. A hang would hit the subprocess timeout."""
    root = tmp_path / "ms"
    script = textwrap.dedent(f"""
        import json, sys
        from vlacache.envs.simpler import SimplerEnv, MissingAssetsError, _no_download_prompt
        out = {{}}
        try:
            SimplerEnv(SimplerEnv.Config())
        except MissingAssetsError as error:
            out["message"] = str(error)
            out["imported_maniskill"] = "mani_skill" in sys.modules
        if {HAVE_MANISKILL!r}:
            import gymnasium as gym
            import mani_skill.envs
            try:
                with _no_download_prompt("PutCarrotOnPlateInScene-v1"):
                    gym.make("PutCarrotOnPlateInScene-v1", obs_mode="rgb+segmentation", num_envs=1)
            except MissingAssetsError as error:
                out["guard"] = str(error)
        print("RESULT" + json.dumps(out))
    """)
    env = {**os.environ, "MS_ASSET_DIR": str(root), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-c", script], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=90, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    out = json.loads(line[len("RESULT"):])
    message = out["message"]
    assert not out["imported_maniskill"]  # raised before the heavy import: no download attempt, no prompt
    for needed in ("python -m mani_skill.utils.download_asset bridge_v2_real2sim -y",
                   "python -m mani_skill.utils.download_asset widowx250s -y",
                   str(root / "data" / "tasks" / "bridge_v2_real2sim_dataset"), str(root / "data" / "robots" / "widowx"),
                   f"MS_ASSET_DIR={root}", "the folder does not exist"):
        assert needed in message, needed
    if HAVE_MANISKILL:
        assert "download_asset" in out["guard"] and "PutCarrotOnPlateInScene-v1" in out["guard"]
    assert "(y|n)" not in proc.stdout
    assert not root.exists(), sorted(str(p) for p in root.rglob("*"))


def test_half_copied_assets_are_reported(tmp_path):
    data = tmp_path / "data"
    robot = data / "robots" / "widowx"
    (robot / "meshes").mkdir(parents=True)
    (robot / "meshes" / "base.stl").write_text("solid")
    (robot / "wx250s.urdf").write_text('<robot><mesh filename="meshes/base.stl"/><mesh filename="meshes/arm.stl"/></robot>')
    task = data / "tasks" / "bridge_v2_real2sim_dataset"
    for rel in simpler.BRIDGE_TASK_FILES["PutCarrotOnPlateInScene-v1"]:
        (task / rel).parent.mkdir(parents=True, exist_ok=True)
        (task / rel).write_text("x")
    missing = missing_assets(["PutCarrotOnPlateInScene-v1"], data)
    assert missing == {"widowx250s": (robot, ["meshes/arm.stl"])}
    (robot / "meshes" / "arm.stl").write_text("solid")
    assert missing_assets(["PutCarrotOnPlateInScene-v1"], data) == {}
    assert set(missing_assets(["PutEggplantInBasketScene-v1"], data)) == {"bridge_v2_real2sim"}  # sink scene files
    assert missing_assets(["PickCube-v1"], data / "nowhere") == {}  # ships in the wheel


@needs_maniskill
def test_bridge_task_ids_and_step_limits_match_maniskill():
    import mani_skill.envs  # noqa: F401
    from mani_skill.utils.registration import REGISTERED_ENVS

    limits = {t: REGISTERED_ENVS[t].max_episode_steps for t in BRIDGE_TASKS}
    assert limits == {"PutCarrotOnPlateInScene-v1": 60, "PutSpoonOnTableClothInScene-v1": 60,
                      "StackGreenCubeOnYellowCubeBakedTexInScene-v1": 60, "PutEggplantInBasketScene-v1": 120}
    assert all(REGISTERED_ENVS[t].asset_download_ids == ["bridge_v2_real2sim"] for t in BRIDGE_TASKS)
    with pytest.raises(InputError, match="PickCube-v1"):
        SimplerEnv(SimplerEnv.Config(task_ids=["PickCube-v2"]))
    assert SimplerEnv(SimplerEnv.Config(task_ids=["PickCube-v1"])).max_steps == 50


# ---------------------------------------------------------------------------------------------------------
@needs_maniskill
@needs_vulkan
def test_reset_gives_rgb_image_and_instruction(pickcube):
    obs = pickcube.reset(pickcube.episodes()[0])
    image = obs.images["primary"]
    assert list(obs.images) == ["primary"]
    assert image.dtype == np.uint8 and image.shape == (128, 128, 3)
    assert image.std() > 5  # a rendered scene, not a blank frame
    assert obs.instruction == "pick up the red cube and move it to the green target"
    assert obs.proprio.dtype == np.float32 and obs.proprio.shape == (9,)


@needs_maniskill
@needs_vulkan
def test_steps_run_and_done_at_max_steps(pickcube):
    first = pickcube.reset(pickcube.episodes()[0]).images["primary"].copy()
    up = np.array([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])  # raise the hand, gripper open
    dones = []
    for _ in range(MAX_STEPS):
        obs, reward, done, info = pickcube.step(up)
        dones.append(done)
        assert isinstance(info["success"], bool) and isinstance(reward, float)
    assert dones == [False] * (MAX_STEPS - 1) + [True]
    assert np.abs(obs.images["primary"].astype(int) - first).mean() > 0.5  # the arm moved in the image


@needs_maniskill
@needs_vulkan
def test_episodes_are_seeded_init_states(pickcube):
    episodes = pickcube.episodes()
    assert [(e.task, e.init_state, e.seed) for e in episodes[:3]] == [("PickCube-v1", i, i) for i in range(3)]
    a = pickcube.reset(episodes[0]).images["primary"].copy()
    b = pickcube.reset(episodes[1]).images["primary"].copy()
    again = pickcube.reset(episodes[0]).images["primary"]
    assert np.array_equal(a, again)
    assert not np.array_equal(a, b)


@needs_maniskill
def test_action_conversion_follows_simpler_bridge(pickcube):
    from transforms3d.euler import euler2axangle

    action = np.array([0.01, -0.02, 0.03, 0.1, -0.2, 0.3, 0.7])
    out = pickcube.convert_action(action)
    axis, angle = euler2axangle(0.1, -0.2, 0.3)
    np.testing.assert_allclose(out[:3], action[:3], rtol=1e-6)
    np.testing.assert_allclose(out[3:6], axis * angle, rtol=1e-5)
    assert out[6] == 1.0 and pickcube.convert_action(np.r_[action[:6], 0.2])[6] == -1.0  # 1 = open -> +1
    with pytest.raises(InputError, match="7-d"):
        pickcube.convert_action(np.zeros(6))


@needs_maniskill
@needs_vulkan
def test_tiny_vla_with_cache_drives_pickcube(pickcube):
    import vlacache
    from vlacache.backbones.openvla import build_preset

    backbone = build_preset("tiny")
    ratios = []
    with vlacache.attach(backbone, "static_reuse") as vla:
        obs = pickcube.reset(pickcube.episodes()[0])
        for _ in range(4):
            r = vla.predict(obs)
            assert r.actions.shape[-1] == 7
            obs, rew, done, info = pickcube.step(r.actions[0, 0])
            ratios.append(r.stats.reuse_ratio)
    assert ratios[0] == 0.0 and max(ratios[1:]) > 0  # the first step is full, later steps reuse tokens
    assert obs.images["primary"].shape == (128, 128, 3) and not done
