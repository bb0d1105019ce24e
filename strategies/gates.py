"""Step gates: may veto reuse for a whole step, or turn it down (`scale`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlacache.config import ConfigError
from vlacache.registry import register_strategy
from vlacache.strategy import PlanContext, StepGate
from vlacache.types import InputError


@register_strategy("gate", "always")
class AlwaysGate(StepGate):
    """Never vetoes (a step without a previous query frame is full anyway)."""

    def allow(self, ctx: PlanContext) -> bool:
        return True


@register_strategy("gate", "full-first-step")
class FullFirstStepGate(StepGate):
    """The first `steps` steps of an episode are full forwards (default: the first one)."""

    @dataclass
    class Config:
        steps: int = 1

    def allow(self, ctx: PlanContext) -> bool:
        return ctx.step >= self.config.steps


@register_strategy("gate", "periodic-refresh")
class PeriodicRefreshGate(StepGate):
    """A full forward every `every` steps bounds how long stale K/V can survive."""

    @dataclass
    class Config:
        every: int = 10

    def allow(self, ctx: PlanContext) -> bool:
        return ctx.step % max(self.config.every, 1) != 0


@register_strategy("gate", "action-aware")
class ActionAwareGate(StepGate):
    """Turns reuse down while the end-effector makes fine motions (the action-aware control of ADP and
    SpecPrune-VLA): the motion is the mean norm of the translation part (`dims`) of the previous query's
    actions; below `min_motion` the scheduler's fractions are multiplied by `fine_scale` (0: no reuse), above
    it they stand, and with `pruning: true` the policy's pruner drops nothing at such a step either. Units are
    the backbone's un-normalised actions (LIBERO: the delta command, ~[-1, 1])."""

    @dataclass
    class Config:
        min_motion: float = 0.3
        fine_scale: float = 0.0
        dims: list[int] = field(default_factory=lambda: [0, 1, 2])
        steps: int = 1  # the first `steps` steps of an episode are full forwards, as full-first-step
        pruning: bool = True  # also hold the pruner back during fine motions

    def check(self, num_layers: int) -> None:
        if not 0.0 <= self.config.fine_scale <= 1.0:
            raise ConfigError(f"gate 'action-aware': fine_scale must be in [0, 1], got {self.config.fine_scale}")
        if self.config.min_motion < 0 or not self.config.dims:
            raise ConfigError("gate 'action-aware': min_motion must be >= 0 and dims must name action dimensions, "
                              "e.g. dims: [0, 1, 2]")

    def scale(self, ctx: PlanContext) -> float:
        actions = (ctx.signals or {}).get("actions")
        if ctx.step < self.config.steps or actions is None:
            return 0.0
        return 1.0 if self._motion(actions) >= self.config.min_motion else self.config.fine_scale

    def allow_pruning(self, ctx: PlanContext) -> bool:
        actions = (ctx.signals or {}).get("actions")
        return not self.config.pruning or actions is None or self._motion(actions) >= self.config.min_motion

    def _motion(self, actions: torch.Tensor) -> float:
        if max(self.config.dims) >= actions.shape[-1]:
            raise InputError(f"gate 'action-aware': dims {self.config.dims} do not exist in {actions.shape[-1]}-d actions")
        return float(actions[..., self.config.dims].norm(dim=-1).mean())


@register_strategy("gate", "logit-margin")
class LogitMarginGate(StepGate):
    """Gated VLA-Cache: no reuse at a step that follows an unconfident one, i.e. whose top-1 minus top-2
    probability of the prefill's last-position logits (OpenVLA: the first action token) was below `min_margin`.
    Only for backbones that decode action tokens (`Backbone.action_token_logits`): attaching it to an L1 or diffusion
    head, whose logits carry no confidence, is refused."""

    needs_action_token_logits = True

    @dataclass
    class Config:
        min_margin: float = 0.2
        steps: int = 1  # the first `steps` steps of an episode are full forwards, as full-first-step

    def allow(self, ctx: PlanContext) -> bool:
        margin = (ctx.signals or {}).get("logit_margin")
        return ctx.step >= self.config.steps and margin is not None and float(margin.min()) >= self.config.min_margin
