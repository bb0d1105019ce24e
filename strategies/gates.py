"""Step gates: may veto reuse for a whole step."""

from __future__ import annotations

from dataclasses import dataclass

from vlacache.registry import register_strategy
from vlacache.strategy import PlanContext, StepGate


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
