"""Scripted-expert demonstrations on the real LIBERO simulator: sampled placements, the privileged state, the
recorder's files, resume and failed episodes. No mocks; LIBERO missing is a failure (see tests/test_libero.py)."""

import dataclasses
import json

import numpy as np
import pytest

from vlacache.env import EpisodeSpec
from vlacache.envs.libero import LiberoEnv
from vlacache.envs.replay import load_recording
from vlacache.eval.results import ResultStore
from vlacache.train.demos import INDEX_FIELDS, DemosConfig, load_demos, read_index, record_demos
from vlacache.train.expert import ActionNoise, NoiseConfig
from vlacache.types import InputError

from test_libero import LIBERO_MISSING, libero_installed

pytestmark = pytest.mark.sim  # starts a real simulator


@pytest.fixture(scope="module")
def sampled_env():
    if not libero_installed():
        pytest.fail(LIBERO_MISSING)
    env = LiberoEnv(LiberoEnv.Config(tasks=[0], placement="sampled", seeds=[100000, 100001], resolution=64, num_settle_steps=2))
    yield env
    env.close()


def test_sampled_placement_is_seeded_and_listed(sampled_env):
    env = sampled_env
    assert env.episodes() == [EpisodeSpec("libero_spatial/0", -1, 100000), EpisodeSpec("libero_spatial/0", -1, 100001)]
    scenes = []
    for episode in [env.episodes()[0], env.episodes()[1], env.episodes()[0]]:
        env.reset(episode)
        scenes.append({n: p.pos for n, p in env.privileged_state().objects.items()})
    for name in scenes[0]:  # a seed gives its scene again after other resets; another seed another scene
        np.testing.assert_allclose(scenes[2][name], scenes[0][name], atol=1e-6)
    assert max(np.abs(scenes[1][n] - scenes[0][n]).max() for n in scenes[0]) > 1e-3
    with pytest.raises(InputError):
        env.reset(EpisodeSpec("libero_spatial/0", 3, 100000))  # a shipped-state episode in a sampled env
    with pytest.raises(InputError):
        LiberoEnv(LiberoEnv.Config(placement="sampled", init_states=[0]))
    with pytest.raises(InputError):
        LiberoEnv(LiberoEnv.Config(placement="random"))


def test_privileged_state(sampled_env):
    env = sampled_env
    obs = env.reset(env.episodes()[0])
    s = env.privileged_state()
    assert s.goal == (("on", "akita_black_bowl_1", "plate_1"),)
    assert s.obj_of_interest == ("akita_black_bowl_1", "plate_1")
    np.testing.assert_allclose(s.eef_pos, obs.proprio[:3], atol=1e-5)
    np.testing.assert_allclose(s.gripper_qpos, obs.proprio[6:], atol=1e-5)
    assert s.gripper_opening == pytest.approx(s.gripper_qpos[0] - s.gripper_qpos[1]) and 0.03 < s.gripper_opening < 0.09
    assert np.isclose(np.linalg.norm(s.eef_quat), 1.0)
    assert {"akita_black_bowl_1", "akita_black_bowl_2", "plate_1"} <= set(s.objects)
    assert {"wooden_cabinet_1", "flat_stove_1"} <= set(s.fixtures)
    bowl = s.pose("akita_black_bowl_1")
    assert np.all(bowl.lo[:2] < bowl.pos[:2]) and np.all(bowl.pos[:2] < bowl.hi[:2])  # the box surrounds the bowl
    assert 0.04 < bowl.hi[2] - bowl.lo[2] < 0.07 and np.all(bowl.local_hi > bowl.local_lo)
    assert bowl.hi[2] < s.eef_pos[2]
    region = s.pose("main_table_plate_region")
    assert region.lo is None and region.size is not None and region.parent is None
    assert s.pose("wooden_cabinet_1_top_region").parent == "wooden_cabinet_1"
    with pytest.raises(KeyError):
        s.pose("no_such_body")


def test_action_noise():
    clean = np.array([0.5, -0.2, 0.0, 0.01, 0.0, -0.01, 1.0], dtype=np.float32)
    np.testing.assert_array_equal(ActionNoise(NoiseConfig(), seed=3)(clean), clean)  # off: the action itself
    config = NoiseConfig(sigma=0.3, burst_prob=0.5, burst_scale=0.9)
    a, b = ActionNoise(config, seed=3), ActionNoise(config, seed=3)
    runs = [[a(clean) for _ in range(20)], [b(clean) for _ in range(20)]]
    np.testing.assert_array_equal(runs[0], runs[1])  # seeded
    noisy = np.stack(runs[0])
    assert np.all(noisy[:, -1] == 1.0) and np.all(np.abs(noisy[:, :6]) <= 1.0)  # gripper untouched, clipped
    assert np.abs(noisy[:, :3] - clean[:3]).max() > 0.1
    np.testing.assert_array_equal(noisy[:, 3:6], np.tile(clean[3:6], (20, 1)))  # rotation noise off by default


def test_a_missed_grasp_pushes_the_hand_up_as_the_close_begins():
    clean = np.array([0.5, -0.2, 0.0, 0.01, 0.0, -0.01, 0.0], dtype=np.float32)
    miss = ActionNoise(NoiseConfig(grasp_miss_prob=1.0, grasp_miss_steps=3), seed=0)
    phases = ["approach", "approach", "close", "close", "close", "close", "close", "carry"]
    out = np.stack([miss(clean, phase) for phase in phases])
    np.testing.assert_array_equal(out[:2], np.tile(clean, (2, 1)))  # before the close: the clean action
    assert np.all(out[2:5, 2] == 1.0) and np.allclose(np.linalg.norm(out[2:5, :2], axis=1), 0.5)  # up and aside
    assert np.all(out[2:5, :3] == out[2, :3])  # one push for the whole miss
    np.testing.assert_array_equal(out[2:, 3:], np.tile(clean[3:], (6, 1)))  # rotation and gripper untouched
    np.testing.assert_array_equal(out[5:], np.tile(clean, (3, 1)))  # then the expert's own action again
    never = ActionNoise(NoiseConfig(grasp_miss_prob=1e-9), seed=0)
    np.testing.assert_array_equal(np.stack([never(clean, phase) for phase in phases]), np.tile(clean, (8, 1)))


def test_a_folder_recorded_before_a_new_setting_still_resumes(tmp_path):
    from vlacache.train.demos import SETTINGS, _claim

    config = DemosConfig(env={"name": "libero", "suite": "libero_spatial", "tasks": [0]}, output_dir=str(tmp_path))
    _claim(tmp_path, config)
    settings = json.loads((tmp_path / SETTINGS).read_text())
    del settings["noise"]["grasp_miss_prob"]  # what a folder recorded before the setting existed holds
    (tmp_path / SETTINGS).write_text(json.dumps(settings))
    _claim(tmp_path, config)  # the default: the same settings
    with pytest.raises(ValueError, match="noise.grasp_miss_prob.*another output_dir"):
        _claim(tmp_path, dataclasses.replace(config, noise={**config.noise, "grasp_miss_prob": 0.5}))


def test_record_resume_and_failed_episode(tmp_path):
    if not libero_installed():
        pytest.fail(LIBERO_MISSING)
    env = {"name": "libero", "suite": "libero_spatial", "tasks": [0], "resolution": 64}
    config = DemosConfig(env=env, episodes_per_task=1, noise={}, output_dir=str(tmp_path / "ok"), workers=1)
    summary = record_demos(config, progress=False)
    assert summary["attempted"] == 1 and summary["succeeded"] == 1
    assert summary["per_task"]["libero_spatial/0"]["success_rate"] == 1.0

    lines = (tmp_path / "ok" / "index.jsonl").read_text().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert line["task"] == "libero_spatial/0" and line["seed"] == 100000 and line["success"] is True
    assert line["file"] == "libero_spatial_task0_seed100000.npz" and line["wall_s"] > 0 and line["steps"] > 20

    demos = load_demos(tmp_path / "ok")
    assert len(demos) == 1
    ep = demos[0]
    steps = line["steps"]
    assert ep["primary"].shape == ep["wrist"].shape == (steps, 64, 64, 3)
    assert ep["primary"].dtype == ep["wrist"].dtype == np.uint8
    assert ep["proprio"].shape == (steps, 8) and ep["proprio"].dtype == np.float32
    assert ep["actions"].shape == (steps, 7) and ep["actions"].dtype == np.float32
    assert np.all(np.abs(ep["actions"][:, :6]) <= 1.0)
    assert set(np.unique(ep["actions"][:, 6])) == {0.0, 1.0}  # it closed and opened the gripper
    assert ep["instruction"] == "pick up the black bowl between the plate and the ramekin and place it on the plate"
    assert ep["task"] == "libero_spatial/0" and ep["seed"] == 100000
    for camera in ("primary", "wrist"):
        change = np.abs(ep[camera][-1].astype(int) - ep[camera][0].astype(int)).mean()
        assert change > 2, (camera, change)  # the arm moved through the pictures
    assert np.linalg.norm(ep["proprio"][-1, :3] - ep["proprio"][0, :3]) > 0.1

    stats = json.loads((tmp_path / "ok" / "dataset_statistics.json").read_text())["libero_spatial"]
    assert stats["num_transitions"] == steps and stats["num_trajectories"] == 1
    assert stats["action"]["mask"] == [True] * 6 + [False]
    assert all(len(stats[k]["q01"]) == n for k, n in (("action", 7), ("proprio", 8)))
    assert all(lo <= hi for lo, hi in zip(stats["action"]["q01"], stats["action"]["q99"]))
    assert json.loads((tmp_path / "ok" / "summary.json").read_text())["succeeded"] == 1

    stored = tmp_path / "ok" / line["file"]
    cameras, instruction, proprio = load_recording(stored)  # a demonstration is a replay recording
    assert set(cameras) == {"primary", "wrist"} and instruction == ep["instruction"]
    np.testing.assert_array_equal(cameras["wrist"], ep["wrist"])
    np.testing.assert_array_equal(proprio, ep["proprio"])
    mtime = stored.stat().st_mtime_ns
    again = record_demos(config, progress=False)  # resume: the seed is in the index, nothing runs again
    assert again["attempted"] == 1
    assert len((tmp_path / "ok" / "index.jsonl").read_text().splitlines()) == 1
    assert stored.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="other settings"):  # a resume must record the same way
        record_demos(dataclasses.replace(config, env={**env, "resolution": 32}), progress=False)

    failing = DemosConfig(env={**env, "max_steps": 5}, episodes_per_task=1, noise={}, output_dir=str(tmp_path / "fail"))
    summary = record_demos(failing, progress=False)
    assert summary["attempted"] == 1 and summary["succeeded"] == 0
    line = json.loads((tmp_path / "fail" / "index.jsonl").read_text())
    assert line["success"] is False and line["file"] is None and line["steps"] == 5
    assert not list((tmp_path / "fail").glob("*.npz")) and len(load_demos(tmp_path / "fail")) == 0
    assert json.loads((tmp_path / "fail" / "dataset_statistics.json").read_text())["libero_spatial"]["num_trajectories"] == 0


def test_a_second_recording_into_a_busy_folder_is_refused(tmp_path):
    """Two recordings into one folder would record the same episodes twice; the second stops before any work."""
    import json
    import os
    import socket

    from vlacache.eval.results import ResultsConflict

    out = tmp_path / "busy"
    out.mkdir()
    (out / "run.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "token": "other",
                                              "started": "now", "command": "vlacache demos libero_spatial"}))
    config = DemosConfig(env={"name": "libero", "suite": "libero_spatial", "tasks": [0]}, episodes_per_task=1,
                         output_dir=str(out))
    with pytest.raises(ResultsConflict, match="in use by another vlacache run"):
        record_demos(config, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]


def test_index_keeps_every_line(tmp_path):
    """Index lines are complete records of their own kind (not episode results): appends never move them aside."""
    index = ResultStore(tmp_path / "index.jsonl", INDEX_FIELDS)
    for seed in (100000, 100001):
        index.append({"task": "libero_spatial/0", "seed": seed, "success": True, "steps": 60, "file": f"{seed}.npz"})
    ResultStore(tmp_path / "index.jsonl", INDEX_FIELDS).append(
        {"task": "libero_spatial/1", "seed": 100000, "success": False, "steps": 220, "file": None})
    assert not (tmp_path / "index.jsonl.torn").exists()
    assert len(read_index(tmp_path)) == 3
    with pytest.raises(ValueError, match="lacks"):
        index.append({"task": "libero_spatial/0", "seed": 1})


def test_config_refuses_evaluation_states():
    with pytest.raises(ValueError, match="sampled"):
        DemosConfig(env={"name": "libero", "placement": "shipped"}).check()
    with pytest.raises(ValueError, match=r"noise.grasp_miss_prob is a probability in \[0, 1\], got 1.5"):
        DemosConfig(env={"name": "libero"}, noise={"grasp_miss_prob": 1.5}).check()
    with pytest.raises(ValueError, match="noise.grasp_miss_steps must be >= 1, got 0"):
        DemosConfig(env={"name": "libero"}, noise={"grasp_miss_steps": 0}).check()
    spec = DemosConfig(env={"name": "libero"}, episodes_per_task=3, first_seed=100000).env_spec()
    assert spec["seeds"] == [100000, 100001, 100002] and spec["placement"] == "sampled"


def test_a_truncated_demonstration_or_recording_is_named(tmp_path, capsys):
    """A demonstration cut off while copied fails naming the file (a BadZipFile traceback before), in training's
    reader, in a replay folder of `vlacache bench`, and in `vlacache run` on one recording."""
    from demo_fixture import write_demo_folder
    from test_cli import vlacache_in_process

    from vlacache.train.demos import load_demos

    folder = write_demo_folder(tmp_path)
    victim = sorted(folder.glob("*.npz"))[1]
    victim.write_bytes(victim.read_bytes()[:3000])
    demos = load_demos(folder)
    demos.load(0)
    with pytest.raises(InputError, match=f"demonstration {victim} is missing, truncated or corrupt"):
        demos.load(1)
    bench = vlacache_in_process(capsys, "bench", "tiny", f"env={{name: replay, path: {victim}}}", "--quiet",
                                "--out", str(tmp_path / "b.json"))
    assert bench.returncode == 2 and f"{victim} is truncated or corrupt" in bench.stderr
    run = vlacache_in_process(capsys, "run", "tiny_replay", f"env.path={victim}", "--quiet", f"output_dir={tmp_path / 'o'}")
    assert run.returncode == 2 and f"{victim} is truncated or corrupt" in run.stderr
