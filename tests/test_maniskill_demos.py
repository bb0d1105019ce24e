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


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One PullCube-v1 episode recorded by the `vlacache demos` command."""
    assert MANISKILL_PYTHON.exists(), "the maniskill venv is missing: run bash scripts/setup_maniskill.sh (setup.sh does)"
    out = tmp_path_factory.mktemp("maniskill") / "demos"
    run = subprocess.run([str(BIN / "vlacache"), "demos", "maniskill_tabletop", "episodes_per_task=1",
                          "env.task_ids=[PullCube-v1]", f"output_dir={out}", "workers=1", "--quiet"],
                         capture_output=True, text=True, timeout=600, cwd=out.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_a_planner_episode_is_recorded_as_the_policy_sees_it_and_its_actions_solve_the_task(recorded):
    out = recorded
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


HISTORY_CHECK = """
import json, sys
import numpy as np
from vlacache.env import EpisodeSpec
from vlacache.experiment import load_config
from vlacache.train import demos

config = load_config(demos.DemosConfig, "maniskill_tabletop", "demos", ["env.task_ids=[StackCube-v1]"])
def actions(seeds):
    demos._init_worker(config.env_spec(), config.expert, config.noise)
    try:
        return [demos._run_episode(EpisodeSpec("StackCube-v1", s, s)) for s in seeds][-1]["arrays"]["actions"]
    finally:
        demos._close_worker_envs()
fresh, after = actions([100015]), actions([100014, 100015])
print(json.dumps({"fresh": len(fresh), "after": len(after),
                  "equal": fresh.shape == after.shape and bool(np.array_equal(fresh, after))}))
"""


def test_a_demonstration_does_not_depend_on_the_episodes_recorded_before_it():
    """A recording worker keeps one simulator per task. PhysX keeps contact state that a plain ManiSkill reset
    leaves in place (the state dict agrees for 53 steps, then the stacked cube moves otherwise): StackCube seed
    100015 took 120 steps in a new simulator and 121 after seed 100014. Every reset rebuilds the scene, so an
    episode is the same whatever ran before it."""
    run = subprocess.run([str(MANISKILL_PYTHON), "-c", HISTORY_CHECK], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["equal"], result


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


@pytest.mark.parametrize("name", ["micro_cogact_maniskill", "micro_openvla_maniskill"])
def test_the_maniskill_training_configs_train_and_export_a_loadable_policy(recorded, tmp_path, name):
    """A few real Lightning steps of each shipped training config on the recorded episode; the export loads in
    the released layout and predicts from the recorded frame (CogACT: its 16-action chunk, ensembled to one)."""
    import torch

    from vlacache import CachedVLA, Observation
    from vlacache.backbones.cogact.backbone import CogACTBackbone
    from vlacache.backbones.openvla import OpenVLABackbone
    from vlacache.train.bc import TrainConfig, train

    config = load_config(TrainConfig, name, "train", [f"demos={recorded}", "max_steps=2", "batch_size=8",
                                                      "warmup_steps=1", "val_fraction=0", f"output_dir={tmp_path}",
                                                      "threads=1"])
    policy = train(config, progress=False)
    assert sum(f.stat().st_size for f in policy.rglob("*") if f.is_file()) < 10e6  # ships under 10 MB
    cls = CogACTBackbone if name.startswith("micro_cogact") else OpenVLABackbone
    loaded = cls.from_pretrained(policy, **({"action_ensemble": True} if cls is CogACTBackbone else {}))
    assert loaded.unnorm_key == "maniskill"
    if cls is CogACTBackbone:
        assert loaded.chunk_size == 16
        initial = cls.from_config(cls.Config(preset="micro", device="cpu"))
        assert not torch.equal(initial.action_model.net.final_layer.linear.weight,
                               loaded.action_model.net.final_layer.linear.weight)  # the head trained
    episode = load_demos(recorded)[0]
    actions = CachedVLA(loaded, None).predict(Observation({"primary": episode["primary"][0]}, episode["instruction"])).actions
    assert actions.shape == (1, 1, 7) and np.isfinite(actions).all()
