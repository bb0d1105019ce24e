"""Relevance filters: remove the static tokens the decoder attends to for the task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlacache.config import ConfigError
from vlacache.registry import register_strategy
from vlacache.strategy import Candidates, PlanContext, RelevanceFilter, resolve_count, resolve_layers, top_indices
from vlacache.types import QUERY_ROWS


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
    patches scaled to the camera's count); equal scores in patch order.
    layers: decoder layers, null for all; an index (15, -1) or relative to the depth ('15/32': layer 15 of a
    32-layer decoder, scaled). query: the instruction's 'text' rows, the 'last' row, or the rows right
    'after-vision' (the reference code's fixed window: the positions after the last visual token, which on OFT
    start with the proprio token); query_rows: only the first that many of them (null: all).
    """

    @dataclass
    class Config:
        mode: str = "threshold"
        tau: float = 0.5
        top_k: Any = 120  # per camera: a count or "k/n" (k of n patches, scaled to the camera's)
        layers: list[Any] | None = None
        query: str = "text"
        query_rows: int | None = None

    def __init__(self, config=None) -> None:
        super().__init__(config)
        if self.config.mode not in ("threshold", "topk"):
            raise ConfigError(f"relevance 'attention': mode must be 'threshold' or 'topk', got '{self.config.mode}'")
        if self.config.query not in QUERY_ROWS:
            raise ConfigError(f"relevance 'attention': query must be one of {list(QUERY_ROWS)}, got "
                              f"'{self.config.query}'")
        rows = self.config.query_rows
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
            raise ConfigError(f"relevance 'attention': query_rows must be a positive number of rows or null (all), "
                              f"got {rows!r}")
        self.query, self.query_rows = self.config.query, rows
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
                relevant.scatter_(1, top_indices(score, k, stable=True), True)
            out[camera] = Candidates(cand.mask & ~relevant.to(cand.mask.device), cand.score)
        return out
