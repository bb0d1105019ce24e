"""A learned token selector: a small per-token reuse classifier whose weights are trained (`vlacache train` with
`objective: reuse`, vlacache/train/reuse.py) to keep actions within a tolerance of no cache while reusing as
much as possible.

Per visual token it reads what the hand-set selectors and filters read, as features:
  0  pixel change against the previous query frame: -log10(1 - cosine + 1e-6) / 6 (1: identical patch)
  1  the same against the token's anchor, the frame its cached K/V were computed from (drift)
  2  the steps since its K/V were computed, min(age, 16) / 16
  3  last step's attention to it from the text rows, log of its share relative to its camera's mean
  4+ its camera, one-hot over the cameras the classifier was trained with
A checkpoint is a folder (`model.safetensors` with the classifier's weights, `selector.json` with the feature
layout, cameras, attention layers and training summary), loaded by the name of one shipped in the package
(vlacache/data/strategies/<name>/) or by path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from vlacache.config import ConfigError
from vlacache.patches import patch_cosine
from vlacache.registry import register_strategy
from vlacache.strategy import Candidates, PlanContext, resolve_layers

from .selectors import PixelCosineSelector

FEATURES = ("pixel_change", "anchor_change", "age", "attention")
SELECTOR_FILE, WEIGHTS_FILE = "selector.json", "model.safetensors"


def shipped_strategies_dir() -> Path:
    """Where trained strategy checkpoints shipped in the package live (vlacache/data/strategies/<name>/)."""
    return Path(str(resources.files("vlacache") / "data" / "strategies"))


class ReuseClassifier(torch.nn.Module):
    """Per-token reuse logit from the token's features [..., F]: a one-hidden-layer MLP."""

    def __init__(self, cameras: list[str], hidden: int = 16) -> None:
        super().__init__()
        self.cameras, self.hidden = list(cameras), hidden
        self.net = torch.nn.Sequential(torch.nn.Linear(len(FEATURES) + len(self.cameras), hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


def _similarity_feature(similarity: torch.Tensor) -> torch.Tensor:
    return -torch.log10((1.0 - similarity).clamp_min(0.0) + 1e-6) / 6.0


def token_features(ctx: PlanContext, cameras: list[str], attention_layers: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Per camera of the step, the features [B, P, F] of its patches (see the module docstring)."""
    attention = None
    if ctx.stats is not None and attention_layers and all(layer in ctx.stats.to_keys for layer in attention_layers):
        attention = torch.stack([ctx.stats.to_keys[layer].float() for layer in attention_layers]).mean(0).cpu()
    out = {}
    for camera, span in ctx.layout.vision.items():
        if camera not in cameras:
            raise ConfigError(f"selector 'learned': camera '{camera}' of this backbone was not among the cameras the "
                              f"classifier was trained with ({cameras}); train one for this backbone "
                              "(`vlacache train` with objective: reuse)")
        previous = patch_cosine(ctx.current[camera], ctx.previous[camera], span.rows, span.cols).float().cpu()
        anchored = previous if ctx.anchors is None else \
            patch_cosine(ctx.current[camera], ctx.anchors[camera], span.rows, span.cols).float().cpu()
        age = torch.zeros_like(previous) if ctx.ages is None else ctx.ages[camera].float().cpu().clamp(max=16) / 16
        if attention is None:
            share = torch.zeros_like(previous)
        else:
            part = attention[:, span.start : span.stop]
            share = torch.log((part / part.mean(1, keepdim=True).clamp_min(1e-12)).clamp_min(1e-3)) / 4
        one_hot = torch.zeros(*previous.shape, len(cameras))
        one_hot[..., cameras.index(camera)] = 1.0
        out[camera] = torch.cat([torch.stack([_similarity_feature(previous), _similarity_feature(anchored), age, share],
                                             -1), one_hot], -1)
    return out


def classifier_folder(checkpoint: str | Path) -> Path:
    """A classifier folder as given, or the one shipped under that name when no such path exists here."""
    folder = Path(checkpoint).expanduser()
    if not folder.exists() and len(folder.parts) == 1:
        folder = shipped_strategies_dir() / folder.name
    return folder


def _static(features: torch.Tensor, tau: float) -> torch.Tensor:
    """The patches whose similarity to the previous query frame (feature 0, inverted) is >= tau."""
    return features[..., 0] >= float(_similarity_feature(torch.tensor(tau)))


def load_classifier(checkpoint: str | Path) -> tuple[ReuseClassifier, dict[str, Any]]:
    """A trained classifier and its selector.json, from a folder or the name of a shipped one."""
    from safetensors.torch import load_file

    folder = classifier_folder(checkpoint)
    meta_file = folder / SELECTOR_FILE
    if not meta_file.is_file():
        shipped = sorted(p.name for p in shipped_strategies_dir().glob("*") if (p / SELECTOR_FILE).is_file())
        raise ConfigError(f"selector 'learned': no trained classifier at '{checkpoint}' (no {SELECTOR_FILE} there); "
                          f"give a folder written by `vlacache train` (objective: reuse) or a shipped one: {shipped}")
    meta = json.loads(meta_file.read_text())
    if list(meta.get("features", [])) != list(FEATURES):
        raise ConfigError(f"selector 'learned': {folder} was trained on features {meta.get('features')}, this version "
                          f"computes {list(FEATURES)}; retrain it")
    model = ReuseClassifier(meta["cameras"], meta["hidden"])
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model.eval(), meta


@register_strategy("selector", "learned")
class LearnedSelector(PixelCosineSelector):
    """A per-token reuse classifier trained on recorded episodes (module docstring): a patch is a candidate when
    it is static (pixel cosine to the previous query frame >= tau, as the paper's selector) and its predicted
    reuse probability is >= threshold (null: the checkpoint's, calibrated on its validation episodes); score:
    that probability. checkpoint: the name of a shipped classifier (vlacache/data/strategies/)
    or a folder written by `vlacache train` with objective: reuse."""

    @dataclass
    class Config:
        checkpoint: str = "???"
        threshold: float | None = None  # null: the threshold calibrated on the training's validation episodes
        tau: float = 0.996  # only patches this similar to the previous query frame are judged (the paper's test)
        top_k: int | None = None
        cameras: list[str] | None = None

    checkpoint_folder = staticmethod(classifier_folder)  # what a run's fingerprint hashes (eval/fingerprint.py)
    example = {"checkpoint": "micro_oft_libero_spatial"}

    def __init__(self, config=None, model: ReuseClassifier | None = None, meta: dict | None = None) -> None:
        super().__init__(config)
        if model is None:
            model, meta = load_classifier(self.config.checkpoint)
        self.model, self.meta = model, dict(meta or {})
        if self.config.threshold is None:
            self.config.threshold = float(self.meta.get("threshold", 0.5))
        if not 0.0 < self.config.threshold < 1.0:
            raise ConfigError(f"selector 'learned': threshold must lie in (0, 1), got {self.config.threshold}")
        self.sampler = None  # set while training: draws the candidates instead of thresholding (train/reuse.py)

    def required_layers(self, num_layers: int) -> tuple[int, ...]:
        layers = self.meta.get("attention_layers")
        return tuple(range(num_layers)) if layers is None else resolve_layers(layers, num_layers, "selector 'learned'")

    def check(self, num_layers: int) -> None:
        self.required_layers(num_layers)

    def select(self, ctx: PlanContext) -> dict[str, Candidates]:
        self._check_cameras(ctx)
        features = token_features(ctx, self.model.cameras, self.required_layers(ctx.num_layers))
        static = {camera: _static(f, self.config.tau) for camera, f in features.items()}
        with torch.no_grad():
            probability = {camera: torch.sigmoid(self.model(f)) for camera, f in features.items()}
        if self.sampler is not None:
            masks = self.sampler(features, probability, static)
        else:
            masks = {camera: (p >= self.config.threshold) & static[camera] for camera, p in probability.items()}
        device = next(iter(ctx.current.values())).device
        return {camera: self._candidates(camera, masks[camera].to(device), probability[camera].to(device))
                for camera in features}
