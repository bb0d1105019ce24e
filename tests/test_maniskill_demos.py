"""Motion-planner demonstrations on a real ManiSkill task, recorded by the `vlacache demos` command (which moves
itself into the numpy-1.26 venv mplib needs), then checked from this Python: the stored first frame is what the
SIMPLER adapter shows a policy at that seed, and the stored actions, executed through the adapter, solve the
task again."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlacache import ConfigError
from vlacache.env import EpisodeSpec
from vlacache.experiment import load_config
from vlacache.train.demos import DemosConfig, load_demos

BIN = Path(sys.executable).parent
MANISKILL_PYTHON = Path(__file__).resolve().parents[1] / ".venvs" / "maniskill" / "bin" / "python"


def test_a_planner_episode_is_recorded_as_the_policy_sees_it_and_its_actions_solve_the_task(tmp_path):
    assert MANISKILL_PYTHON.exists(), "the maniskill venv is missing: run bash scripts/setup_maniskill.sh (setup.sh does)"
    out = tmp_path / "demos"
    run = subprocess.run([str(BIN / "vlacache"), "demos", "maniskill_tabletop", "episodes_per_task=1",
                          "env.task_ids=[PullCube-v1]", f"output_dir={out}", "workers=1", "--quiet"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    (line,) = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    assert line["task"] == "PullCube-v1" and line["seed"] == 100000 and line["success"], line
    demos = load_demos(out)
    episode = demos[0]
    steps = line["steps"]
    assert episode["primary"].shape == (steps, 128, 128, 3) and episode["proprio"].shape == (steps, 9)
    actions = episode["actions"]
    assert actions.shape == (steps, 7) and set(np.unique(actions[:, 6])) <= {0.0, 1.0}
    assert np.abs(actions[:, :6]).max() <= 1.0 + 1e-6
    assert episode["instruction"] == "pull the cube onto the red and white target"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["per_task"]["PullCube-v1"]["succeeded"] == 1
    assert json.loads((out / "dataset_statistics.json").read_text())["maniskill"]["num_trajectories"] == 1

    from vlacache.envs.simpler import SimplerEnv

    config = load_config(DemosConfig, "maniskill_tabletop", "demos", ["env.task_ids=[PullCube-v1]"])
    spec = {k: v for k, v in config.env_spec().items() if k not in ("name", "seeds")}
    env = SimplerEnv(SimplerEnv.Config(**spec))
    try:
        obs = env.reset(EpisodeSpec(task="PullCube-v1", init_state=100000, seed=100000))
        assert np.array_equal(obs.images["primary"], episode["primary"][0])
        assert np.allclose(obs.proprio, episode["proprio"][0])
        info = {}
        for action in actions:
            obs, _, _, info = env.step(action)
        assert info["success"], "the stored actions, executed again through the adapter, must solve the task"
    finally:
        env.close()


def test_planner_demonstrations_refuse_what_they_cannot_record():
    from vlacache.train.planner import check_planner

    with pytest.raises(ConfigError, match="supported tasks .*PushCube-v1"):
        load_config(DemosConfig, "maniskill_tabletop", "demos", ["env.task_ids=[PickCube-v1]"]).check()
    with pytest.raises(ConfigError, match="noise: {}"):
        load_config(DemosConfig, "maniskill_tabletop", "demos", ["noise.sigma=0.1"]).check()
    with pytest.raises(ConfigError, match="control_mode: pd_ee_delta_pose"):
        load_config(DemosConfig, "maniskill_tabletop", "demos", ["env.control_mode=pd_joint_pos"]).check()
    with pytest.raises(ConfigError, match="setup_maniskill.sh"):  # this Python has numpy 2
        check_planner()
