"""`vlacache train`: real Lightning steps on a demonstration folder, checkpoint + resume, export in the released
layout and load-back key for key."""

import json
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch

from vlacache import CachedVLA, Observation
from vlacache.backbones.openvla import OpenVLABackbone
from vlacache.backbones.openvla_oft import OpenVLAOFTBackbone
from vlacache.train.bc import TrainConfig, batches_by_prompt, DemoSamples, noop_steps, train
from vlacache.train.demos import load_demos

from demo_fixture import INSTRUCTIONS
from test_cli import vlacache_in_process


def config(demo_folder, out, **overrides):
    base = dict(backbone={"name": "openvla-oft", "preset": "micro", "device": "cpu"}, demos=str(demo_folder),
                epochs=1, batch_size=4, warmup_steps=2, val_fraction=0.25, output_dir=str(out), threads=1)
    return TrainConfig(**{**base, **overrides})


def test_batches_share_one_prompt_length(demo_folder):
    from vlacache.backbones.openvla import build_preset

    backbone = build_preset("micro")
    samples = DemoSamples(list(load_demos(demo_folder)), chunk=8)
    lengths = {text: len(backbone.prompt_ids(text)) for text in INSTRUCTIONS}
    assert len(set(lengths.values())) == 2  # the two instructions tokenize to different lengths
    batches = batches_by_prompt(samples, lambda t: lengths[t], 4, True, 0)
    assert sorted(i for b in batches for i in b) == list(range(len(samples)))
    for batch in batches:
        assert len({lengths[samples.episodes[samples.index[i][0]]["instruction"]] for i in batch}) == 1
    item = samples[len(samples) - 1]  # the last step: the chunk repeats the episode's last action
    assert item["actions"].shape == (8, 7) and np.all(item["actions"] == item["actions"][0])


def test_dropping_noops_trains_on_the_steps_that_move_as_if_the_idle_ones_were_never_recorded():
    # a motion planner's episode: 3 idle steps, a move, a pause, the gripper closing with the arm still, a hold
    arm = np.zeros((9, 6))
    arm[:, 0] = [0, 0, 0, .2, .3, 0, 0, 0, .1]
    gripper = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0])
    actions = np.c_[arm, gripper].astype(np.float32)
    actions[1, 0] = 5e-5  # under the tolerance: still a no-op
    episode = {"primary": np.arange(9, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8),
               "proprio": np.zeros((9, 8), np.float32), "actions": actions, "instruction": "push"}
    assert noop_steps(actions).tolist() == [True, True, True, False, False, True, False, True, False]
    kept = DemoSamples([episode], chunk=4, drop_noops=True)
    assert len(kept) == 4 and len(DemoSamples([episode], chunk=4)) == 9
    first = kept[0]
    assert first["images"]["primary"][0, 0, 0] == 3  # the first step that moves
    assert first["actions"].tolist() == actions[[3, 4, 6, 8]].tolist()  # the chunk skips the pause and the hold
    assert kept[3]["actions"].tolist() == actions[[8, 8, 8, 8]].tolist()


@pytest.mark.parametrize("kind, cls", [("openvla-oft", OpenVLAOFTBackbone), ("openvla", OpenVLABackbone)])
def test_training_steps_export_in_the_released_layout(demo_folder, tmp_path, kind, cls):
    out = tmp_path / kind
    policy = train(config(demo_folder, out, backbone={"name": kind, "preset": "micro", "device": "cpu"},
                          chunk=8 if kind == "openvla-oft" else 1), progress=False)
    statistics = json.loads((demo_folder / "dataset_statistics.json").read_text())
    loaded = cls.from_pretrained(policy)  # strict: every key of the released layout, nothing else
    assert loaded.unnorm_key == "libero_spatial" and loaded.config.norm_stats == statistics
    rows = list((out / "loss_curves.csv").read_text().splitlines())
    assert rows[0] == "epoch,train_loss,val_loss" and len(rows) == 2 and all(rows[1].split(","))
    assert (out / "loss_curves.png").stat().st_size > 0 and (out / "checkpoints" / "last.ckpt").is_file()
    weights = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    trained = {k.removeprefix("parts.model."): v for k, v in weights.items() if k.startswith("parts.model.")}
    exported = loaded.model.state_dict()
    assert set(trained) == set(exported)
    for key, value in trained.items():  # exported in bf16: the trained weights, rounded
        assert torch.equal(exported[key], value.to(torch.bfloat16).to(exported[key].dtype)), key
    initial = cls.from_config(cls.Config(preset="micro", device="cpu"))
    assert not torch.equal(initial.model.projector.fc1.weight, loaded.model.projector.fc1.weight)
    demo = load_demos(demo_folder)[0]
    obs = Observation({"primary": demo["primary"][0], "wrist": demo["wrist"][0]}, demo["instruction"], demo["proprio"][0])
    actions = CachedVLA(loaded, None).predict(obs).actions
    assert actions.shape == ((1, 8, 7) if kind == "openvla-oft" else (1, 1, 7)) and np.isfinite(actions).all()


def test_an_interrupted_training_resumes_from_its_last_checkpoint(demo_folder, tmp_path):
    out = tmp_path / "resume"
    train(config(demo_folder, out, epochs=1), progress=False)
    first = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    train(config(demo_folder, out, epochs=2), progress=False)  # the same command with a longer budget
    second = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert first["epoch"] == 0 and second["epoch"] == 1
    assert second["global_step"] == 2 * first["global_step"]  # epoch 0 was not trained again
    epochs = [row.split(",")[0] for row in (out / "loss_curves.csv").read_text().splitlines()[1:]]
    assert epochs == ["0", "1"]  # both runs' losses in one curve


class CountingModule(L.LightningModule):
    """A one-layer Lightning module that counts its training steps and dies (SystemExit) at step `die_at`."""

    def __init__(self, die_at=None):
        super().__init__()
        self.layer, self.steps, self.die_at = torch.nn.Linear(2, 1), 0, die_at

    def training_step(self, batch, index):
        self.steps += 1
        if self.steps == self.die_at:
            raise SystemExit("interrupted")
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_run_interrupted_mid_epoch_resumes_from_its_in_epoch_checkpoint(tmp_path, monkeypatch):
    from torch.utils.data import DataLoader, TensorDataset
    from vlacache.train import lightning_run

    monkeypatch.setattr(lightning_run, "IN_EPOCH_EVERY", 4)
    loaders = {"train_dataloaders": DataLoader(TensorDataset(torch.randn(12, 2)), batch_size=1, shuffle=True)}
    interrupted = CountingModule(die_at=7)
    with pytest.raises(SystemExit):
        lightning_run.fit_resuming(interrupted, tmp_path, 2, False, loaders, resumable_mid_epoch=True)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["in-epoch.ckpt"]  # step 4 of epoch 0, no epoch ended
    resumed = CountingModule()
    trainer = lightning_run.fit_resuming(resumed, tmp_path, 2, False, loaders, resumable_mid_epoch=True)
    assert resumed.steps == 2 * 12 - 4 and trainer.global_step == 2 * 12  # the 4 steps done were not redone
    assert lightning_run.newest_checkpoint(folder).endswith("last.ckpt")


def test_a_bc_run_resumed_mid_epoch_trains_each_sample_of_that_epoch_once(demo_folder, tmp_path, monkeypatch):
    """Killed after 2 steps and resumed: epoch 0 draws the same order and skips what was trained, so each training
    sample is trained exactly once in it (the samples named by their proprio and action chunk)."""
    from vlacache.train import bc, lightning_run

    monkeypatch.setattr(lightning_run, "IN_EPOCH_EVERY", 1)
    trained, die_at = [], [3]
    step = bc.BehaviourCloning.training_step

    def recording_step(self, batch, index):
        if self.global_step + 1 == die_at[0]:
            raise SystemExit("interrupted")
        if self.trainer.current_epoch == 0:
            trained.extend(p.tobytes() + a.tobytes() for p, a in zip(batch["observation"].proprio, batch["actions"]))
        return step(self, batch, index)

    monkeypatch.setattr(bc.BehaviourCloning, "training_step", recording_step)
    out = tmp_path / "mid"
    with pytest.raises(SystemExit):
        train(config(demo_folder, out, epochs=2, batch_size=2), progress=False)
    die_at[0] = 0
    train(config(demo_folder, out, epochs=2, batch_size=2), progress=False)
    train_eps, _ = bc.split_episodes(list(load_demos(demo_folder)), 0.25, 0)
    everything = bc.DemoSamples(train_eps, 8)
    expected = [everything[i]["proprio"].tobytes() + everything[i]["actions"].tobytes() for i in range(len(everything))]
    assert len(expected) > 4 and sorted(trained) == sorted(expected)


def test_a_run_with_other_settings_is_refused_and_restart_moves_it_aside(demo_folder, tmp_path, capsys):
    from vlacache.config import ConfigError
    from vlacache.eval.results import ResultsConflict

    out = tmp_path / "fp"
    train(config(demo_folder, out, max_steps=1), progress=False)
    with pytest.raises(ResultsConflict, match=r"holds a training run made with other settings \(lr, shift_pixels\).*--restart"):
        train(config(demo_folder, out, lr=1e-3, shift_pixels=2), progress=False)
    train(config(demo_folder, out, max_steps=2, threads=1), progress=False)  # a longer budget resumes
    cli = vlacache_in_process(capsys, "train", "micro_oft_libero_spatial", f"demos={demo_folder}", f"output_dir={out}",
                              "epochs=1", "batch_size=4", "lr=1e-3", "threads=1", "--quiet")
    assert cli.returncode == 2 and "holds a training run made with other settings (" in cli.stderr
    restarted = vlacache_in_process(capsys, "train", "micro_oft_libero_spatial", f"demos={demo_folder}",
                                    f"output_dir={out}", "max_steps=1", "batch_size=4", "threads=1", "--quiet", "--restart")
    assert restarted.returncode == 0, restarted.stderr
    aside = [p for p in out.iterdir() if p.name.startswith("restarted-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "last.ckpt").is_file() and (out / "policy").is_dir()
    with pytest.raises(ConfigError, match="holds out all 4 episodes, none is left to train on"):
        train(config(demo_folder, tmp_path / "v", val_fraction=0.99), progress=False)
    with pytest.raises(ConfigError, match="chunk=4, but the backbone predicts chunks of 8 actions; set chunk=8"):
        train(config(demo_folder, tmp_path / "c", chunk=4), progress=False)
    assert not (tmp_path / "c" / "checkpoints").exists()


def test_train_cli(demo_folder, tmp_path, capsys):
    out = tmp_path / "cli"
    script = [sys.executable, "-m", "vlacache.cli"]
    done = subprocess.run([*script, "train", "micro_oft_libero_spatial", f"demos={demo_folder}", f"output_dir={out}",
                           "epochs=1", "batch_size=8", "threads=1", "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out / 'policy'}" in done.stdout
    from vlacache.manifest import verify_manifest

    assert verify_manifest(out / "policy")  # the export lists its files' hashes
    bad = vlacache_in_process(capsys, "train", "micro_oft_libero_spatial", f"demos={tmp_path / 'nothing'}", "--quiet")
    assert bad.returncode == 2 and "holds no index.jsonl" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_init_from_starts_from_a_trained_policy(demo_folder, tmp_path):
    first = train(config(demo_folder, tmp_path / "first", max_steps=2), progress=False)
    # a negligible learning rate: the continued policy must come back as the policy it started from
    continued = train(config(demo_folder, tmp_path / "continued", init_from=str(first), max_steps=1, lr=1e-20,
                             weight_decay=0.0), progress=False)
    fresh = train(config(demo_folder, tmp_path / "fresh", max_steps=1, lr=1e-20, weight_decay=0.0), progress=False)
    def weights(folder):  # every trained module: the decoder and towers, the action head, the proprio projector
        modules = OpenVLAOFTBackbone.from_pretrained(folder).trainable_modules()
        return {f"{name}.{k}": v for name, module in modules.items() for k, v in module.state_dict().items()}

    start, after, random_init = weights(first), weights(continued), weights(fresh)
    assert any(k.startswith("action_head.") for k in start)
    assert all(torch.equal(start[k], after[k]) for k in start)
    assert not all(torch.equal(start[k], random_init[k]) for k in start)
    saved = json.loads((tmp_path / "continued" / "train_config.json").read_text())
    assert saved["init_from"] == str(first)


def test_an_unfinished_recording_is_refused_with_the_fix(demo_folder, tmp_path):
    import shutil

    from vlacache.config import ConfigError

    unfinished = tmp_path / "unfinished"
    shutil.copytree(demo_folder, unfinished)
    (unfinished / "dataset_statistics.json").unlink()  # what a recording still running (or killed) looks like
    with pytest.raises(ConfigError, match="recording has not finished.*vlacache demos"):
        train(config(unfinished, tmp_path / "out"), progress=False)


def test_extra_demos_train_on_every_folder_with_their_joint_statistics(demo_folder, tmp_path):
    import shutil

    from vlacache.config import ConfigError
    from vlacache.train.demos import INDEX, STATISTICS, write_statistics

    lines = (demo_folder / INDEX).read_text().splitlines()
    halves = {"a": lines[:2], "b": lines[2:]}  # the fixture's episodes, split over two folders
    for name, part in halves.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / INDEX).write_text("\n".join(part) + "\n")
        for line in part:
            if json.loads(line)["file"]:
                shutil.copy(demo_folder / json.loads(line)["file"], folder)
        write_statistics(folder, "libero_spatial")
    policy = train(config(tmp_path / "a", tmp_path / "out", extra_demos=[str(tmp_path / "b")], max_steps=1,
                          val_fraction=0.0), progress=False)
    saved = OpenVLAOFTBackbone.from_pretrained(policy).config.norm_stats["libero_spatial"]
    joint = json.loads((demo_folder / STATISTICS).read_text())["libero_spatial"]  # the fixture's, over all 4
    assert saved["num_trajectories"] == 4 and saved["num_transitions"] == joint["num_transitions"]
    for part in ("action", "proprio"):
        for moment in ("mean", "std", "q01", "q99"):
            np.testing.assert_allclose(saved[part][moment], joint[part][moment], rtol=1e-6, atol=1e-9)
    (tmp_path / "b" / STATISTICS).write_text(json.dumps({"libero_object": joint}))
    with pytest.raises(ConfigError, match="extra_demos.*no 'libero_spatial'.*one suite"):
        train(config(tmp_path / "a", tmp_path / "out2", extra_demos=[str(tmp_path / "b")]), progress=False)


@pytest.mark.parametrize("depth", [8, 16])
def test_the_deep_presets_train_save_and_load_in_the_released_layout(demo_folder, tmp_path, capsys, depth):
    """The depth study's configs (`micro-deep8` / `micro-deep16`: the shipped micro-policy's width with 8 / 16
    decoder layers) run real training steps and export a policy that loads back with that depth, small enough to
    ship (bf16, <= 10 MiB) and predicting finite chunks."""
    out = tmp_path / f"deep{depth}"
    done = vlacache_in_process(capsys, "train", f"micro_oft_libero_spatial_deep{depth}", f"demos={demo_folder}",
                               f"output_dir={out}", "epochs=1", "max_steps=2", "batch_size=4", "warmup_steps=1",
                               "threads=1", "--quiet")
    assert done.returncode == 0, done.stderr
    loaded = OpenVLAOFTBackbone.from_pretrained(out / "policy")
    micro = OpenVLAOFTBackbone.from_config(OpenVLAOFTBackbone.Config(preset="micro", device="cpu"))
    assert len(loaded.decoder.layers) == depth and len(micro.decoder.layers) == 4
    assert loaded.decoder_dims().hidden == micro.decoder_dims().hidden  # deeper, not wider
    assert sum(p.stat().st_size for p in (out / "policy").iterdir()) <= 10 * 2**20
    assert {p.dtype for p in loaded.model.language_model.parameters()} == {torch.float32}  # loaded in fp32 from bf16
    demo = load_demos(demo_folder)[0]
    obs = Observation({"primary": demo["primary"][0], "wrist": demo["wrist"][0]}, demo["instruction"], demo["proprio"][0])
    actions = CachedVLA(loaded, None).predict(obs).actions
    assert actions.shape == (1, 8, 7) and np.isfinite(actions).all()
