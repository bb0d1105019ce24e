"""A cache policy: selector + relevance filter + layer scheduler + gate, composed into a ReusePlan per step."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .config import ConfigError, check_keys, load_yaml, resolve_component, resolve_config_path, to_plain
from .engine import StatsRequest
from .guard import GuardConfig
from .registry import STRATEGIES
from .strategy import Candidates, LayerScheduler, PlanContext, RelevanceFilter, StepGate, TokenPruner, TokenSelector
from .types import InputError, ReusePlan

# similarity: each camera's candidates most similar first; index: each camera's lowest patch index first; position:
# ONE list over all cameras in sequence order, its counts taken of the whole list (the public reference code's)
REUSE_ORDERS = ("similarity", "index", "position")


@dataclass
class PolicyConfig:
    """A cache policy by registry names: each component is {name: ..., <its parameters>}."""

    label: str = "policy"
    selector: dict = field(default_factory=lambda: {"name": "none"})
    relevance: dict = field(default_factory=lambda: {"name": "none"})
    scheduler: dict = field(default_factory=lambda: {"name": "constant"})
    gate: dict = field(default_factory=lambda: {"name": "full-first-step"})
    pruner: dict = field(default_factory=lambda: {"name": "none"})
    reuse_order: str = "similarity"
    cameras: dict | None = None  # camera -> scale of the scheduler's fractions there (0: never reuse it); null: 1 for all
    guard: Any = False  # the cost guard (vlacache/guard.py): true, false or {enabled, margin, max_backoff}


def build_strategy(kind: str, spec: Mapping[str, Any] | str):
    """Instantiate a registered strategy from {name: ..., params...} (or just its name)."""
    cls, config = resolve_component(STRATEGIES[kind], spec, kind)
    return cls(config)


class CachePolicy:
    """Decides, for each step, which visual tokens reuse last step's K/V at which decoder layer."""

    def __init__(
        self,
        selector: TokenSelector,
        relevance: RelevanceFilter,
        scheduler: LayerScheduler,
        gate: StepGate,
        reuse_order: str = "similarity",
        label: str = "policy",
        cameras: Mapping[str, float] | None = None,
        pruner: TokenPruner | None = None,
        guard: Any = False,
    ) -> None:
        if reuse_order not in REUSE_ORDERS:
            raise ConfigError(f"reuse_order must be one of {REUSE_ORDERS}, got '{reuse_order}'")
        for camera, scale in (cameras or {}).items():
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 <= scale <= 1.0:
                raise ConfigError(f"cameras: the scale of camera '{camera}' must be a number in [0, 1] (0: never reuse "
                                  f"it, 1: as the scheduler says), got {scale!r}; e.g. cameras: {{wrist: 0.5}}")
        if reuse_order == "position" and any(scale != 1.0 for scale in (cameras or {}).values()):
            raise ConfigError("reuse_order 'position' takes its counts of one list over all cameras, so per-camera "
                              "scales cannot apply; use reuse_order 'similarity' or 'index' with `cameras:` scales")
        self.selector, self.relevance, self.scheduler, self.gate = selector, relevance, scheduler, gate
        self.reuse_order = reuse_order
        self.label = label
        self.cameras = dict(cameras or {})
        self.pruner = pruner if pruner is not None else build_strategy("pruner", "none")
        self.guard = GuardConfig.from_spec(guard)

    @classmethod
    def from_config(cls, config: PolicyConfig | Mapping[str, Any] | str | Path) -> "CachePolicy":
        """From a PolicyConfig, a mapping, a YAML path, or the name of a shipped policy (configs/policy/)."""
        if isinstance(config, (str, Path)):
            config = load_yaml(resolve_config_path(config, "policy"))
        if not isinstance(config, PolicyConfig):
            config = dict(to_plain(config))
            check_keys(config, list(PolicyConfig.__dataclass_fields__), "the policy config")
            config = PolicyConfig(**config)
        return cls(
            build_strategy("selector", config.selector),
            build_strategy("relevance", config.relevance),
            build_strategy("scheduler", config.scheduler),
            build_strategy("gate", config.gate),
            reuse_order=config.reuse_order,
            label=config.label,
            cameras=config.cameras,
            pruner=build_strategy("pruner", config.pruner),
            guard=config.guard,
        )

    def check(self, num_layers: int) -> None:
        """Fail at attach time if a component's settings cannot run on a decoder of this depth."""
        for component in (self.selector, self.relevance, self.scheduler, self.gate, self.pruner):
            component.check(num_layers)
        if self.pruner.recycles and (not getattr(self.selector, "selects_nothing", False)
                                     or self.stats_request(num_layers) is not None):
            raise ConfigError(f"policy '{self.label}': the pruner recycles tokens and renumbers every position "
                              "(SparseVLM v1.5), so nothing can be reused beside it; use selector 'none' and "
                              "relevance 'none' with it, or pruner 'sparsevlm' without recycle")

    def check_cameras(self, cameras: Sequence[str]) -> None:
        """Fail at attach time if a component's settings, or the per-camera scales, name a camera the backbone
        does not have."""
        for component in (self.selector, self.relevance, self.scheduler, self.gate, self.pruner):
            component.check_cameras(cameras)
        unknown = sorted(set(self.cameras or {}) - set(cameras))
        if unknown:
            raise ConfigError(f"policy '{self.label}': cameras scales {unknown}, which are not cameras of this "
                              f"backbone ({list(cameras)}); scale some of those, or leave `cameras:` out")

    @property
    def enabled(self) -> bool:
        """False for the no-cache policy (selector 'none', no pruner): run the model untouched."""
        return self.reuses or self.prunes

    @property
    def reuses(self) -> bool:
        """Whether the policy ever reuses K/V (its selector selects something): its steps then record for the next."""
        return getattr(self.selector, "selects_nothing", False) is False

    @property
    def prunes(self) -> bool:
        return getattr(self.pruner, "prunes", False)

    def stats_request(self, num_layers: int) -> StatsRequest | None:
        layers = set(self.relevance.required_layers(num_layers)) | set(self.selector.required_layers(num_layers))
        if self.scheduler.needs_entropy:
            layers |= set(range(num_layers))
        if not layers:
            return None
        return StatsRequest(layers=tuple(sorted(layers)), query=self.relevance.query,
                            query_rows=self.relevance.query_rows,
                            entropy=self.scheduler.entropy_rows if self.scheduler.needs_entropy else "query")

    def plan(self, ctx: PlanContext) -> ReusePlan:
        """The step's plan: what is reused (from the previous step) and the prune rules (applied in the forward)."""
        plan = self._reuse_plan(ctx)
        plan.prune = tuple(self.pruner.rules(ctx)) if self.prunes and self.gate.allow_pruning(ctx) else ()
        return plan

    def _reuse_plan(self, ctx: PlanContext) -> ReusePlan:
        empty = ReusePlan.empty(ctx.batch_size, ctx.num_layers)
        if ctx.previous is None:
            empty.info["reason"] = "no previous query frame"
            return empty
        scale = min(max(float(self.gate.scale(ctx)), 0.0), 1.0)
        if scale == 0.0:
            empty.info["reason"] = "gate vetoed reuse"
            return empty
        static = self.selector.select(ctx)
        candidates = self.relevance.filter(ctx, static)
        if ctx.void is not None:  # dropped at the previous step: no K/V to reuse
            candidates = {c: Candidates(m.mask & ~ctx.void[:, ctx.layout.vision[c].start:ctx.layout.vision[c].stop]
                                        .to(m.mask.device), m.score) for c, m in candidates.items()}
        fractions = [f * scale for f in self._monotone(self.scheduler.fractions(ctx), ctx.num_layers)]
        unknown = sorted(set(self.cameras) - set(ctx.layout.vision))
        if unknown:
            raise InputError(f"policy '{self.label}': cameras {unknown} are not inputs of this backbone, whose cameras "
                             f"are {sorted(ctx.layout.vision)}; name some of those in the policy's cameras")
        # each camera's candidates in the batch's smallest count: one read of all cameras' counts
        smallest = torch.stack([c.mask.sum(dim=1).min() for c in candidates.values()]).tolist() if candidates else []
        ordered = {camera: self._order(c, n) + ctx.layout.vision[camera].start
                   for (camera, c), n in zip(candidates.items(), smallest)}
        if self.reuse_order == "position":
            joint = torch.sort(torch.cat(list(ordered.values()), dim=1), dim=1).values if ordered else \
                torch.empty(ctx.batch_size, 0, dtype=torch.long)
            plan = ReusePlan.from_order(joint, self.scheduler.counts(fractions, joint.shape[1]))
        else:
            counts = {camera: self.scheduler.counts([f * self.cameras.get(camera, 1.0) for f in fractions], order.shape[1])
                      if self.cameras.get(camera, 1.0) > 0 else [0] * ctx.num_layers for camera, order in ordered.items()}
            plan = ReusePlan.from_order(*self._layer_order(ordered, counts, ctx.num_layers, ctx.batch_size))
        plan.info.update(
            static={c: s.mask for c, s in static.items()},
            candidates={c: s.mask for c, s in candidates.items()},
            fractions=fractions,
            gate_scale=scale,
        )
        return plan

    @staticmethod
    def _layer_order(ordered: dict[str, torch.Tensor], per_camera: dict[str, list[int]], num_layers: int, batch_size: int):
        """Layer l reuses the first per_camera[camera][l] positions of each camera's order (never fewer than at the
        layer above). Returns one order over all cameras with the counts per layer: tokens that join at a shallower
        layer first; within one layer, the cameras interleaved by their rank relative to their candidate count (equal
        ranks in camera order)."""
        if not ordered:
            return torch.empty(batch_size, 0, dtype=torch.long), [0] * num_layers
        takes = tuple((order.shape[1], tuple(per_camera[camera])) for camera, order in ordered.items())
        permutation, counts = joint_order(takes)
        order = torch.cat(list(ordered.values()), dim=1)
        return order[:, permutation.to(order.device)], list(counts)

    def _order(self, candidates: Candidates, count: int) -> torch.Tensor:
        """The first `count` candidate patch indices [B, count], most reusable first."""
        mask = candidates.mask
        if self.reuse_order == "similarity":
            key = candidates.score.float().masked_fill(~mask, float("-inf"))
        else:
            key = (-torch.arange(mask.shape[1], dtype=torch.float32, device=mask.device)).expand_as(mask) \
                .masked_fill(~mask, float("-inf"))
        order = torch.sort(key, dim=1, descending=True, stable=True).indices
        return order[:, :count]

    @staticmethod
    def _monotone(fractions: list[float], num_layers: int) -> list[float]:
        if len(fractions) != num_layers:
            raise ValueError(f"scheduler returned {len(fractions)} fractions for {num_layers} layers")
        out, running = [], 0.0
        for f in fractions:
            if not math.isfinite(f):
                f = 0.0
            running = max(running, min(max(f, 0.0), 1.0))
            out.append(running)
        return out

    def __repr__(self) -> str:
        return (
            f"CachePolicy({self.label!r}, selector={self.selector}, relevance={self.relevance}, "
            f"scheduler={self.scheduler}, gate={self.gate}, pruner={self.pruner}, reuse_order={self.reuse_order!r})"
        )


@functools.lru_cache(maxsize=256)
def joint_order(takes: tuple[tuple[int, tuple[int, ...]], ...]) -> tuple[torch.Tensor, list[int]]:
    """`CachePolicy._layer_order`'s permutation of the cameras' concatenated orders, and the counts per layer, from
    each camera's (candidate count, reuse count per layer). It depends on counts alone, so it is computed once per
    distinct set of counts (one tensor pass over the tokens) and reused."""
    joins, ranks, counts = [], [], None
    for n, per_layer in takes:
        taken = torch.tensor(per_layer, dtype=torch.long).clamp_min(0).cummax(0).values.clamp_max(n)
        positions = torch.arange(n)
        joins.append(torch.searchsorted(taken, positions, right=True))  # the layer position i joins at
        ranks.append(positions.double() / max(n, 1))
        counts = taken if counts is None else counts + taken
    join, rank = torch.cat(joins), torch.cat(ranks)
    by_rank = torch.sort(rank, stable=True).indices
    permutation = by_rank[torch.sort(join[by_rank], stable=True).indices]
    counts = counts.tolist()
    return permutation[: counts[-1]], counts
