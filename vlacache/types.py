"""The data that flows through one control step: observation, token layout, reuse plan, statistics."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from .errors import VlacacheError


class InputError(VlacacheError, ValueError):
    """Bad user input (images, instruction, batch); the message says what is wrong and how to fix it."""


class NonFiniteOutputError(VlacacheError, RuntimeError):
    """The model produced NaN or inf logits or actions; no actions are returned."""


@dataclass
class Observation:
    """What the robot sees at one control step.

    images: camera name -> uint8 array [H, W, 3] (or [B, H, W, 3] for a batch); float arrays in [0, 1] are
    accepted too. instruction: one string, or one per batch element. proprio: optional state vector(s).
    """

    images: Mapping[str, np.ndarray | torch.Tensor]
    instruction: str | Sequence[str]
    proprio: np.ndarray | torch.Tensor | None = None

    @classmethod
    def stack(cls, observations: Sequence["Observation"]) -> "Observation":
        """One batch (row i = observation i, e.g. env i) from single observations with the same cameras."""
        cameras = set(observations[0].images)
        if any(set(o.images) != cameras for o in observations):
            raise InputError(f"observations to batch must have the same cameras, got {[sorted(o.images) for o in observations]}")
        if not all(isinstance(o.instruction, str) for o in observations):
            raise InputError("Observation.stack takes single observations (one instruction each)")
        proprio = [o.proprio for o in observations]
        if any(p is None for p in proprio) and not all(p is None for p in proprio):
            raise InputError("either every observation to batch has proprio or none has")
        return cls(
            images={c: np.stack([np.asarray(o.images[c]) for o in observations]) for c in sorted(cameras)},
            instruction=[o.instruction for o in observations],
            proprio=None if proprio[0] is None else np.stack([np.asarray(p) for p in proprio]),
        )


@dataclass(frozen=True)
class Span:
    """A half-open range of sequence positions [start, stop)."""

    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def positions(self) -> torch.Tensor:
        return torch.arange(self.start, self.stop)


@dataclass(frozen=True)
class VisionSpan(Span):
    """The patch tokens of one camera: row-major over a (rows, cols) grid of patch_size-pixel patches."""

    rows: int = 0
    cols: int = 0
    patch_size: int = 0


QUERY_ROWS = ("text", "last", "after-vision")  # the kinds of query rows attention statistics are read from


@dataclass(frozen=True)
class TokenLayout:
    """Where everything sits in the decoder's input sequence. Built by the backbone; nothing is hard-coded."""

    length: int
    vision: Mapping[str, VisionSpan]
    text: Span
    extra: Mapping[str, Span] = field(default_factory=dict)

    @property
    def num_visual(self) -> int:
        return sum(len(s) for s in self.vision.values())

    def query_positions(self, query: str) -> torch.Tensor:
        """Positions [n] of a kind of query rows: 'text' (the instruction), 'last' (the last position) or
        'after-vision' (every position after the last visual token)."""
        if query == "text":
            return self.text.positions()
        if query == "last":
            return torch.tensor([self.length - 1])
        if query == "after-vision":
            return torch.arange(max(span.stop for span in self.vision.values()), self.length)
        raise ValueError(f"query rows must be 'text', 'last' or 'after-vision', got {query!r}")

    def patch_grid(self, camera: str, positions: torch.Tensor) -> torch.Tensor:
        """Boolean [B, rows, cols] map of which patches of `camera` are among `positions` [B, n]."""
        span = self.vision[camera]
        grid = torch.zeros(positions.shape[0], len(span), dtype=torch.bool)
        local = positions.cpu() - span.start
        inside = (local >= 0) & (local < len(span))
        for b in range(positions.shape[0]):
            grid[b, local[b][inside[b]]] = True
        return grid.view(-1, span.rows, span.cols)


@dataclass(frozen=True)
class PruneRule:
    """Drop visual tokens from decoder layer `layer` on: they are not computed there or deeper, and no query
    attends to their keys (FastV's "mask out the discarded tokens"). Decided inside the forward, from the
    attention the tokens receive at layer `layer - 1` of the same forward: `choose(attention, eligible)` gets the
    attention [B, n, V] of the `query` rows ('last' = the last prompt position, 'text' = the instruction's tokens,
    'after-vision' = every position after the last visual token; mean over heads) to the V visual tokens in layout
    order and eligible [B, V] (not reused, not dropped yet), and returns the visual indices [B, k] to drop, the
    same k in every row. per_head: the attention comes per head, [B, H, n, V]; rope_corrected: divided
    elementwise by the RoPE-only scores of the same rows and keys (queries and keys all ones, rotated at their
    positions, scaled: SparseVLM v2.0's "gravity" correction); embeds: `choose` also gets the decoder's input
    embeddings of the query rows [B, n, D] and of the visual tokens [B, V, D]. recycle (SparseVLM v1/v1.5): gets
    the hidden states [B, k, D] entering layer `layer` of the tokens `choose` dropped, in the order it returned
    them (best-rated first), and returns tokens [B, C, D] (C <= k) that take their place: from `layer` on they
    follow the kept visual tokens, and every position is renumbered contiguously in that order (causal decoders
    without reuse only; decode passes see the renumbered cache)."""

    layer: int
    choose: Callable[..., torch.Tensor]
    query: str = "last"
    per_head: bool = False
    rope_corrected: bool = False
    embeds: bool = False
    recycle: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class ReusePlan:
    """Which sequence positions reuse last step's K/V at each decoder layer.

    reused[l] is a LongTensor [B, n_l] of sorted positions; the sets are nested (reused[l-1] is a subset of
    reused[l]) because a token whose hidden state was not computed at layer l cannot be computed later.
    order (optional) [B, N]: the deepest layer's positions, most reusable first, such that layer l reuses the
    first n_l of them; `truncated` gives up the least reusable ones first. Without it, a token that enters the
    reused set at a deeper layer counts as less reusable, ties by position.
    spliced (batched episodes, `combine`) per layer a bool mask [B, L] of the positions whose K/V each row takes
    from its previous step: a superset of reused[l]. Rows reuse different numbers of tokens, but a batch drops
    the same number of rows in each (reused[l], the rows' common prefix); a row computes the tokens it reuses
    beyond that, and the splice overwrites them, so each row gets exactly what its own plan gives.
    """

    reused: list[torch.Tensor]
    info: dict = field(default_factory=dict)
    order: torch.Tensor | None = None
    spliced: list[torch.Tensor] | None = None
    prune: tuple[PruneRule, ...] = ()  # in-forward token dropping, by layer (the policy's pruner)
    row_counts: list[list[int]] | None = None  # `combine`: per batch row, the counts of its own plan

    @classmethod
    def combine(cls, plans: Sequence["ReusePlan"], length: int) -> "ReusePlan":
        """One plan for a batch of independent episodes from each row's own plan (batch 1 each)."""
        if len(plans) == 1:
            return plans[0]
        if any(p.reused[0].shape[0] != 1 or p.spliced is not None for p in plans):
            raise ValueError("ReusePlan.combine takes one single-row plan per batch row")
        if any(p.prune != plans[0].prune for p in plans):
            raise ValueError("the rows of a batch must share their prune rules (one policy)")
        layers = plans[0].num_layers
        common = [min(p.counts[layer] for p in plans) for layer in range(layers)]
        deepest = common[-1] if common else 0
        plan = cls.from_order(torch.cat([p.priority()[:, :deepest] for p in plans]), common)
        if any(p.counts != common for p in plans):
            plan.spliced = []
            for layer in range(layers):
                mask = torch.zeros(len(plans), length, dtype=torch.bool)
                for row, p in enumerate(plans):
                    mask[row, p.reused[layer][0].cpu()] = True
                plan.spliced.append(mask)
        plan.row_counts = [p.counts for p in plans]
        plan.info["rows"] = [p.info for p in plans]
        plan.prune = plans[0].prune
        return plan

    @classmethod
    def from_order(cls, order: torch.Tensor, counts: Sequence[int]) -> "ReusePlan":
        """Layer l reuses the first counts[l] positions of `order` [B, N] (counts non-decreasing)."""
        if any(b < a for a, b in zip(counts, counts[1:])) or (counts and counts[-1] > order.shape[1]):
            raise ValueError(f"reuse counts must be non-decreasing and at most {order.shape[1]}, got {list(counts)}")
        reused: list[torch.Tensor] = []
        for layer, count in enumerate(counts):  # layers with the count of the one above share its tensor
            same = layer > 0 and count == counts[layer - 1]
            reused.append(reused[-1] if same else torch.sort(order[:, :count], dim=1).values)
        return cls(reused, order=order[:, : counts[-1]] if counts else order[:, :0])

    def stale(self, length: int) -> torch.Tensor | None:
        """[B, L] bool: the positions whose deepest-layer K/V come from an earlier step (None: nothing reused)."""
        if not self.reused or (self.reused[-1].shape[1] == 0 and self.spliced is None):
            return None
        mask = torch.zeros(self.reused[-1].shape[0], length, dtype=torch.bool)
        mask.scatter_(1, self.reused[-1].cpu(), True)
        if self.spliced is not None:
            mask |= self.spliced[-1].cpu()
        return mask

    def priority(self) -> torch.Tensor:
        """`order`, or the order implied by the nesting: earlier layer first, then position."""
        if self.order is not None:
            return self.order
        parts, previous = [], None
        for reused in self.reused:
            new = reused if previous is None else reused[~_row_isin(reused, previous)].view(reused.shape[0], -1)
            parts.append(new)
            previous = reused
        return torch.cat(parts, dim=1) if parts else torch.empty(0, 0, dtype=torch.long)

    def truncated(self, counts: Sequence[int]) -> "ReusePlan":
        """This plan reusing only `counts[l]` (<= its own count) positions at layer l: fewer, never others."""
        if self.spliced is not None:
            raise ValueError("truncate each row's plan before combining them (ReusePlan.combine)")
        if len(counts) != self.num_layers or any(c > n or c < 0 for c, n in zip(counts, self.counts)):
            raise ValueError(f"truncated counts {list(counts)} must lie between 0 and the plan's counts {self.counts}")
        plan = ReusePlan.from_order(self.priority(), counts)
        plan.info = dict(self.info)
        plan.prune = self.prune
        return plan

    @classmethod
    def empty(cls, batch_size: int, num_layers: int, device: torch.device | str = "cpu") -> "ReusePlan":
        none = torch.empty(batch_size, 0, dtype=torch.long, device=device)
        return cls([none] * num_layers)

    @property
    def num_layers(self) -> int:
        return len(self.reused)

    @property
    def counts(self) -> list[int]:
        return [int(r.shape[1]) for r in self.reused]

    def counts_per_row(self, batch_size: int) -> list[list[int]]:
        """Each batch row's reused count per layer (its own plan's, for a combined plan)."""
        return self.row_counts if self.row_counts is not None else [self.counts] * batch_size

    @property
    def is_empty(self) -> bool:
        """Nothing reused in any row."""
        return all(c == 0 for c in self.counts) and (self.spliced is None or not any(bool(m.any()) for m in self.spliced))

    def validate(self, batch_size: int, num_layers: int, seq_len: int) -> None:
        """Raise ValueError unless the plan fits the model and sequence and its sets are nested. The value checks
        of all layers are read back at once (one host sync); a layer that holds the same tensor as the one above
        is checked once."""
        if self.num_layers != num_layers:
            raise ValueError(f"ReusePlan has {self.num_layers} layers but the decoder has {num_layers}")
        checks: list[tuple[torch.Tensor, str]] = []
        previous = None
        for layer, r in enumerate(self.reused):
            if r.dim() != 2 or r.shape[0] != batch_size:
                raise ValueError(f"ReusePlan layer {layer}: expected [batch={batch_size}, n] positions, got {tuple(r.shape)}")
            nested = (f"ReusePlan is not nested at layer {layer}: every position reused at layer {layer - 1} "
                      "must stay reused at deeper layers")
            if r is previous:
                continue
            if r.numel():
                checks.append(((r.min() >= 0) & (r.max() < seq_len),
                               f"ReusePlan layer {layer}: positions must lie in [0, {seq_len})"))
            if r.shape[1] > 1:
                checks.append(((r[:, 1:] > r[:, :-1]).all(), f"ReusePlan layer {layer}: positions must be sorted and unique"))
            if previous is not None and previous.shape[1]:
                if r.shape[1] < previous.shape[1]:
                    raise ValueError(nested)
                checks.append((_row_isin(previous, r.to(previous.device)).all(), nested))
            previous = r
        if checks and not bool(torch.stack([ok.to(checks[0][0].device) for ok, _ in checks]).all()):
            raise ValueError(next(message for ok, message in checks if not bool(ok)))
        if self.spliced is not None:
            self._validate_spliced(batch_size, seq_len)
        layers = [rule.layer for rule in self.prune]
        if layers != sorted(set(layers)) or any(not 1 <= k < num_layers for k in layers):
            raise ValueError(f"prune rules must name distinct decoder layers in 1..{num_layers - 1}, in order; got {layers}")

    def _validate_spliced(self, batch_size: int, seq_len: int) -> None:
        previous = None
        for layer, (mask, reused) in enumerate(zip(self.spliced, self.reused)):
            if mask.dtype != torch.bool or tuple(mask.shape) != (batch_size, seq_len):
                raise ValueError(f"ReusePlan layer {layer}: spliced must be a bool mask [{batch_size}, {seq_len}], "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
            if reused.shape[1] and not bool(mask.gather(1, reused.to(mask.device)).all()):
                raise ValueError(f"ReusePlan layer {layer}: every reused position must also be spliced")
            if previous is not None and bool((previous & ~mask).any()):
                raise ValueError(f"ReusePlan is not nested at layer {layer}: a spliced position must stay spliced")
            previous = mask


def _row_isin(elements: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """torch.isin per batch row: [B, n] bool, whether elements[b, i] is in test[b]."""
    return (elements[:, :, None] == test[:, None, :]).any(-1)


@dataclass
class AttentionStats:
    """Attention statistics of one step, recomputed for a few query rows (the probe), used by the next step.

    to_keys[layer]: [B, L] attention over key positions, averaged over heads and query rows.
    entropy[layer]: [B] attention entropy (nats). entropy_rows 'query': each head's entropy over the query rows,
    averaged; 'computed': the entropy of the head-averaged attention of every row the layer computed, averaged
    over those rows (the public reference code's statistic, `StatsRequest.entropy`).
    """

    to_keys: dict[int, torch.Tensor]
    entropy: dict[int, torch.Tensor]
    query: str = "text"
    entropy_rows: str = "query"

    def row(self, index: int) -> "AttentionStats":
        """The statistics of one batch row (as a batch of 1)."""
        return dataclasses.replace(self, to_keys={layer: t[index : index + 1] for layer, t in self.to_keys.items()},
                                   entropy={layer: e[index : index + 1] for layer, e in self.entropy.items()})


@dataclass
class StepStats:
    """Honest numbers for one control step."""

    step: int
    reused_per_layer: list[int]
    tokens_per_layer: list[int]
    num_visual: int
    reuse_ratio: float
    flops: dict[str, float]
    latency_ms: dict[str, float]
    device_ms: float | None = None
    episode_reset: bool = False
    # of the reused tokens: queries since computed (reused_age_*), the same in env steps (reused_age_env_steps_*:
    # times the executed chunk), pixel drift to that frame (engine/staleness.py)
    staleness: dict | None = None
    dropped_per_layer: list[int] | None = None  # visual tokens dropped per layer by the policy's pruner (None: no pruner)

    def as_dict(self) -> dict:
        return {
            "step": self.step,
            "reused_per_layer": self.reused_per_layer,
            "tokens_per_layer": self.tokens_per_layer,
            "num_visual": self.num_visual,
            "reuse_ratio": self.reuse_ratio,
            "flops": self.flops,
            "latency_ms": self.latency_ms,
            "device_ms": self.device_ms,
            "episode_reset": self.episode_reset,
            "staleness": self.staleness,
            "dropped_per_layer": self.dropped_per_layer,
        }
