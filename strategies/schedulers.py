"""Layer-reuse schedulers: the fraction of the reusable set reused at each decoder layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vlacache.registry import register_strategy
from vlacache.strategy import LayerScheduler, PlanContext, resolve_layers


@register_strategy("scheduler", "constant")
class ConstantScheduler(LayerScheduler):
    """The same fraction at every layer from start_layer on (layers before it compute everything)."""

    @dataclass
    class Config:
        fraction: float = 1.0
        start_layer: int = 0

    def fractions(self, ctx: PlanContext) -> list[float]:
        return [self.config.fraction if i >= self.config.start_layer else 0.0 for i in range(ctx.num_layers)]


def layer_entropy(ctx: PlanContext) -> torch.Tensor | None:
    """Mean attention entropy per layer [num_layers] from last step's statistics (None when absent)."""
    stats = ctx.stats
    if stats is None or len(stats.entropy) < ctx.num_layers:
        return None
    return torch.stack([stats.entropy[i].float().mean() for i in range(ctx.num_layers)]).cpu()


@register_strategy("scheduler", "entropy-adaptive")
class EntropyAdaptiveScheduler(LayerScheduler):
    """The paper's layer-adaptive reuse: R^l = (E^{l-1} - E^l) / E^{l-1} (R^0 = 0) and
    alpha^l = min(k * sum_{j<=l} R^j, 1), made non-decreasing so the reused sets stay nested."""

    needs_entropy = True

    @dataclass
    class Config:
        k: float = 1.0

    def fractions(self, ctx: PlanContext) -> list[float]:
        entropy = layer_entropy(ctx)
        if entropy is None:
            return [0.0] * ctx.num_layers
        ratio = torch.zeros_like(entropy)
        ratio[1:] = (entropy[:-1] - entropy[1:]) / entropy[:-1].clamp_min(1e-12)
        alpha = (self.config.k * ratio.cumsum(0)).clamp(0.0, 1.0)
        return alpha.tolist()


@register_strategy("scheduler", "entropy-minmax")
class EntropyMinMaxScheduler(LayerScheduler):
    """The public reference code's schedule, transcribed (docs/REFERENCE_CODE.md). E^l: the entropy of layer l's
    head-averaged attention over the rows it computed; s = 1 - (E - min E) / (max E - min E + 1e-10); along all
    layers r_0 = s_0 and r_l = r_{l-1} + damping * (s_l - r_{l-1}) when s_l > r_{l-1}, else s_l. Tokens leave
    only at apply_layers (indices, or relative to the depth as '9/32'): k = max(1, int(r_l * n)) of the reusable
    list of n, never fewer than at an earlier apply layer; layers before the first apply layer compute all."""

    needs_entropy = True
    entropy_rows = "computed"

    @dataclass
    class Config:
        apply_layers: list[Any] = field(default_factory=lambda: ["2/32", "6/32", "9/32", "11/32"])
        damping: float = 0.55

    def __init__(self, config=None) -> None:
        super().__init__(config)
        resolve_layers(self.config.apply_layers, 1 << 20, "scheduler 'entropy-minmax'")  # the syntax, at construction

    def check(self, num_layers: int) -> None:
        resolve_layers(self.config.apply_layers, num_layers, "scheduler 'entropy-minmax'")

    def fractions(self, ctx: PlanContext) -> list[float]:
        entropy = layer_entropy(ctx)
        if entropy is None:
            return [0.0] * ctx.num_layers
        apply = resolve_layers(self.config.apply_layers, ctx.num_layers, "scheduler 'entropy-minmax'")
        score = (1.0 - (entropy - entropy.min()) / (entropy.max() - entropy.min() + 1e-10)).tolist()
        damped = [score[0]]
        for s in score[1:]:
            damped.append(damped[-1] + self.config.damping * (s - damped[-1]) if s > damped[-1] else s)
        damped = torch.tensor(damped, dtype=torch.float32).tolist()  # the reference hands r on in float32
        out, current = [], 0.0
        for layer in range(ctx.num_layers):
            if layer in apply:
                current = max(current, damped[layer])
            out.append(current)
        return out

    def counts(self, fractions, n: int) -> list[int]:
        first = min(resolve_layers(self.config.apply_layers, len(fractions), "scheduler 'entropy-minmax'"))
        return [0 if layer < first or n == 0 else max(1, int(f * n)) for layer, f in enumerate(fractions)]
