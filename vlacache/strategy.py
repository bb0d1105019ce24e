"""Base classes of the pluggable decisions a cache policy is composed of.

A new strategy is one class with a `Config` dataclass for its parameters and one decorator:

    @register_strategy("selector", "my-selector")
    class MySelector(TokenSelector):
        @dataclass
        class Config:
            threshold: float = 0.5

        def select(self, ctx): ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch

from .types import AttentionStats, TokenLayout


@dataclass
class NoParameters:
    """Config of a strategy that takes no parameters."""


@dataclass
class Candidates:
    """Reusable-token candidates of one camera: mask [B, P] over its patches and score [B, P] (higher = safer)."""

    mask: torch.Tensor
    score: torch.Tensor


@dataclass
class PlanContext:
    """Everything a strategy may look at when planning one step."""

    step: int
    batch_size: int
    num_layers: int
    layout: TokenLayout
    current: Mapping[str, torch.Tensor]
    previous: Mapping[str, torch.Tensor] | None
    stats: AttentionStats | None


class Strategy:
    """Common base: holds the typed config."""

    Config: ClassVar[type] = NoParameters

    def __init__(self, config=None) -> None:
        self.config = config if config is not None else self.Config()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


class TokenSelector(Strategy):
    """Finds static visual tokens: per camera, which patches could reuse last step's K/V."""

    def select(self, ctx: PlanContext) -> dict[str, Candidates]:
        raise NotImplementedError


class RelevanceFilter(Strategy):
    """Removes task-relevant tokens from the candidates, using last step's attention statistics."""

    query: str = "text"

    def required_layers(self, num_layers: int) -> tuple[int, ...]:
        """Decoder layers whose attention statistics this filter reads (empty: none)."""
        return ()

    def filter(self, ctx: PlanContext, candidates: dict[str, Candidates]) -> dict[str, Candidates]:
        raise NotImplementedError


class LayerScheduler(Strategy):
    """Chooses the fraction of the reusable set reused at each decoder layer."""

    needs_entropy: bool = False

    def fractions(self, ctx: PlanContext) -> list[float]:
        raise NotImplementedError


class StepGate(Strategy):
    """May veto reuse for a whole step (first step, periodic refresh, ...)."""

    def allow(self, ctx: PlanContext) -> bool:
        raise NotImplementedError
