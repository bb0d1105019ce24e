"""`vlacache train`: behaviour cloning of a backbone (trained from scratch) on recorded demonstrations.

The model is the project's own backbone class (e.g. the `micro` OpenVLA-OFT or OpenVLA preset); its objective is
the backbone's `bc_loss` (OFT: L1 on the normalised action chunk; OpenVLA: cross-entropy on the 7 action
tokens), through the same `prepare` / `embed` / decoder path as inference, so what is trained is what runs.
The action (and proprio) statistics come from the demonstrations' `dataset_statistics.json` and are saved with
the model. Lightning runs the loop: a checkpoint every epoch (and every 100 steps), resume from the newest after
an interruption (mid-epoch: the epoch's own order, the trained batches skipped), seeded and deterministic, a
progress bar, a validation split by episode, and loss curves (CSV + PNG).
The result is saved in the backbone's released layout (`from_pretrained` loads it key for key).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from ..backbone import Backbone
from ..config import ConfigError
from ..manifest import write_manifest
from ..types import Observation
from .curves import write_curves
from .demos import load_demos, statistics
from .lightning_run import fit_resuming, start_run

__all__ = ["TrainConfig", "DemoSamples", "BehaviourCloning", "train"]


@dataclass
class TrainConfig:
    """`vlacache train CONFIG`: what to train, on which demonstrations, how long, where to write."""

    objective: str = "bc"  # behaviour cloning; `objective: reuse` is a ReuseTrainConfig (train/reuse.py)
    name: str = "micro"
    backbone: dict = field(default_factory=lambda: {"name": "openvla-oft", "preset": "micro", "device": "cpu"})
    init_from: str | None = None  # start from this policy's weights (shipped name or folder), not the backbone's random init
    demos: str = "???"  # a folder written by `vlacache demos`
    extra_demos: list[str] = field(default_factory=list)  # more folders of the same suite, trained on with `demos`
    unnorm_key: str | None = None  # the dataset key of the saved statistics (default: the demos' only key)
    chunk: int = 8  # actions per sample (OFT: the chunk; OpenVLA learns the first)
    epochs: int = 20
    max_steps: int = -1  # optimizer steps in all (-1: epochs decide)
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    val_fraction: float = 0.1  # share of EPISODES held out for validation
    shift_pixels: int = 8  # random image shift (pad + crop), per sample and camera
    drop_noops: bool = False  # train on the steps that move (`noop_steps`), as OpenVLA's LIBERO data does
    seed: int = 0
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    save_dtype: str = "bfloat16"  # dtype of the exported weights
    output_dir: str = "runs/train/${name}"

    def check(self) -> "TrainConfig":
        problems = [
            (self.objective == "bc", "objective must be 'bc' (behaviour cloning) or 'reuse' (a learned selector)"),
            (self.chunk >= 1, "chunk must be >= 1"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.val_fraction < 1, "val_fraction must lie in [0, 1)"),
            (self.shift_pixels >= 0, "shift_pixels must be >= 0"),
            (self.save_dtype in ("float32", "bfloat16", "float16"), "save_dtype must be float32, bfloat16 or float16"),
        ]
        bad = [message for ok, message in problems if not ok]
        if bad:
            raise ConfigError(f"the train config: {'; '.join(bad)}")
        return self


CAMERAS = ("primary", "wrist")  # the cameras a demonstration may hold (ManiSkill's: primary only)


NOOP_TOLERANCE = 1e-4  # OpenVLA's: |arm delta| below it with the gripper command unchanged is a no-op


def noop_steps(actions: np.ndarray) -> np.ndarray:
    """The steps of one episode's actions ([T, 7]: arm delta, gripper) that command nothing: the arm delta's norm
    under NOOP_TOLERANCE and the gripper as at the step before (a motion planner's idle start and the pauses
    between its segments). The first step counts as unchanged gripper."""
    actions = np.asarray(actions)
    previous_gripper = np.r_[actions[:1, -1], actions[:-1, -1]]
    return (np.linalg.norm(actions[:, :-1], axis=1) < NOOP_TOLERANCE) & (actions[:, -1] == previous_gripper)


class DemoSamples(torch.utils.data.Dataset):
    """Every (episode, step) of some demonstration episodes as one training sample: its cameras, proprio,
    instruction and the next `chunk` actions (the last action repeated past the episode's end). `drop_noops`:
    the episodes as if their no-op steps (`noop_steps`) had never been recorded, neither as samples nor in a
    chunk. Without it a one-action policy learns that a planner's first frames (the same image, 7 steps of zero
    action) mean standing still, and stands still there for good."""

    def __init__(self, episodes: list[dict[str, Any]], chunk: int, shift_pixels: int = 0,
                 drop_noops: bool = False) -> None:
        self.episodes, self.chunk, self.shift = episodes, chunk, shift_pixels
        self.steps = [np.flatnonzero(~noop_steps(episode["actions"])) if drop_noops
                      else np.arange(len(episode["actions"])) for episode in episodes]
        self.index = [(e, j) for e, steps in enumerate(self.steps) for j in range(len(steps))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        e, j = self.index[i]
        episode, kept = self.episodes[e], self.steps[e]
        t, steps = kept[j], kept[np.minimum(np.arange(j, j + self.chunk), len(kept) - 1)]
        return {
            "images": {camera: self._shifted(episode[camera][t]) for camera in CAMERAS if camera in episode},
            "proprio": episode["proprio"][t],
            "actions": episode["actions"][steps],
            "instruction": episode["instruction"],
        }

    def _shifted(self, image: np.ndarray) -> np.ndarray:
        if not self.shift:
            return image
        s = self.shift
        padded = np.pad(image, ((s, s), (s, s), (0, 0)), mode="edge")
        dy, dx = random.randint(0, 2 * s), random.randint(0, 2 * s)
        return padded[dy : dy + image.shape[0], dx : dx + image.shape[1]]


def batches_by_prompt(samples: DemoSamples, prompt_length, batch_size: int, shuffle: bool, seed: int) -> list[list[int]]:
    """Batches whose instructions tokenize to one length (a backbone's batch shares one prompt length)."""
    groups: dict[int, list[int]] = {}
    lengths = {}
    for i, (e, _) in enumerate(samples.index):
        text = samples.episodes[e]["instruction"]
        if text not in lengths:
            lengths[text] = prompt_length(text)
        groups.setdefault(lengths[text], []).append(i)
    rng = random.Random(seed)
    out = []
    for members in groups.values():
        if shuffle:
            rng.shuffle(members)
        out += [members[k : k + batch_size] for k in range(0, len(members), batch_size)]
    if shuffle:
        rng.shuffle(out)
    return out


class PromptLengthBatches(torch.utils.data.Sampler):
    """A batch sampler over `batches_by_prompt`, reshuffled every epoch (deterministically from the seed + epoch).
    `position` (the training module's) names the epoch and how many of its batches are done, so a run resumed
    mid-epoch draws that epoch's order and skips what was trained; without it, the sampler counts epochs itself."""

    def __init__(self, samples: DemoSamples, prompt_length, batch_size: int, shuffle: bool, seed: int,
                 position=None) -> None:
        self.samples, self.prompt_length, self.batch_size, self.shuffle, self.seed = (
            samples, prompt_length, batch_size, shuffle, seed)
        self.position = position
        self.epoch = 0
        self._count = len(batches_by_prompt(samples, prompt_length, batch_size, False, seed))

    def __iter__(self):
        epoch, done = self.position() if self.position else (self.epoch, 0)
        self.epoch = epoch + 1
        batches = batches_by_prompt(self.samples, self.prompt_length, self.batch_size, self.shuffle, self.seed + epoch)
        return iter(batches[done:])

    def __len__(self) -> int:
        return self._count


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "observation": Observation(
            images={camera: np.stack([x["images"][camera] for x in items]) for camera in items[0]["images"]},
            instruction=[x["instruction"] for x in items],
            proprio=np.stack([x["proprio"] for x in items]),
        ),
        "actions": np.stack([x["actions"] for x in items]),
    }


class BehaviourCloning(L.LightningModule):
    """The backbone's trainable modules and its `bc_loss`; AdamW with linear warmup and cosine decay."""

    def __init__(self, backbone: Backbone, config: TrainConfig, steps_per_epoch: int) -> None:
        super().__init__()
        self.backbone, self.config, self.steps_per_epoch = backbone, config, steps_per_epoch
        self.parts = torch.nn.ModuleDict(backbone.trainable_modules())

    def on_fit_start(self) -> None:
        self.parts.train()  # backbones are built for inference (eval mode)

    def position(self) -> tuple[int, int]:
        """The training epoch and how many of its batches are done, from the optimizer steps taken (one per batch;
        restored from the checkpoint on resume)."""
        return divmod(self.trainer.global_step, self.steps_per_epoch)

    def training_step(self, batch, _):
        loss = self.backbone.bc_loss(batch["observation"], batch["actions"])
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch["actions"]))
        return loss

    def validation_step(self, batch, _):
        loss = self.backbone.bc_loss(batch["observation"], batch["actions"])
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, batch_size=len(batch["actions"]))

    def configure_optimizers(self):
        config = self.config
        optimizer = torch.optim.AdamW(self.parts.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        # counted here, not with trainer.estimated_stepping_batches: that loads the training data before a resumed
        # run's progress is restored, and the data's order then starts the epoch over (PromptLengthBatches)
        total = self.steps_per_epoch * config.epochs
        total = max(1, min(total, config.max_steps) if config.max_steps != -1 else total)

        def factor(step: int) -> float:
            if step < config.warmup_steps:
                return (step + 1) / config.warmup_steps
            progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def initial_backbone_spec(config: TrainConfig) -> dict:
    """The backbone to train: `config.backbone` itself, or with `init_from` the same backbone kind and placement
    loaded from that policy's checkpoint (its own widths; the preset is dropped), trained in float32."""
    if config.init_from is None:
        return config.backbone
    spec = {k: v for k, v in config.backbone.items() if k not in ("preset", "checkpoint", "seed")}
    return {**spec, "checkpoint": config.init_from, "dtype": "float32"}


def split_episodes(episodes: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out whole episodes (never steps of a training episode) for validation, spread over tasks."""
    order = list(range(len(episodes)))
    random.Random(seed).shuffle(order)
    n_val = int(round(val_fraction * len(episodes)))
    if val_fraction > 0 and len(episodes) > 1:
        n_val = max(1, n_val)
    val = set(order[:n_val])
    return [e for i, e in enumerate(episodes) if i not in val], [e for i, e in enumerate(episodes) if i in val]


def demonstrations(config: TrainConfig) -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
    """Every episode of `demos` and `extra_demos`, the dataset key, and its statistics (the folder's own for one
    folder; recomputed over all the episodes for several)."""
    sets = [load_demos(folder) for folder in [config.demos, *config.extra_demos]]
    for demos in sets:
        if demos.statistics is None:
            raise ConfigError(f"{demos.folder} has no dataset_statistics.json: its recording has not finished; run the "
                              "same `vlacache demos` command again to complete it (it resumes)")
        if not len(demos):
            raise ConfigError(f"{demos.folder} holds no successful demonstration; record some with `vlacache demos`")
    stats_all = sets[0].statistics
    key = config.unnorm_key or (next(iter(stats_all)) if len(stats_all) == 1 else None)
    if key not in stats_all:
        raise ConfigError(f"unnorm_key {config.unnorm_key!r}: the demos' statistics have {sorted(stats_all)}; set unnorm_key")
    other = [str(d.folder) for d in sets[1:] if key not in d.statistics]
    if other:
        raise ConfigError(f"extra_demos {other} hold no {key!r} demonstrations (the suite of {config.demos}); "
                          "train on folders of one suite")
    episodes = [episode for demos in sets for episode in demos]
    return episodes, key, stats_all[key] if len(sets) == 1 else statistics(episodes)


def train(config: TrainConfig, progress: bool = True, restart: bool = False) -> Path:
    """Train (or resume) and export; returns the folder of the saved policy. `restart`: move a previous run of
    the output folder aside instead of resuming it."""
    from ..experiment import build_backbone

    config.check()
    for folder in [config.demos, *config.extra_demos]:
        load_demos(folder)  # an index to read (the arrays load later): a wrong folder fails before anything is written
    out = start_run(config, restart)
    backbone = build_backbone(initial_backbone_spec(config))
    chunk = getattr(backbone, "action_chunk", 1)
    if chunk > 1 and config.chunk != chunk:
        raise ConfigError(f"the train config: chunk={config.chunk}, but the backbone predicts chunks of {chunk} "
                          f"actions; set chunk={chunk} (or the backbone's chunk to {config.chunk})")
    episodes, key, stats = demonstrations(config)
    backbone.config.norm_stats = {key: stats}
    backbone.unnorm_key = key
    train_eps, val_eps = split_episodes(episodes, config.val_fraction, config.seed)
    if not train_eps:
        raise ConfigError(f"the train config: val_fraction={config.val_fraction} holds out all {len(episodes)} episodes, "
                          "none is left to train on; lower val_fraction")
    prompt_length = lambda text: len(backbone.prompt_ids(text))  # noqa: E731
    train_set = DemoSamples(train_eps, config.chunk, config.shift_pixels, config.drop_noops)
    train_batches = PromptLengthBatches(train_set, prompt_length, config.batch_size, True, config.seed)
    loaders = {"train_dataloaders": torch.utils.data.DataLoader(train_set, batch_sampler=train_batches, collate_fn=collate)}
    if val_eps:
        val_set = DemoSamples(val_eps, config.chunk, 0, config.drop_noops)
        loaders["val_dataloaders"] = torch.utils.data.DataLoader(
            val_set, batch_sampler=PromptLengthBatches(val_set, prompt_length, config.batch_size, False, config.seed),
            collate_fn=collate)
    if len(loaders["train_dataloaders"]) == 0:
        raise ConfigError(f"the train config: the {len(train_eps)} training episodes give no batch; lower batch_size")
    module = BehaviourCloning(backbone, config, len(train_batches))
    train_batches.position = module.position
    fit_resuming(module, out, config.epochs, progress, loaders, resumable_mid_epoch=True,
                 accelerator="cpu" if backbone.device.type == "cpu" else "auto", max_steps=config.max_steps,
                 deterministic="warn")
    write_curves(out, {"train_loss_epoch": "train_loss", "val_loss": "val_loss"}, ylabel="loss")
    policy_dir = out / "policy"
    export(backbone, policy_dir, config.save_dtype)
    (out / "train_config.json").write_text(json.dumps(config.__dict__, indent=1, default=str))
    return policy_dir


def export(backbone: Backbone, folder: Path, dtype: str) -> None:
    """Save in the released layout, in `dtype` (the micro-policies ship in bf16)."""
    target = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    modules = backbone.trainable_modules()
    previous = {name: next(m.parameters()).dtype for name, m in modules.items()}
    for module in modules.values():
        module.to(target)
    try:
        backbone.save_pretrained(folder)
        write_manifest(folder)
    finally:
        for name, module in modules.items():
            module.to(previous[name])
