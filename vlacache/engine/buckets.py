"""Fixed-shape reuse: round each layer's reused count down to one of a few buckets.

A cached prefill recomputes `length - reused_l` rows at layer l, so every distinct count is a distinct shape: a
compiled step recompiles and a captured graph cannot be replayed. Buckets allow only a few counts per layer,
fractions of the visual tokens. Rounding always reuses fewer tokens (never more, never others): the reused
set stays within what the policy allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..config import ConfigError
from ..types import ReusePlan


@dataclass(frozen=True)
class ReuseBuckets:
    """The allowed reused counts per layer, as fractions of the visual tokens (0 is always allowed)."""

    fractions: tuple[float, ...]

    @classmethod
    def from_spec(cls, spec: int | Sequence[float] | None) -> "ReuseBuckets | None":
        """`None` (no rounding), `n` (the fractions 0, 1/n, ..., 1) or a list of fractions in [0, 1]."""
        if spec is None:
            return None
        if isinstance(spec, bool) or not isinstance(spec, (int, list, tuple)):
            raise ConfigError(f"buckets must be null, a count n (fractions 0, 1/n, ..., 1) or a list of fractions, got {spec!r}")
        if isinstance(spec, int):
            if spec < 1:
                raise ConfigError(f"buckets must be a count >= 1 (e.g. 8: reuse in steps of 1/8 of the visual tokens), "
                                  f"got {spec}")
            fractions = [k / spec for k in range(spec + 1)]
        else:
            fractions = [float(f) for f in spec]
            bad = [f for f in fractions if not 0.0 <= f <= 1.0]
            if bad:
                raise ConfigError(f"bucket fractions must lie in [0, 1] (shares of the visual tokens), got {bad}")
        return cls(tuple(sorted(set(fractions) | {0.0})))

    def counts(self, num_visual: int) -> list[int]:
        """The reused counts a layer may have with `num_visual` visual tokens, ascending."""
        return sorted({int(f * num_visual + 1e-9) for f in self.fractions})

    def round_down(self, counts: Sequence[int], num_visual: int) -> list[int]:
        """Each count rounded down to the largest allowed count not above it."""
        allowed = self.counts(num_visual)
        return [max(a for a in allowed if a <= c) for c in counts]

    def apply(self, plan: ReusePlan, num_visual: int) -> ReusePlan:
        """The plan with each layer's reused set cut to its bucket (the least reusable tokens are given up)."""
        counts = self.round_down(plan.counts, num_visual)
        if counts == plan.counts:
            return plan
        rounded = plan.truncated(counts)
        rounded.info["unbucketed_counts"] = plan.counts
        return rounded
