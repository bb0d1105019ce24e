"""The learned selector (strategies/learned.py) and its training (`vlacache train`, objective: reuse): real
Lightning runs through the real engine on the shipped OFT micro-policy, export, load-back by a policy, resume,
and an objective that moves the classifier the way its tolerance says."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from vlacache import CachePolicy, attach
from vlacache.config import ConfigError
from vlacache.experiment import build_backbone
from vlacache.strategies.learned import LearnedSelector, load_classifier
from vlacache.train.demos import load_demos
from vlacache.train.reuse import ReuseTrainConfig, query_episodes, train_reuse
from test_cli import vlacache_in_process


def reuse_config(demo_folder, out, **overrides):
    base = dict(backbone="micro_oft_libero_spatial", policy="vla_cache_learned", demos=str(demo_folder),
                query_every=1, window=3, epochs=1, val_fraction=0.25, lr=0.01, threads=1, output_dir=str(out))
    return ReuseTrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def micro_oft():
    return build_backbone("micro_oft_libero_spatial")


def test_train_cli_exports_a_selector_a_policy_loads_and_resumes(demo_folder, tmp_path, capsys):
    config = {"objective": "reuse", "name": "cli", "demos": str(demo_folder), "query_every": 1, "window": 3,
              "epochs": 1, "val_fraction": 0.25, "threads": 1, "output_dir": str(tmp_path / "run")}
    (tmp_path / "reuse.yaml").write_text(yaml.safe_dump(config))
    run = lambda *extra: subprocess.run([sys.executable, "-m", "vlacache.cli", "train", str(tmp_path / "reuse.yaml"),  # noqa: E731
                                         "--quiet", *extra], capture_output=True, text=True, timeout=300)
    done = run()
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "run" / "selector"
    assert "selector: {name: learned" in done.stdout
    meta = json.loads((folder / "selector.json").read_text())
    assert meta["cameras"] == ["primary", "wrist"] and meta["training"]["train_episodes"] == 3
    assert {"val_reuse", "val_deviation", "val_within_tolerance"} <= set(meta["training"]["validation"])
    # the exported weights are the last checkpoint's, and a policy naming the folder loads them
    model, _ = load_classifier(folder)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[f"model.{key}"].float())
    policy = CachePolicy.from_config({"selector": {"name": "learned", "checkpoint": str(folder)},
                                      "scheduler": {"name": "constant", "fraction": 1.0, "start_layer": 1}})
    assert isinstance(policy.selector, LearnedSelector)
    # resume: a second run with more epochs continues from the last checkpoint
    again = vlacache_in_process(capsys, "train", tmp_path / "reuse.yaml", "--quiet", "epochs=2")
    assert again.returncode == 0, again.stderr[-3000:]
    epochs = [row.split(",")[0] for row in (tmp_path / "run" / "curves.csv").read_text().splitlines()[1:]]
    assert epochs == ["0", "1"]


def test_the_objective_moves_reuse_the_way_its_tolerance_says(demo_folder, tmp_path, micro_oft):
    """Same seed, same data: a tolerance nothing exceeds rewards reuse alone, so the classifier learns to reuse
    more; a tolerance every reuse exceeds, with a heavy penalty, teaches it to reuse less."""
    loose = train_reuse(reuse_config(demo_folder, tmp_path / "loose", tolerance=100.0, epochs=4), progress=False)
    strict = train_reuse(reuse_config(demo_folder, tmp_path / "strict", tolerance=1e-6, penalty=1.0, epochs=4),
                         progress=False)
    episodes = query_episodes(list(load_demos(demo_folder)), 1)
    probability = {}
    for name, folder in (("loose", loose), ("strict", strict)):
        policy = CachePolicy.from_config({"selector": {"name": "learned", "checkpoint": str(folder)},
                                          "scheduler": {"name": "constant", "fraction": 1.0, "start_layer": 1}})
        seen = []
        select = policy.selector.select
        policy.selector.select = lambda ctx, select=select, seen=seen: seen.append(select(ctx)) or seen[-1]
        with attach(micro_oft, policy) as vla:
            for episode in episodes:
                vla.reset()
                for observation in episode.observations:
                    vla.predict(observation)
        probability[name] = torch.cat([c.score.flatten() for step in seen for c in step.values()]).mean().item()
    assert probability["loose"] > 0.55 > 0.3 > probability["strict"], probability  # both start near 0.5


def test_bad_reuse_configs_name_the_fix(demo_folder, tmp_path):
    with pytest.raises(ConfigError, match="selector is 'learned'"):
        train_reuse(reuse_config(demo_folder, tmp_path / "x", policy="vla_cache"), progress=False)
    with pytest.raises(ConfigError, match="lower query_every"):
        train_reuse(reuse_config(demo_folder, tmp_path / "x", query_every=50), progress=False)
    with pytest.raises(ConfigError, match="window must be >= 2"):
        reuse_config(demo_folder, tmp_path / "x", window=1).check()
    with pytest.raises(ConfigError, match="no trained classifier at 'nowhere'.*micro_oft_libero_spatial"):
        CachePolicy.from_config({"selector": {"name": "learned", "checkpoint": "nowhere"}})


def test_the_shipped_learned_policy_reuses_static_patches_only(micro_oft):
    """`vla_cache_learned` loads the classifier shipped for the OFT micro-policy by name, with the threshold its
    training calibrated; only patches that pass the pixel test are ever judged, so a frame of noise reuses nothing."""
    import numpy as np

    from vlacache import Observation
    from vlacache.envs.replay import ReplayEnv

    policy = CachePolicy.from_config("vla_cache_learned")
    _, meta = load_classifier("micro_oft_libero_spatial")
    assert policy.selector.config.threshold == meta["threshold"] and 0 < meta["threshold"] < 1
    frame = ReplayEnv().reset()
    noise = Observation({c: np.random.default_rng(0).integers(0, 256, i.shape, dtype=np.uint8) for c, i in frame.images.items()},
                        frame.instruction, frame.proprio)
    with attach(micro_oft, policy) as vla:
        vla.predict(frame)
        same = vla.predict(frame)
        changed = vla.predict(noise)
    assert same.stats.reuse_ratio > 0 and any(bool(m.any()) for m in same.plan.info["static"].values())
    assert changed.stats.reuse_ratio == 0 and not any(bool(m.any()) for m in changed.plan.info["static"].values())
