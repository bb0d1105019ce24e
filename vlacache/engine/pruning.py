"""Dropping visual tokens inside a forward (`PruneRule`: FastV, SparseVLM), on top of the reuse machinery.

At the first prefill layer K of a rule, the engine scores the visual tokens by the attention layer K-1 of this
same forward gave them (the rule's query rows, averaged over heads; the queries were kept by a hook on that
layer's `q_proj`), lets the rule choose which to drop, and from layer K on: they leave the computed rows like
reused tokens do, and every query's mask excludes their keys (prefill and decode passes). Their cached K/V and
final hidden states hold nothing usable afterwards: the next step may not reuse them (`void`).

Composition with reuse: a rule chooses only among tokens no layer reuses, so at every layer each batch row
misses |reused_l| + |dropped| rows and the batch keeps one shape.

Recycling (`PruneRule.recycle`, SparseVLM v1.5): the tokens a rule makes from its dropped ones are computed in
dropped slots from its layer on (`recycled`); their place in the sequence is after the kept visual tokens, so
the state keeps the present slots in sequence order (`order`) and each slot's renumbered position
(`positions_at`, per layer), from which the engine takes the rotary embeddings and a causal mask by position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..types import PruneRule, TokenLayout


@dataclass
class PruneState:
    """One step's prune rules and what they dropped so far."""

    rules: dict[int, PruneRule]  # layer K -> rule
    queries: dict[int, torch.Tensor]  # layer K-1 -> query positions [B, n] whose attention ranks the tokens
    visual: torch.Tensor  # [V] positions of the visual tokens, layout order
    reused: list[torch.Tensor | None]  # per layer, bool [B, L] of the plan's reused positions
    busy: torch.Tensor  # bool [B, L]: reused at some layer, or spliced (computed but overwritten): never dropped
    dropped: torch.Tensor | None = None  # bool [B, L], grows as rules fire
    dropped_at: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> bool [B, L] dropped there
    q_rows: dict[int, torch.Tensor] = field(default_factory=dict)  # layer K-1 -> [B, H, n, d] recorded queries
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    masks: dict[int, torch.Tensor | None] = field(default_factory=dict)
    embeds: torch.Tensor | None = None  # [B, L, D] the decoder's input, kept when a rule reads it
    recycled: torch.Tensor | None = None  # bool [B, L]: dropped slots that hold a recycled token now
    order: torch.Tensor | None = None  # [B, P] the present slots in sequence order, once a rule renumbered them
    positions_at: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, L] renumbered positions
    inserts: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (slots, tokens)
    shift_at: dict[int, int] = field(default_factory=dict)  # layer -> tokens dropped there, read once per step

    def dropped_count(self, layer: int) -> int:
        """How many tokens row 0 dropped at `layer`: one host read per layer and step, not per decode pass."""
        if layer not in self.shift_at:
            self.shift_at[layer] = int(self.dropped_at[layer][0].sum())
        return self.shift_at[layer]

    @property
    def wants_embeds(self) -> bool:
        return any(rule.embeds for rule in self.rules.values())

    @classmethod
    def build(cls, rules, layout: TokenLayout, reused: list[torch.Tensor], spliced: list[torch.Tensor] | None,
              batch: int, device: torch.device) -> "PruneState | None":
        if not rules:
            return None
        length = layout.length
        masks = []
        for positions in reused:
            if positions.shape[1] == 0:
                masks.append(None)
                continue
            mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
            masks.append(mask.scatter_(1, positions.to(device), True))
        busy = (masks[-1].clone() if masks and masks[-1] is not None
                else torch.zeros(batch, length, dtype=torch.bool, device=device))
        if spliced is not None:
            busy |= spliced[-1].to(device)
        queries = {}
        for rule in rules:
            positions = layout.query_positions(rule.query)
            queries[rule.layer - 1] = positions.expand(batch, -1).contiguous().to(device)
        visual = torch.cat([span.positions() for span in layout.vision.values()]).to(device)
        return cls({r.layer: r for r in rules}, queries, visual, masks, busy)

    @property
    def gone(self) -> torch.Tensor | None:
        """Bool [B, L]: the slots no layer from the last rule on computes (dropped, not holding a recycled token)."""
        if self.dropped is None or self.recycled is None:
            return self.dropped
        return self.dropped & ~self.recycled

    def choose(self, rule: PruneRule, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply a rule to its query rows' attention over keys [B, n, L] at its scoring layer (mean over heads; or
        [B, H, n, L] for a per-head rule); returns the new dropped mask and the visual indices [B, k] it chose."""
        scores = attention[..., self.visual]
        taken = self.busy if self.gone is None else self.busy | self.gone
        eligible = ~taken[:, self.visual]
        if rule.embeds:
            queries = self.queries[rule.layer - 1]
            embeds = self.embeds.float()
            chosen = rule.choose(scores, eligible, embeds.gather(1, queries[:, :, None].expand(-1, -1, embeds.shape[-1])),
                                 embeds[:, self.visual])
        else:
            chosen = rule.choose(scores, eligible)
        if chosen.dim() != 2 or chosen.shape[0] != scores.shape[0]:
            raise ValueError(f"prune rule at layer {rule.layer} must return visual indices [B, n], got {tuple(chosen.shape)}")
        chosen = chosen.to(self.visual.device)
        if chosen.numel() and not bool(eligible.gather(1, chosen).all()):
            raise ValueError(f"prune rule at layer {rule.layer} chose a token that is reused or already dropped")
        dropped = torch.zeros_like(taken) if self.dropped is None else self.dropped.clone()
        dropped.scatter_(1, self.visual[chosen], True)
        return dropped, chosen

    def recycle(self, rule: PruneRule, layer: int, dropped: torch.Tensor, chosen: torch.Tensor, hidden: torch.Tensor,
                rows: torch.Tensor) -> torch.Tensor:
        """Put the tokens `rule.recycle` makes of the dropped `chosen` (visual indices [B, k], best first; hidden
        states `hidden` [B, K, D] at positions `rows` [B, K]) into free dropped slots, in use from `layer` on;
        returns those slots [B, C]. Sets `dropped` and `recycled`."""
        slots = self.visual[chosen]
        local = torch.searchsorted(rows, slots.contiguous())[:, :, None].expand(-1, -1, hidden.shape[-1])
        tokens = rule.recycle(hidden.gather(1, local))
        if tokens.dim() != 3 or tokens.shape[0] != slots.shape[0] or not 0 < tokens.shape[1] <= slots.shape[1]:
            raise ValueError(f"prune rule at layer {layer} must recycle [B, C, D] tokens with 0 < C <= "
                             f"{slots.shape[1]} (the tokens it dropped), got {tuple(tokens.shape)}")
        recycled = (torch.zeros_like(dropped) if self.recycled is None  # a recycled token dropped again leaves its slot
                    else self.recycled & ~torch.zeros_like(dropped).scatter(1, slots, True))
        free = rows_of_mask(~(dropped & ~recycled))[:, : tokens.shape[1]].contiguous()
        self.dropped, self.recycled = dropped, recycled.scatter(1, free, True)
        self.inserts[layer] = (free, tokens)
        return free

    def renumber(self, inserted: torch.Tensor | None, vision_end: int) -> torch.Tensor:
        """The new sequence order after a rule: the present slots in their old order, with the `inserted` slots
        [B, C] right after the last kept visual token (before position `vision_end`); returns each slot's position
        [B, L] (absent slots: L)."""
        batch, length = self.gone.shape
        order = self.order if self.order is not None else torch.arange(length, device=self.gone.device).expand(batch, -1)
        fresh = torch.zeros_like(self.gone) if inserted is None else torch.zeros_like(self.gone).scatter(1, inserted, True)
        stays = ~(self.gone | fresh).gather(1, order)
        survivors = order[stays].view(batch, -1)
        before = (survivors < vision_end).sum(dim=1)
        if bool((before != before[0]).any()):
            raise ValueError("rows of a batch keep different numbers of visual tokens; cannot renumber as one batch")
        parts = [survivors[:, : int(before[0])], survivors[:, int(before[0]):]]
        self.order = torch.cat([parts[0], *(() if inserted is None else (inserted,)), parts[1]], dim=1)
        positions = torch.full((batch, length), length, dtype=torch.long, device=order.device)
        return positions.scatter_(1, self.order, torch.arange(self.order.shape[1], device=order.device).expand(batch, -1))

    def absent(self, layer: int, gone: torch.Tensor) -> torch.Tensor:
        """Bool [B, L]: the positions layer `layer` does not compute once `gone` are out of the sequence."""
        reused = self.reused[layer]
        return gone if reused is None else reused | gone


def rows_of_mask(absent: torch.Tensor) -> torch.Tensor:
    """The computed positions [B, K] (ascending) of each row of a bool [B, L] mask of absent ones; every row must
    miss as many."""
    counts = absent.sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"rows of a batch miss different numbers of tokens ({counts.tolist()}); cannot keep one shape")
    length = absent.shape[1]
    return torch.arange(length, device=absent.device).expand_as(absent)[~absent].view(absent.shape[0], -1)


def causal_by_position(positions: torch.Tensor, rows: torch.Tensor, gone: torch.Tensor, additive_dtype=None):
    """The mask [B, 1, K, L] of query slots `rows` [B, K] over every slot when slot j holds position
    positions[:, j] [B, L]: a query attends to the present keys at its position or before (bool; additive in
    `additive_dtype` when given)."""
    own = positions.gather(1, rows)
    allowed = ((positions[:, None, :] <= own[:, :, None]) & ~gone[:, None, :])[:, None]
    if additive_dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=additive_dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(additive_dtype).min)


def exclude_keys(mask: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """An attention mask [B|1, 1, q, K] (bool: True = may attend; or additive) with the keys `dropped` [B, L]
    (the first L key positions) excluded for every query."""
    batch = dropped.shape[0]
    mask = mask.expand(batch, *mask.shape[1:])
    length = dropped.shape[1]
    columns = torch.zeros(batch, mask.shape[-1], dtype=torch.bool, device=mask.device)
    columns[:, :length] = dropped.to(mask.device)
    columns = columns[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & ~columns
    return mask.masked_fill(columns, torch.finfo(mask.dtype).min)
