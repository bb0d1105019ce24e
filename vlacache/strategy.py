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

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch

from .config import ConfigError
from .types import AttentionStats, PruneRule, TokenLayout

_RELATIVE = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


def resolve_layers(specs: Sequence[Any], num_layers: int, owner: str) -> tuple[int, ...]:
    """Decoder layer indices from a config list. An int is an absolute index (negative counts from the end);
    "i/n" is layer i of an n-layer decoder scaled to this one's depth, floor(i * num_layers / n), so a setting
    written for Llama-2-7B's 32 layers ("15/32": its middle layer) runs on a decoder of any depth."""
    out = set()
    for spec in specs:
        match = _RELATIVE.fullmatch(spec) if isinstance(spec, str) else None
        if match:
            i, n = int(match.group(1)), int(match.group(2))
            if not 0 <= i < n:
                raise ConfigError(f"{owner}: relative layer '{spec}' must name layer i of n with 0 <= i < n")
            out.add(i * num_layers // n)
        elif isinstance(spec, int) and not isinstance(spec, bool):
            index = spec + num_layers if spec < 0 else spec
            if not 0 <= index < num_layers:
                raise ConfigError(
                    f"{owner}: layer {spec} does not exist in this {num_layers}-layer decoder; give it relative to "
                    f"the depth, e.g. '{spec}/32' for layer {spec} of a 32-layer decoder"
                )
            out.add(index)
        else:
            raise ConfigError(f"{owner}: layer {spec!r} is neither an index (e.g. 15, -1) nor a relative layer (e.g. '15/32')")
    return tuple(sorted(out))


def resolve_count(spec: Any, total: int, owner: str) -> int | None:
    """A token count from a config value. An int is absolute (capped at `total`, the camera's tokens); "k/n" is k of
    n tokens scaled to this camera's count, floor(k * total / n), so a setting written for 256 patches per camera
    ("130/256": the reference code's static top-k) keeps its share on a 64-patch camera; None: no limit."""
    if spec is None:
        return None
    match = _RELATIVE.fullmatch(spec) if isinstance(spec, str) else None
    if match:
        k, n = int(match.group(1)), int(match.group(2))
        if n < 1 or k > n:
            raise ConfigError(f"{owner}: relative count '{spec}' must be k of n tokens with 0 <= k <= n, n >= 1")
        return k * total // n
    if isinstance(spec, int) and not isinstance(spec, bool) and spec >= 0:
        return min(spec, total)
    raise ConfigError(f"{owner}: count {spec!r} is neither a non-negative number of tokens (e.g. 100) nor a share "
                      "relative to a token count (e.g. '130/256': 130 of 256 patches, scaled)")


def top_indices(scores: torch.Tensor, k: int, stable: bool = False) -> torch.Tensor:
    """Indices [B, k] of the k highest scores of each row; stable: equal scores in index order (torch.topk leaves
    their order unspecified, which decides a cut that falls on a tie)."""
    if stable:
        return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.topk(k, dim=1).indices


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
    # per camera, the frame each token's cached K/V were computed from and the steps since (engine/staleness.py)
    anchors: Mapping[str, torch.Tensor] | None = None
    ages: Mapping[str, torch.Tensor] | None = None
    # what the previous step gave (`EpisodeState.signals`): "actions" [B, chunk, dim] (un-normalised) and
    # "logit_margin" [B] (top-1 minus top-2 probability of the prefill's last-position logits)
    signals: Mapping[str, torch.Tensor] | None = None
    # [B, L] bool: positions dropped by a prune rule at the previous step, whose K/V cannot be reused
    void: torch.Tensor | None = None
    # env steps between two queries (the executed part of each chunk): `ages` count queries, times this is env steps
    env_steps_per_query: int = 1


class Strategy:
    """Common base: holds the typed config."""

    Config: ClassVar[type] = NoParameters
    #: settings that make a working instance when the Config has required fields (tests/test_contracts.py runs
    #: every registered strategy with them)
    example: ClassVar[dict] = {}

    def __init__(self, config=None) -> None:
        self.config = config if config is not None else self.Config()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def check(self, num_layers: int) -> None:
        """Fail with a ConfigError, at attach time, if the settings cannot run on a decoder of this depth."""

    def check_cameras(self, cameras: Sequence[str]) -> None:
        """Fail with a ConfigError, at attach time, if a setting names a camera the backbone does not have. By
        convention every Config field named `cameras` (a list, or null for all) or ending in `_camera` names
        backbone cameras."""
        for field in dataclasses.fields(self.config) if dataclasses.is_dataclass(self.config) else ():
            value = getattr(self.config, field.name)
            if field.name == "cameras" and value is not None:
                named = list(value)
            elif field.name.endswith("_camera") and value is not None:
                named = [value]
            else:
                continue
            unknown = sorted(set(named) - set(cameras))
            if unknown:
                name = getattr(type(self), "registry_name", type(self).__name__)
                raise ConfigError(
                    f"strategy '{name}': {field.name} names {unknown}, not a camera of this backbone, whose cameras "
                    f"are {list(cameras)}; set {field.name} to some of those, or choose a strategy for this backbone")


class TokenSelector(Strategy):
    """Finds static visual tokens: per camera, which patches could reuse last step's K/V."""

    def required_layers(self, num_layers: int) -> tuple[int, ...]:
        """Decoder layers whose attention statistics this selector reads (empty: none)."""
        return ()

    def select(self, ctx: PlanContext) -> dict[str, Candidates]:
        raise NotImplementedError


class RelevanceFilter(Strategy):
    """Removes task-relevant tokens from the candidates, using last step's attention statistics (from the query
    rows `query`, the first `query_rows` of them: `StatsRequest`)."""

    query: str = "text"
    query_rows: int | None = None

    def required_layers(self, num_layers: int) -> tuple[int, ...]:
        """Decoder layers whose attention statistics this filter reads (empty: none)."""
        return ()

    def filter(self, ctx: PlanContext, candidates: dict[str, Candidates]) -> dict[str, Candidates]:
        raise NotImplementedError


class LayerScheduler(Strategy):
    """Chooses the fraction of the reusable set reused at each decoder layer, and how a fraction becomes a count."""

    needs_entropy: bool = False
    entropy_rows: str = "query"  # the entropy it reads (`AttentionStats.entropy_rows`)

    def fractions(self, ctx: PlanContext) -> list[float]:
        raise NotImplementedError

    def counts(self, fractions: Sequence[float], n: int) -> list[int]:
        """Tokens reused per layer of a reusable list of n, from the (non-decreasing) fractions: floor(f * n)."""
        return [math.floor(f * n + 1e-9) for f in fractions]


class StepGate(Strategy):
    """May veto reuse for a whole step (first step, periodic refresh, ...), or turn it down: `scale` multiplies
    the scheduler's fractions (1: as planned, 0: veto). A gate overrides `allow` (all or nothing) or `scale`,
    and `allow_pruning` to hold the pruner back too."""

    needs_action_token_logits: bool = False  # reads the previous step's action-token confidence (logit margin)

    def allow(self, ctx: PlanContext) -> bool:
        raise NotImplementedError

    def scale(self, ctx: PlanContext) -> float:
        return 1.0 if self.allow(ctx) else 0.0

    def allow_pruning(self, ctx: PlanContext) -> bool:
        """Whether the policy's pruner may drop tokens at this step (a gate that governs pruning overrides it;
        by default pruning is the pruner's own business, e.g. FastV prunes the first step too)."""
        return True


class TokenPruner(Strategy):
    """Drops visual tokens from some decoder layer on (FastV, SparseVLM): the prune rules of one step, applied
    inside the forward from that forward's own attention (`PruneRule`)."""

    prunes: bool = True
    recycles: bool = False  # inserts tokens and renumbers positions (`PruneRule.recycle`): no reuse beside it

    def rules(self, ctx: PlanContext) -> list[PruneRule]:
        raise NotImplementedError
