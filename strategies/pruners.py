"""Token pruners: drop visual tokens from a decoder layer on, decided inside the forward (`PruneRule`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from vlacache.config import ConfigError
from vlacache.registry import register_strategy
from vlacache.strategy import PlanContext, TokenPruner, resolve_layers
from vlacache.types import PruneRule

QUERIES = ("last", "text")


@register_strategy("pruner", "none")
class NoPruner(TokenPruner):
    """Drops nothing."""

    prunes = False

    def rules(self, ctx: PlanContext) -> list[PruneRule]:
        return []


@dataclass(frozen=True)
class DropLowest:
    """FastV's choice: the floor(ratio * V) eligible visual tokens with the lowest mean attention over the query
    rows (fewer when a row has fewer eligible: every row drops the batch's smallest such count)."""

    ratio: float

    def __call__(self, attention: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
        return lowest(attention.float().mean(dim=1), eligible, math.floor(self.ratio * attention.shape[-1] + 1e-9))


def lowest(scores: torch.Tensor, eligible: torch.Tensor, wanted: int) -> torch.Tensor:
    """Visual indices [B, k] of the `wanted` eligible tokens with the lowest scores [B, V] (k: at most what every
    row has eligible)."""
    count = min(wanted, int(eligible.sum(dim=1).min()))
    return scores.masked_fill(~eligible, float("inf")).topk(count, dim=1, largest=False).indices


@register_strategy("pruner", "fastv")
class FastVPruner(TokenPruner):
    """FastV ("an image is worth 1/2 tokens after layer 2"): at decoder layer `layer` (K), rank the visual tokens by
    the attention they receive in layer K-1 from the last prompt position (`query: last`; `text`: the
    instruction's tokens), averaged over heads, and drop the lowest `ratio` (R) for every later layer. Single
    frame: it needs no previous step, so it prunes the first step too. `layer` takes an index or 'i/n' (layer i
    of an n-layer decoder, scaled to this one's depth)."""

    @dataclass
    class Config:
        layer: Any = 2
        ratio: float = 0.5
        query: str = "last"

    def check(self, num_layers: int) -> None:
        (layer,) = resolve_layers([self.config.layer], num_layers, "pruner 'fastv'")
        if layer < 1:
            raise ConfigError(f"pruner 'fastv': layer must be >= 1 (it ranks tokens by the layer before), got {self.config.layer!r}")
        if not 0.0 <= self.config.ratio <= 1.0:
            raise ConfigError(f"pruner 'fastv': ratio must be in [0, 1], got {self.config.ratio}")
        if self.config.query not in QUERIES:
            raise ConfigError(f"pruner 'fastv': query must be one of {QUERIES}, got {self.config.query!r}")

    def rules(self, ctx: PlanContext) -> list[PruneRule]:
        (layer,) = resolve_layers([self.config.layer], ctx.num_layers, "pruner 'fastv'")
        return [PruneRule(layer, DropLowest(self.config.ratio), self.config.query)]


@dataclass(frozen=True)
class RatedByText:
    """SparseVLM's choice: the instruction tokens whose mean attention to the image is at least the average over
    the instruction act as raters; visual tokens are ranked by the raters' mean attention and the floor(ratio * V)
    lowest eligible ones are dropped."""

    ratio: float

    def __call__(self, attention: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
        attention = attention.float()
        to_image = attention.mean(dim=-1)  # [B, n]: each text token's mean attention to the visual tokens
        raters = (to_image >= to_image.mean(dim=1, keepdim=True)).float()
        scores = (attention * raters[..., None]).sum(dim=1) / raters.sum(dim=1, keepdim=True)
        return lowest(scores, eligible, math.floor(self.ratio * attention.shape[-1] + 1e-9))


@register_strategy("pruner", "sparsevlm")
class SparseVLMPruner(TokenPruner):
    """SparseVLM, text-guided and training-free: at each of `layers`, instruction tokens that attend to the image
    more than average rate the visual tokens (their mean attention in the layer before), and the lowest-rated
    `ratios[i]` of all visual tokens are dropped from that layer on (progressive: 2/32, 6/32, 15/32 of the depth
    by default). Not implemented: SparseVLM's recycling of the dropped tokens into a few aggregate tokens, and its
    rank-based count per layer (the counts here are the configured ratios)."""

    @dataclass
    class Config:
        layers: list = field(default_factory=lambda: ["2/32", "6/32", "15/32"])
        ratios: list = field(default_factory=lambda: [0.25, 0.25, 0.17])

    def _layers(self, num_layers: int) -> tuple[int, ...]:
        layers = resolve_layers(self.config.layers, num_layers, "pruner 'sparsevlm'")
        if len(layers) != len(self.config.layers) or layers[0] < 1:
            raise ConfigError(f"pruner 'sparsevlm': layers {self.config.layers} give {list(layers)} on this "
                              f"{num_layers}-layer decoder; they must be distinct and >= 1 (give absolute layers "
                              "for a shallow decoder, e.g. layers: [1, 2])")
        return layers

    def check(self, num_layers: int) -> None:
        self._layers(num_layers)
        if len(self.config.ratios) != len(self.config.layers) or any(not 0.0 <= r <= 1.0 for r in self.config.ratios) \
                or sum(self.config.ratios) > 1.0:
            raise ConfigError(f"pruner 'sparsevlm': ratios {self.config.ratios} must give one fraction in [0, 1] per "
                              "layer, summing to at most 1")

    def rules(self, ctx: PlanContext) -> list[PruneRule]:
        return [PruneRule(layer, RatedByText(ratio), "text")
                for layer, ratio in zip(self._layers(ctx.num_layers), self.config.ratios)]
