"""Token pruners: drop visual tokens from a decoder layer on, decided inside the forward (`PruneRule`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from vlacache.config import ConfigError
from vlacache.registry import register_strategy
from vlacache.strategy import PlanContext, TokenPruner, resolve_count, resolve_layers
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


def prune_layers(specs: list, num_layers: int, name: str) -> tuple[int, ...]:
    """A multi-layer pruner's layers on this decoder: distinct and >= 1 (each rule ranks by the layer before)."""
    layers = resolve_layers(specs, num_layers, f"pruner '{name}'")
    if len(layers) != len(specs) or layers[0] < 1:
        raise ConfigError(f"pruner '{name}': layers {specs} give {list(layers)} on this {num_layers}-layer decoder; "
                          "they must be distinct and >= 1 (give absolute layers for a shallow decoder, e.g. "
                          "layers: [1, 2])")
    return layers


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
            raise ConfigError(f"pruner 'fastv': layer must be >= 1 (it ranks tokens by the layer before), "
                              f"got {self.config.layer!r}")
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


@register_strategy("pruner", "text-raters")
class TextRatersPruner(TokenPruner):
    """The project's first, simplified reading of SparseVLM (kept so result folders made with it re-run): at each
    of `layers`, instruction tokens that attend to the image more than average (in the layer before) rate the
    visual tokens, and the lowest-rated `ratios[i]` of all visual tokens are dropped from that layer on. The
    official method is `sparsevlm`."""

    @dataclass
    class Config:
        layers: list = field(default_factory=lambda: ["2/32", "6/32", "15/32"])
        ratios: list = field(default_factory=lambda: [0.25, 0.25, 0.17])

    def _layers(self, num_layers: int) -> tuple[int, ...]:
        return prune_layers(self.config.layers, num_layers, "text-raters")

    def check(self, num_layers: int) -> None:
        self._layers(num_layers)
        if len(self.config.ratios) != len(self.config.layers) or any(not 0.0 <= r <= 1.0 for r in self.config.ratios) \
                or sum(self.config.ratios) > 1.0:
            raise ConfigError(f"pruner 'text-raters': ratios {self.config.ratios} must give one fraction in [0, 1] per "
                              "layer, summing to at most 1")

    def rules(self, ctx: PlanContext) -> list[PruneRule]:
        return [PruneRule(layer, RatedByText(ratio), "text")
                for layer, ratio in zip(self._layers(ctx.num_layers), self.config.ratios)]


def embedding_raters(query_embeds: torch.Tensor, visual_embeds: torch.Tensor) -> torch.Tensor:
    """SparseVLM's raters [B, n] bool, chosen from the decoder's input embeddings: each visual token's dot products
    with the n post-image tokens, softmax over those tokens, averaged over the visual tokens; the tokens above
    that average's mean rate."""
    relevance = torch.softmax(visual_embeds @ query_embeds.transpose(1, 2), dim=2).mean(dim=1)  # [B, n]
    return relevance > relevance.mean(dim=1, keepdim=True)


@dataclass(frozen=True)
class KeepRatedByHeads:
    """SparseVLM's stage: the `heads` heads whose raters give the image the most attention (None: every head, the
    plain mean of v1.5), their mean, the raters' mean attention per visual token; the `keep` best of the remaining
    visual tokens stay (at most all but one), the other eligible ones are dropped, best-rated first (the order in
    which a recycling stage takes them)."""

    keep: Any
    heads: Any

    def __call__(self, attention: torch.Tensor, eligible: torch.Tensor, query_embeds: torch.Tensor,
                 visual_embeds: torch.Tensor) -> torch.Tensor:
        raters = embedding_raters(query_embeds, visual_embeds).float()  # [B, n]
        rated = attention.float() * raters[:, None, :, None]  # [B, H, n, V]
        heads = resolve_count(self.heads, attention.shape[1], "pruner 'sparsevlm'") or attention.shape[1]
        if heads == attention.shape[1]:
            picked = rated.mean(dim=1)
        else:
            chosen = rated.sum(dim=(2, 3)).topk(heads, dim=1).indices  # by each head's rater-to-image attention
            picked = rated.gather(1, chosen[:, :, None, None].expand(-1, -1, *rated.shape[2:])).mean(dim=1)
        scores = picked.sum(dim=1) / raters.sum(dim=1, keepdim=True).clamp_min(1.0)  # [B, V]
        remaining = int(eligible.sum(dim=1).min())
        keep = min(resolve_count(self.keep, attention.shape[-1], "pruner 'sparsevlm'"), max(remaining - 1, 0))
        return lowest(scores, eligible, remaining - keep).flip(1)


@dataclass(frozen=True)
class ClusterRecycler:
    """SparseVLM v1/v1.5's recycling: of a stage's dropped tokens (hidden states [B, k, D], best-rated first) the
    best m = int(share * k) + 1 are grouped into int(m / per_cluster) + 1 clusters by density-peak clustering
    (DPC-kNN, `density_peak_clusters`); the cluster means go back into the sequence."""

    share: float = 0.3
    per_cluster: int = 10

    def __call__(self, dropped: torch.Tensor) -> torch.Tensor:
        taken = dropped[:, : min(dropped.shape[1], int(dropped.shape[1] * self.share) + 1)]
        return density_peak_clusters(taken, int(taken.shape[1] / self.per_cluster) + 1)


NOISE_SEED = 0  # the tie-breaking noise of `density_peak_clusters`: the same draws in every batch row and step


def density_peak_clusters(tokens: torch.Tensor, clusters: int) -> torch.Tensor:
    """SparseVLM's `cluster_and_merge` (DPC-kNN), in float32 per batch row, [B, m, D] -> [B, clusters, D]: a
    token's density is exp(-mean squared distance to its `clusters` nearest tokens, itself included), distances
    scaled by 1/sqrt(D), plus uniform noise below 1e-6 against ties (a fixed seed here, where the official code
    draws from the global generator); its peak distance is the distance to the nearest denser token (the largest
    distance for the densest); the `clusters` tokens with the largest density x peak distance are the centres,
    every token joins its nearest centre, and each cluster becomes the mean of its tokens (weights 1/(n + 1e-6))."""
    x = tokens.float()
    batch, count, width = x.shape
    distance = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / width ** 0.5  # [B, m, m]
    nearest = distance.topk(clusters, dim=-1, largest=False).values
    noise = torch.stack([torch.rand(count, generator=torch.Generator().manual_seed(NOISE_SEED)) for _ in range(batch)])
    density = (-(nearest ** 2).mean(dim=-1)).exp() + noise.to(x.device) * 1e-6  # [B, m]
    denser = density[:, None, :] > density[:, :, None]  # [b, i, j]: j is denser than i
    farthest = distance.flatten(1).max(dim=-1).values[:, None, None]
    peak = torch.where(denser, distance, farthest).min(dim=-1).values
    centres = (peak * density).topk(clusters, dim=-1).indices  # [B, C]
    assigned = distance.gather(1, centres[:, :, None].expand(-1, -1, count)).argmin(dim=1)  # [B, m]
    assigned.scatter_(1, centres, torch.arange(clusters, device=x.device).expand(batch, -1).contiguous())
    sizes = torch.zeros(batch, clusters, device=x.device).scatter_add_(1, assigned, torch.ones_like(density)) + 1e-6
    weights = 1.0 / sizes.gather(1, assigned)  # [B, m]
    merged = torch.zeros(batch, clusters, width, device=x.device)
    merged.scatter_add_(1, assigned[:, :, None].expand(-1, -1, width), x * weights[:, :, None])
    return merged.to(tokens.dtype)


@register_strategy("pruner", "sparsevlm")
class SparseVLMPruner(TokenPruner):
    """SparseVLM (v2.0 of the official code, training-free): raters are the post-image tokens whose input
    embeddings relate to the image more than average (chosen once per forward); at each stage the layer's own
    attention, divided by its RoPE-only scores (`rope_corrected`), is read from the `heads` heads where the raters
    attend most to the image (null: all heads), and the visual tokens the raters attend to most are kept:
    `keep[i]` of them after stage i, the rest dropped from the next layer on. `layers`: the first layer without the
    dropped tokens (the official prunes after layers 2, 6 and 15, so '3/32', '7/32', '16/32'); `keep`: counts or
    shares of the visual tokens ('300/576': the official 192-token budget's 300 of LLaVA's 576, scaled); `heads`:
    a count or share ('14/32'). Position ids stay the original ones, as in v2.0. `recycle` (v1/v1.5): the best
    30% of each stage's dropped tokens are clustered (`ClusterRecycler`) and the cluster means inserted after the
    kept visual tokens, every position renumbered contiguously in the new order; causal decoders without reuse
    only. `sparsevlm-v1.5` is that version's whole setting."""

    @dataclass
    class Config:
        layers: list = field(default_factory=lambda: ["3/32", "7/32", "16/32"])
        keep: list = field(default_factory=lambda: ["300/576", "200/576", "118/576"])
        heads: Any = "14/32"
        rope_corrected: bool = True
        recycle: bool = False

    @property
    def recycles(self) -> bool:
        return bool(self.config.recycle)

    def _layers(self, num_layers: int) -> tuple[int, ...]:
        return prune_layers(self.config.layers, num_layers, self.registry_name)

    def check(self, num_layers: int) -> None:
        self._layers(num_layers)
        if len(self.config.keep) != len(self.config.layers):
            raise ConfigError(f"pruner '{self.registry_name}': keep {self.config.keep} must give one count per layer of "
                              f"{self.config.layers}")
        for value in [*self.config.keep, self.config.heads]:
            resolve_count(value, 1 << 20, f"pruner '{self.registry_name}'")
        for setting in ("rope_corrected", "recycle"):
            if not isinstance(getattr(self.config, setting), bool):
                raise ConfigError(f"pruner '{self.registry_name}': {setting} must be true or false, got "
                                  f"{getattr(self.config, setting)!r}")

    def rules(self, ctx: PlanContext) -> list[PruneRule]:
        recycle = ClusterRecycler() if self.config.recycle else None
        return [PruneRule(layer, KeepRatedByHeads(keep, self.config.heads), "after-vision", per_head=True,
                          rope_corrected=self.config.rope_corrected, embeds=True, recycle=recycle)
                for layer, keep in zip(self._layers(ctx.num_layers), self.config.keep)]


@register_strategy("pruner", "sparsevlm-v1.5")
class SparseVLMv15Pruner(SparseVLMPruner):
    """SparseVLM as v1.5 of its official code runs it: the raters' attention averaged over all heads, no RoPE
    correction, 300 / 200 / 110 of 576 visual tokens kept after layers 2, 6 and 15, the best 30% of each stage's
    dropped tokens recycled as cluster tokens, positions renumbered contiguously."""

    @dataclass
    class Config(SparseVLMPruner.Config):
        keep: list = field(default_factory=lambda: ["300/576", "200/576", "110/576"])
        heads: Any = None
        rope_corrected: bool = False
        recycle: bool = True


@dataclass(frozen=True)
class DropOutsideMass:
    """A layer-dynamic count: keep the fewest eligible visual tokens that hold `keep_mass` of the attention the
    eligible tokens receive (mean over the query rows), drop the rest, at most floor(max_ratio * V); a layer whose
    attention is concentrated drops many, a diffuse one few."""

    keep_mass: float
    max_ratio: float

    def __call__(self, attention: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
        scores = attention.float().mean(dim=1).masked_fill(~eligible, 0.0)
        ranked = scores.sort(dim=1, descending=True).values
        before = (ranked.cumsum(dim=1) - ranked) / ranked.sum(dim=1, keepdim=True).clamp_min(1e-12)
        keep = ((before < self.keep_mass) & (ranked > 0)).sum(dim=1)
        surplus = int((eligible.sum(dim=1) - keep).clamp_min(0).min())
        return lowest(scores, eligible, min(surplus, math.floor(self.max_ratio * attention.shape[-1] + 1e-9)))


@register_strategy("pruner", "layer-dynamic")
class LayerDynamicPruner(TokenPruner):
    """A layer-dynamic pruning schedule after SpecPrune-VLA (known here from its abstract only: pruning at several
    depths, how much decided per layer): at each of `layers` (5, 10, 15, 20 of 32 by default) the eligible visual
    tokens are ranked by the attention the `query` rows gave them in the layer before, and the tokens outside the
    top `keep_mass` of that attention are dropped from there on, at most `max_ratio` of all visual tokens per
    layer: the count follows how concentrated each layer's attention is, per step. Not SpecPrune's own rule (its
    paper's details were not available); its action-aware control is the `action-aware` gate."""

    @dataclass
    class Config:
        layers: list = field(default_factory=lambda: ["5/32", "10/32", "15/32", "20/32"])
        keep_mass: float = 0.9
        max_ratio: float = 0.3
        query: str = "text"

    def _layers(self, num_layers: int) -> tuple[int, ...]:
        return prune_layers(self.config.layers, num_layers, "layer-dynamic")

    def check(self, num_layers: int) -> None:
        self._layers(num_layers)
        if not 0.0 < self.config.keep_mass <= 1.0 or not 0.0 <= self.config.max_ratio <= 1.0:
            raise ConfigError(f"pruner 'layer-dynamic': keep_mass must be in (0, 1] and max_ratio in [0, 1], got "
                              f"{self.config.keep_mass} and {self.config.max_ratio}")
        if self.config.query not in QUERIES:
            raise ConfigError(f"pruner 'layer-dynamic': query must be one of {QUERIES}, got {self.config.query!r}")

    def rules(self, ctx: PlanContext) -> list[PruneRule]:
        choose = DropOutsideMass(self.config.keep_mass, self.config.max_ratio)
        return [PruneRule(layer, choose, self.config.query) for layer in self._layers(ctx.num_layers)]
