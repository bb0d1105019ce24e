"""`vlacache train` with `objective: reuse`: train the learned selector's classifier (strategies/learned.py).

The classifier decides, per visual token and query, whether to reuse last query's K/V. It is trained by policy
gradient (REINFORCE) through the real engine: on recorded demonstration episodes, replayed at the policy's query
cadence, each window of queries starts with a full step and then draws every static token's decision (the
selector's `tau`) from the classifier's probability; the query's reward is its reuse ratio minus `penalty` times
how far its actions exceed `tolerance` away from the no-cache actions of the same frame (|a_cached - a_nocache|
in units of half the dataset's q01..q99 range, averaged over the chunk, of the worst action dimension: 0.05 =
2.5% of the range), and a decision is credited with the discounted rewards of its query and the later ones of
its window (reused K/V stay in the cache). Validation draws the same way on held-out episodes (from its own
seeded generator); after training, the threshold is calibrated there (of `thresholds`, the one that reuses most
while the mean deviation stays within the tolerance) and saved as the checkpoint's default. Lightning runs the
loop as for behaviour cloning: a checkpoint every epoch, resume, seeds, a progress bar, curves (CSV + PNG). The
export is a folder a policy YAML names (`selector: {name: learned, checkpoint: ...}`): the classifier's weights
(a few hundred floats) and `selector.json`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from ..config import ConfigError
from ..types import Observation
from .bc import split_episodes
from .demos import load_demos

__all__ = ["ReuseTrainConfig", "ReuseTraining", "train_reuse"]


@dataclass
class ReuseTrainConfig:
    """`vlacache train CONFIG` with objective: reuse: the backbone, the policy around the learned selector, the
    recorded episodes, the objective's tolerance, how long, where to write."""

    objective: str = "reuse"
    name: str = "learned_reuse"
    backbone: Any = "micro_oft_libero_spatial"
    policy: Any = "vla_cache_learned"  # its selector must be 'learned'; the rest (scheduler, gate, ...) is kept
    demos: str = "???"  # a folder written by `vlacache demos`
    max_episodes: int | None = None  # N stored episodes evenly spread over the folder's (task, seed) order; null: all
    query_every: int = 8  # recorded steps between two queries (the OFT micro-policy executes chunks of 8)
    window: int = 6  # queries per training sample; the first is a full step
    tolerance: float = 0.05
    penalty: float = 4.0
    discount: float = 0.5
    hidden: int = 16
    thresholds: list[float] = field(  # calibrated on validation
        default_factory=lambda: [0.5, 0.3, 0.2, 0.1, 0.09, 0.08, 0.07, 0.06, 0.05, 0.04, 0.03])
    attention_layers: list[Any] | None = None  # the layers whose text-to-vision attention is a feature; null: all
    epochs: int = 4
    lr: float = 3.0e-3
    val_fraction: float = 0.1
    seed: int = 0
    threads: int | None = None
    output_dir: str = "runs/train/${name}"

    def check(self) -> "ReuseTrainConfig":
        problems = [
            (self.objective == "reuse", "objective must be 'reuse' here"),
            (self.query_every >= 1, "query_every must be >= 1"),
            (self.window >= 2, "window must be >= 2 (a full step, then steps that may reuse)"),
            (self.tolerance > 0, "tolerance must be > 0"),
            (self.penalty >= 0, "penalty must be >= 0"),
            (0 <= self.discount <= 1, "discount must lie in [0, 1]"),
            (self.hidden >= 1, "hidden must be >= 1"),
            (bool(self.thresholds) and all(0 < t < 1 for t in self.thresholds), "thresholds must be values in (0, 1)"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.val_fraction < 1, "val_fraction must lie in [0, 1)"),
        ]
        bad = [message for ok, message in problems if not ok]
        if bad:
            raise ConfigError(f"the reuse train config: {'; '.join(bad)}")
        return self


@dataclass
class QueryEpisode:
    """One demonstration replayed at the policy's query cadence: its query observations and no-cache actions."""

    observations: list[Observation]
    reference: list[np.ndarray] = field(default_factory=list)


def query_episodes(demos: list[dict[str, Any]], query_every: int) -> list[QueryEpisode]:
    out = []
    for demo in demos:
        steps = range(0, len(demo["actions"]), query_every)
        cameras = [k for k in demo if isinstance(demo[k], np.ndarray) and demo[k].ndim == 4]
        out.append(QueryEpisode([Observation(images={c: demo[c][t] for c in cameras}, instruction=demo["instruction"],
                                             proprio=demo["proprio"][t] if "proprio" in demo else None) for t in steps]))
    return out


def held_out_split(config: ReuseTrainConfig, demos) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The training and validation demonstrations: `max_episodes` spread evenly over the folder's (task, seed)
    order, split by episode."""
    count = len(demos) if config.max_episodes is None else min(config.max_episodes, len(demos))
    picked = sorted(set(np.linspace(0, len(demos) - 1, count).round().astype(int).tolist()))
    return split_episodes([demos[i] for i in picked], config.val_fraction, config.seed)


def action_deviation(actions: np.ndarray, reference: np.ndarray, scale: np.ndarray) -> float:
    """|actions - reference| in units of `scale` (half the q01..q99 range), mean over the chunk, worst dimension."""
    return float((np.abs(actions - reference) / scale).reshape(-1, scale.size).mean(0).max())


def step_summary(steps: list[dict[str, float]], tolerance: float) -> dict[str, float]:
    """Mean reuse, deviation and reward of some queries, and the share within the tolerance."""
    out = {k: float(np.mean([s[k] for s in steps])) for k in ("reuse", "deviation", "reward")}
    out["within_tolerance"] = float(np.mean([s["deviation"] <= tolerance for s in steps]))
    return out


def action_scale(backbone) -> np.ndarray:
    """Half the q01..q99 range of each action dimension (1 where it is degenerate)."""
    stats = backbone.config.norm_stats[backbone.unnorm_key]["action"]
    half = (np.asarray(stats["q99"], dtype=np.float64) - np.asarray(stats["q01"], dtype=np.float64)) / 2
    return np.where(half > 1e-8, half, 1.0)


class ReuseTraining(L.LightningModule):
    """The classifier's REINFORCE objective through the real engine (module docstring)."""

    def __init__(self, model: torch.nn.Module, runtime: dict[str, Any], config: ReuseTrainConfig) -> None:
        super().__init__()
        self.model, self.config = model, config
        self.runtime = runtime  # the attached CachedVLA, its learned selector, episodes, action scale: not parameters
        self.baseline: float | None = None
        self.drawn: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.generator: torch.Generator | None = None  # validation draws from its own, so training's are unchanged

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["reward_baseline"] = self.baseline

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.baseline = checkpoint.get("reward_baseline")

    def _draw(self, features: dict[str, torch.Tensor], probability: dict[str, torch.Tensor],
              static: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The training selector's candidates: a draw per static patch (the others are never candidates)."""
        masks = {camera: (torch.bernoulli(p, generator=self.generator) > 0.5) & static[camera]
                 for camera, p in probability.items()}
        self.drawn += [(features[c][static[c]].clone(), masks[c][static[c]].clone()) for c in masks]
        return masks

    def rollout(self, episode: QueryEpisode, start: int, sample: bool) -> tuple[list[dict[str, float]], list[list]]:
        """Replay one window; per query its reward terms and the decisions drawn for it."""
        vla, selector, scale = self.runtime["vla"], self.runtime["selector"], self.runtime["scale"]
        selector.sampler = self._draw if sample else None
        vla.reset()
        steps, decisions = [], []
        for q in range(start, min(start + self.config.window, len(episode.observations))):
            self.drawn = []
            result = vla.predict(episode.observations[q])
            deviation = action_deviation(result.actions, episode.reference[q], scale)
            excess = max(0.0, deviation - self.config.tolerance) / self.config.tolerance
            steps.append({"reuse": result.stats.reuse_ratio, "deviation": deviation,
                          "reward": result.stats.reuse_ratio - self.config.penalty * excess})
            decisions.append(self.drawn)
        selector.sampler = None
        return steps, decisions

    def training_step(self, window, _):
        e, start = window
        steps, decisions = self.rollout(self.runtime["train"][e], start, sample=True)
        returns, running = [], 0.0
        for step in reversed(steps):
            running = step["reward"] + self.config.discount * running
            returns.append(running)
        returns.reverse()
        mean_return = float(np.mean(returns))
        baseline = mean_return if self.baseline is None else self.baseline
        self.baseline = 0.9 * baseline + 0.1 * mean_return
        loss = torch.zeros(())
        for drawn, ret in zip(decisions, returns):
            for features, mask in drawn:
                features, mask = features.clone(), mask.clone()  # drawn in inference mode: normal tensors for autograd
                if not len(mask):
                    continue
                logits = self.model(features)
                log_prob = torch.where(mask, torch.nn.functional.logsigmoid(logits), torch.nn.functional.logsigmoid(-logits))
                loss = loss - (ret - baseline) * log_prob.mean()
        loss = loss / len(steps)
        self._log("train", steps)
        self.log("train_loss", loss.detach(), on_step=False, on_epoch=True, batch_size=1)
        return loss if loss.requires_grad else None

    def on_validation_epoch_start(self) -> None:
        self.generator = torch.Generator().manual_seed(self.config.seed)

    def on_validation_epoch_end(self) -> None:
        self.generator = None

    def validation_step(self, window, _):
        e, start = window
        steps, _ = self.rollout(self.runtime["val"][e], start, sample=True)
        self._log("val", steps)
        self.log("val_loss", -float(np.mean([s["reward"] for s in steps[1:]])), on_epoch=True, batch_size=1)

    def _log(self, stage: str, steps: list[dict[str, float]]) -> None:
        summary = step_summary(steps[1:], self.config.tolerance)  # the window's first query is a full step
        for key in ("reuse", "deviation", "within_tolerance"):
            self.log(f"{stage}_{key}", summary[key], on_epoch=True, on_step=False,
                     prog_bar=stage == "val" and key != "within_tolerance", batch_size=1)

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.config.lr)


class Windows(torch.utils.data.Dataset):
    """(episode, first query) of every window of some query episodes, each window at least 2 queries long."""

    def __init__(self, episodes: list[QueryEpisode], window: int) -> None:
        self.items = [(e, s) for e, ep in enumerate(episodes) for s in range(0, len(ep.observations) - 1, window)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return self.items[i]


def train_reuse(config: ReuseTrainConfig, progress: bool = True, restart: bool = False) -> Path:
    """Train (or resume) the learned selector and export it; returns the exported folder."""
    from safetensors.torch import save_file

    from vlacache.strategies.learned import FEATURES, SELECTOR_FILE, WEIGHTS_FILE, LearnedSelector, ReuseClassifier

    from ..experiment import build_backbone, resolve_policy_config
    from ..policy import CachePolicy
    from ..runtime import attach
    from .curves import write_curves
    from .lightning_run import fit_resuming, start_run

    config.check()
    load_demos(config.demos)  # a wrong folder fails before anything is written
    out = start_run(config, restart)
    policy_config = resolve_policy_config(config.policy)
    if policy_config.selector.get("name") != "learned":
        raise ConfigError(f"the reuse train config: policy '{policy_config.label}' has selector "
                          f"'{policy_config.selector.get('name')}'; objective: reuse trains a policy whose selector is "
                          "'learned' (e.g. policy: vla_cache_learned)")
    demos = load_demos(config.demos)
    if len(demos) == 0:
        raise ConfigError(f"{config.demos} holds no successful demonstration; record some with `vlacache demos`")
    train_eps, val_eps = held_out_split(config, demos)
    train_q, val_q = query_episodes(train_eps, config.query_every), query_episodes(val_eps, config.query_every)
    if not Windows(train_q, config.window).items:
        raise ConfigError(f"the training demonstrations give no query after a first one at query_every="
                          f"{config.query_every} (episodes of {min(len(e['actions']) for e in train_eps)}+ steps); "
                          "lower query_every")
    backbone = build_backbone(config.backbone)
    with attach(backbone, "no_cache") as plain:
        for episode in train_q + val_q:
            plain.reset()
            episode.reference = [plain.predict(o).actions for o in episode.observations]
    cameras = list(backbone.prepare(train_q[0].observations[0]).layout.vision)
    model = ReuseClassifier(cameras, config.hidden)
    meta = {"features": list(FEATURES), "cameras": cameras, "hidden": config.hidden,
            "attention_layers": config.attention_layers}
    settings = {k: v for k, v in policy_config.selector.items() if k not in ("name", "checkpoint")}
    selector = LearnedSelector(LearnedSelector.Config(checkpoint=str(out / "selector"), **settings), model=model, meta=meta)
    policy = CachePolicy.from_config(dataclasses.replace(policy_config, selector={"name": "none"}))
    policy.selector = selector
    vla = attach(backbone, policy)
    runtime = {"vla": vla, "selector": selector, "scale": action_scale(backbone), "train": train_q, "val": val_q}
    module = ReuseTraining(model, runtime, config)
    loaders = {"train_dataloaders": torch.utils.data.DataLoader(
        Windows(train_q, config.window), batch_size=None, shuffle=True,
        generator=torch.Generator().manual_seed(config.seed))}
    if val_q:
        loaders["val_dataloaders"] = torch.utils.data.DataLoader(Windows(val_q, config.window), batch_size=None)
    try:
        trainer = fit_resuming(module, out, config.epochs, progress, loaders)
        calibration = calibrate(module, val_q or train_q, config.thresholds)
    finally:
        vla.detach()
    write_curves(out, CURVES, ylabel="share / deviation", name="curves")
    meta["threshold"] = calibrated_threshold(calibration, config.tolerance)
    folder = out / "selector"
    folder.mkdir(exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    validation = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
    meta["training"] = {**{k: v for k, v in dataclasses.asdict(config).items() if k != "output_dir"},
                        "train_episodes": len(train_q), "val_episodes": len(val_q), "validation": validation,
                        "calibration": calibration}
    (folder / SELECTOR_FILE).write_text(json.dumps(meta, indent=1, default=str))
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1, default=str))
    return folder


def calibrate(module: ReuseTraining, episodes: list[QueryEpisode], thresholds: list[float]) -> list[dict[str, float]]:
    """The deterministic selector at each threshold on these (validation) episodes: mean reuse, deviation,
    share of queries within tolerance and reward, over the queries after each window's full step."""
    selector, rows = module.runtime["selector"], []
    for threshold in thresholds:
        selector.config.threshold = threshold
        steps = [s for e, start in Windows(episodes, module.config.window).items
                 for s in module.rollout(episodes[e], start, sample=False)[0][1:]]
        rows.append({"threshold": threshold, **step_summary(steps, module.config.tolerance)})
    return rows


def calibrated_threshold(calibration: list[dict[str, float]], tolerance: float) -> float:
    """The export's default threshold: the one that reuses most while the mean deviation stays within the
    tolerance (the highest threshold when none does)."""
    within = [row for row in calibration if row["deviation"] <= tolerance]
    if not within:
        return max(row["threshold"] for row in calibration)
    return max(within, key=lambda row: (row["reuse"], row["threshold"]))["threshold"]


CURVES = {"train_reuse": "train_reuse", "train_deviation": "train_deviation", "val_reuse": "val_reuse",
          "val_deviation": "val_deviation", "val_within_tolerance": "val_within_tolerance"}
