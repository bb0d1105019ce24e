"""Relevance filters: remove the static tokens the decoder attends to for the task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlacache.config import ConfigError
from vlacache.registry import register_strategy
from vlacache.strategy import Candidates, PlanContext, RelevanceFilter, resolve_count, resolve_layers


@register_strategy("relevance", "none")
class NoRelevanceFilter(RelevanceFilter):
    """Keeps every static candidate (naive static reuse)."""

    def filter(self, ctx: PlanContext, candidates: dict[str, Candidates]) -> dict[str, Candidates]:
        return candidates


@register_strategy("relevance", "attention")
class AttentionRelevanceFilter(RelevanceFilter):
    """Scores each visual token by last step's attention from the query rows (text tokens by default),
    averaged over the chosen layers and all heads, and removes the relevant ones from the candidates.

    mode 'threshold' (paper): scores min-max normalised per camera, tokens with score >= tau are removed.
    mode 'topk' (reference code): the top_k highest-scoring tokens per camera are removed (a count, or "k/n": k of n
    patches scaled to the camera's count).
    layers: decoder layers, null for all; an index (15, -1) or relative to the depth ('15/32': layer 15 of a
    32-layer decoder, scaled). query: 'text' rows or the 'last' row.
    """

    @dataclass
    class Config:
        mode: str = "threshold"
        tau: float = 0.5
        top_k: Any = 120  # per camera: a count or "k/n" (k of n patches, scaled to the camera's)
        layers: list[Any] | None = None
        query: str = "text"

    def __init__(self, config=None) -> None:
        super().__init__(config)
        if self.config.mode not in ("threshold", "topk"):
            raise ConfigError(f"relevance 'attention': mode must be 'threshold' or 'topk', got '{self.config.mode}'")
        if self.config.query not in ("text", "last"):
            raise ConfigError(f"relevance 'attention': query must be 'text' or 'last', got '{self.config.query}'")
        self.query = self.config.query
        if self.config.layers is not None:
            resolve_layers(self.config.layers, 1 << 20, "relevance 'attention'")  # the syntax, at construction
        resolve_count(self.config.top_k, 1 << 20, "relevance 'attention'")

    def required_layers(self, num_layers: int) -> tuple[int, ...]:
        layers = self.config.layers
        return tuple(range(num_layers)) if layers is None else resolve_layers(layers, num_layers, "relevance 'attention'")

    def check(self, num_layers: int) -> None:
        self.required_layers(num_layers)

    def filter(self, ctx: PlanContext, candidates: dict[str, Candidates]) -> dict[str, Candidates]:
        if ctx.stats is None:
            return {c: Candidates(torch.zeros_like(x.mask), x.score) for c, x in candidates.items()}
        layers = self.required_layers(ctx.num_layers)
        attention = torch.stack([ctx.stats.to_keys[layer] for layer in layers]).mean(0).cpu()
        out = {}
        for camera, cand in candidates.items():
            span = ctx.layout.vision[camera]
            score = attention[:, span.start : span.stop]
            if self.config.mode == "threshold":
                low, high = score.min(1, keepdim=True).values, score.max(1, keepdim=True).values
                relevant = (score - low) / (high - low).clamp_min(1e-12) >= self.config.tau
            else:
                relevant = torch.zeros_like(cand.mask)
                k = resolve_count(self.config.top_k, score.shape[1], "relevance 'attention'")
                relevant.scatter_(1, score.topk(k, dim=1).indices, True)
            out[camera] = Candidates(cand.mask & ~relevant.to(cand.mask.device), cand.score)
        return out
