"""The cache engine: VLA-Cache applied to a stock transformers decoder through forward hooks.

Per step: a `ReuseCache` splices last step's K/V into reused positions; a pre-hook on every decoder layer drops
the rows reused at that layer and gathers the matching rotary embeddings, position ids and mask rows; a hook
on each probed layer's `q_proj` keeps the query rows the probe needs; a hook on the decoder scatters the final
hidden states back to full length, summarizes the probed attention rows (`probe.py`) and ends the prefill.
No modeling code is copied.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial, reduce
from typing import Any

import torch
from torch import nn

from .probe import apply_rotary, attention_scores, computed_rows_entropy, query_heads, summarize_layers
from .pruning import PruneState, causal_by_position, exclude_keys, rows_of_mask
from .reuse_cache import ReuseCache
from ..patches import known_patch_vectors, remember_patch_vectors
from .episode import EpisodeState
from .staleness import advance as advance_staleness
from ..strategy import PlanContext
from ..types import QUERY_ROWS, AttentionStats, ReusePlan, TokenLayout

SUPPORTED_ATTENTION = ("sdpa", "eager")


STATS_ENTROPIES = ("query", "computed")


@dataclass(frozen=True)
class StatsRequest:
    """Which attention statistics the probe records: layers (None = all); query rows: 'text' (the instruction),
    'last' (the last position) or 'after-vision' (the positions right after the last visual token), the first
    `query_rows` of them when given; entropy: 'query' (per head over the query rows, averaged) or 'computed'
    (of the head-averaged attention over every row each layer computes: `AttentionStats`)."""

    layers: tuple[int, ...] | None = None
    query: str = "text"
    query_rows: int | None = None
    entropy: str = "query"

    def __post_init__(self) -> None:
        if self.query not in QUERY_ROWS:
            raise ValueError(f"StatsRequest: query must be one of {QUERY_ROWS}, got {self.query!r}")
        if self.entropy not in STATS_ENTROPIES:
            raise ValueError(f"StatsRequest: entropy must be one of {STATS_ENTROPIES}, got {self.entropy!r}")
        if self.query_rows is not None and (isinstance(self.query_rows, bool) or not isinstance(self.query_rows, int)
                                            or self.query_rows < 1):
            raise ValueError(f"StatsRequest: query_rows must be a positive number of rows or None, got {self.query_rows!r}")

    def positions(self, layout: TokenLayout) -> torch.Tensor:
        """The query rows' positions [n] in a step of this layout."""
        positions = layout.query_positions(self.query)
        positions = positions if self.query_rows is None else positions[: self.query_rows]
        if positions.numel() == 0:
            raise ValueError(f"StatsRequest: no '{self.query}' query rows in a step of {layout.length} positions")
        return positions


@dataclass
class StepRecord:
    """What the engine reports about one step."""

    reused_per_layer: list[int]
    tokens_per_layer: list[int]
    stats: AttentionStats | None
    staleness: dict | None = None
    dropped_per_layer: list[int] | None = None


@dataclass
class _ActiveStep:
    cache: ReuseCache
    layout: TokenLayout
    batch_size: int
    counts: list[int]
    kept: list[torch.Tensor | None]
    select: list[torch.Tensor | None]
    query_positions: torch.Tensor | None
    probe_layers: frozenset[int]
    final_splice: torch.Tensor | None = None
    in_prefill: bool = True
    memo: dict = field(default_factory=dict)
    q_rows: dict[int, torch.Tensor] = field(default_factory=dict)
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    masks: dict[int, torch.Tensor | None] = field(default_factory=dict)
    to_keys: dict[int, torch.Tensor] = field(default_factory=dict)
    entropy: dict[int, torch.Tensor] = field(default_factory=dict)
    request: StatsRequest | None = None
    computed_rows: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    final_hidden: torch.Tensor | None = None
    prune: PruneState | None = None
    spliced: list[torch.Tensor] | None = None
    absent: list[int] = field(default_factory=list)  # per layer, rows not computed (reused or dropped)


def decoder_layers(decoder: nn.Module) -> nn.ModuleList:
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"{type(decoder).__name__} has no `layers` ModuleList; pass the decoder model itself "
            "(e.g. LlamaForCausalLM(...).model), not the causal-LM wrapper"
        )
    return layers


class CacheEngine:
    """Attaches VLA-Cache to a stock decoder (e.g. `LlamaModel`) and owns the per-episode cache state.

    Use as a context manager or call `attach()` / `detach()`. Each control step: `begin_step(plan, layout)`
    returns the cache to pass to the model, run prefill (+ decode), then `end_step(images)`.
    """

    def __init__(self, decoder: nn.Module, readers: list[nn.Module] | tuple = ()) -> None:
        self.decoder = decoder
        self.layers = decoder_layers(decoder)
        # decoders that read the prompt cache after the prefill (π0's action expert): dropped keys stay out of
        # their queries as out of the decode passes'
        self.readers = [decoder_layers(reader) for reader in readers]
        attn = getattr(decoder.config, "_attn_implementation", None) or "eager"
        if attn not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"attention implementation '{attn}' is not supported by the cache engine; load the model with "
                f"attn_implementation='sdpa' (recommended) or 'eager'"
            )
        self._additive_mask = attn == "eager"
        self._attached = False
        self._handles: list[Any] = []
        self._step: _ActiveStep | None = None
        self.episode = EpisodeState()

    # -- attachment ---------------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return self._attached

    def attach(self) -> "CacheEngine":
        """Take part in the model's steps from now on. Hooks go on per step, on the layers that step needs
        (`begin_step`), and come off when it ends: between steps the model carries none."""
        self._attached = True
        return self

    @property
    def hooks_attached(self) -> int:
        """How many hooks the engine holds on the model now (0 between steps)."""
        return len(self._handles)

    @contextmanager
    def hooks_lifted(self):
        """Run a block without the hooks (a compiled decode graph must not trace them); the step's state stays."""
        if not self._handles:
            yield
            return
        self._remove_hooks()
        try:
            yield
        finally:
            self._register(self._step)

    def _register(self, step: "_ActiveStep") -> None:
        """Hooks for this step only: a pre-hook on each layer that cuts rows, records what a probe or prune rule
        reads, or (after pruning) keeps dropped keys out of decode passes; a q_proj hook where query rows are
        recorded; the decoder's hook, which ends the prefill."""
        prune = step.prune
        pruned_from = min(prune.rules) if prune is not None else self.num_layers
        wanted = set(step.probe_layers) | {i for i, rows in enumerate(step.kept) if rows is not None}
        wanted |= set(range(pruned_from, self.num_layers))
        queried = set(step.probe_layers)
        if prune is not None:
            wanted |= set(prune.queries) | ({0} if prune.wants_embeds else set())
            queried |= set(prune.queries)
        for index in sorted(wanted):
            self._handles.append(self.layers[index].register_forward_pre_hook(partial(self._before_layer, index),
                                                                             with_kwargs=True))
        for index in sorted(queried):
            self._handles.append(self.layers[index].self_attn.q_proj.register_forward_hook(partial(self._after_q_proj, index)))
        self._handles.append(self.decoder.register_forward_hook(self._after_decoder))
        for layers in self.readers:
            for index in range(pruned_from, min(self.num_layers, len(layers))):
                self._handles.append(layers[index].register_forward_pre_hook(partial(self._reader_layer, index),
                                                                             with_kwargs=True))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def detach(self) -> None:
        self._remove_hooks()
        self._attached = False
        self._step = None

    def __enter__(self) -> "CacheEngine":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- episode state ------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything from earlier steps: the next step is a full forward."""
        self.episode = EpisodeState()
        self._remove_hooks()
        self._step = None

    def reset_rows(self, rows: list[int]) -> None:
        """Start a new episode in these batch rows only; the other rows keep their caches."""
        episode = self.episode
        for row in rows:
            if not 0 <= row < len(episode.steps):
                raise IndexError(f"batch row {row} does not exist; this batch has rows 0..{len(episode.steps) - 1}")
            episode.steps[row] = 0
            episode.fresh.add(row)

    def keep_rows(self, rows: list[int]) -> None:
        """The batch goes on with these rows only (episodes that ended elsewhere leave it): their state is kept,
        in this order, and the next step may have len(rows) rows without resetting them."""
        episode = self.episode
        if episode.row_keys is None:
            return
        if not rows or any(not 0 <= r < len(episode.row_keys) for r in rows) or len(set(rows)) != len(rows):
            raise IndexError(f"keep_rows needs distinct rows of 0..{len(episode.row_keys) - 1}, got {rows}")
        self.episode = episode.rows(rows)

    def sync_episode(self, key: tuple, row_keys: list | tuple | None = None) -> list[bool]:
        """Reset automatically: all rows when the shared key (batch size, image sizes, prompt length) changes,
        one row when its own key (instruction) changes. Returns, per row, whether it starts an episode now."""
        row_keys = list(row_keys) if row_keys is not None else [None]
        if self.episode.key != key or self.episode.row_keys is None or len(self.episode.row_keys) != len(row_keys):
            self.reset()
            self.episode.key, self.episode.row_keys = key, row_keys
            self.episode.steps = [0] * len(row_keys)
            self.episode.fresh = set(range(len(row_keys)))
        else:
            changed = [i for i, (old, new) in enumerate(zip(self.episode.row_keys, row_keys)) if old != new]
            self.reset_rows(changed)
            self.episode.row_keys = row_keys
        return [row in self.episode.fresh for row in range(len(row_keys))]

    def recover_unfinished_step(self) -> bool:
        """If the previous step never finished (an exception mid-step), distrust what it left: every row starts
        a new episode (same instructions and shapes). Returns whether it had to."""
        if self._step is None:
            return False
        key, rows = self.episode.key, self.episode.row_keys
        self.reset()
        if rows is not None:
            self.sync_episode(key, rows)
        return True

    def plan_context(self, row: int, current: dict[str, torch.Tensor], layout: TokenLayout,
                     env_steps_per_query: int = 1) -> PlanContext:
        """What a policy plans batch row `row`'s step from (`EpisodeState.plan_context`)."""
        return self.episode.plan_context(row, current, layout, self.num_layers, env_steps_per_query)

    @property
    def in_step(self) -> bool:
        return self._step is not None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def keys_dropped(self, num_keys: int) -> torch.Tensor | None:
        """The running step's dropped keys per layer, bool [layers, B, num_keys] (positions past the prompt: never
        dropped), for a decode pass that runs without the hooks; None when the step dropped nothing."""
        step = self._step
        if step is None or step.prune is None or not step.prune.dropped_at:
            return None
        if step.prune.positions_at:
            raise ValueError("this step's pruner recycles tokens and renumbers positions (SparseVLM v1.5), which "
                             "the compiled decode passes cannot follow; run it without compile=True")
        some = next(iter(step.prune.dropped_at.values()))
        out = torch.zeros(self.num_layers, some.shape[0], num_keys, dtype=torch.bool, device=some.device)
        for layer, dropped in step.prune.dropped_at.items():
            out[layer, :, : dropped.shape[1]] = dropped
        return out

    # -- one step -----------------------------------------------------------------------------------------
    def new_cache(self) -> ReuseCache:
        try:
            return ReuseCache(config=self.decoder.config)
        except TypeError:
            return ReuseCache()

    def begin_step(
        self, plan: ReusePlan | None, layout: TokenLayout, batch_size: int, request: StatsRequest | None = None
    ) -> ReuseCache:
        """Prepare the hooks for one prefill and return the cache the model must be called with."""
        if not self.attached:
            raise RuntimeError("CacheEngine.begin_step() needs the engine attached: call attach() first")
        if self.recover_unfinished_step() and plan is not None and not plan.is_empty:
            raise RuntimeError("the previous step did not finish, so its K/V cannot be reused; this step must be full")
        plan = plan if plan is not None else ReusePlan.empty(batch_size, self.num_layers)
        plan.validate(batch_size, self.num_layers, layout.length)
        if not plan.is_empty:
            self._check_reusable(layout, batch_size)
        void = self.episode.signals.get("void")
        if void is not None and not plan.is_empty:
            stale = plan.stale(layout.length)
            if stale is not None and stale.shape == void.shape and bool((stale & void.cpu()).any()):
                raise ValueError("the plan reuses tokens dropped at the previous step (their K/V are void); "
                                 "exclude PlanContext.void from the candidates")
        if any(rule.recycle is not None for rule in plan.prune) and (not plan.is_empty or request is not None):
            raise ValueError("a recycling prune rule (SparseVLM v1.5) renumbers every position, so nothing can be "
                             "reused beside it and no attention statistics recorded; use selector 'none' with it")
        cache = self.new_cache()
        cache.length = layout.length
        device = next(self.decoder.parameters()).device
        kept, select = self._row_maps(plan, layout.length, batch_size, device)
        final_splice = None
        for layer, rows in enumerate(kept):
            pad = None
            if plan.spliced is not None and bool(plan.spliced[layer].any()):
                spliced = plan.spliced[layer].to(device)
                pad = spliced if rows is None else spliced.gather(1, rows)  # computed, but this row reuses them
                final_splice = spliced
            if rows is not None or pad is not None:
                k, v = self.episode.prompt_kv[layer]
                cache.splice[layer] = (k, v, rows, pad)
        probe_layers = frozenset()
        query_positions = None
        if request is not None:
            probe_layers = frozenset(range(self.num_layers) if request.layers is None else request.layers)
            bad = sorted(i for i in probe_layers if not 0 <= i < self.num_layers)
            if bad:
                raise ValueError(f"attention statistics requested for layers {bad}, "
                                 f"but the decoder has layers 0..{self.num_layers - 1}")
            query_positions = request.positions(layout).expand(batch_size, -1).contiguous().to(device)
        self._step = _ActiveStep(
            cache=cache,
            layout=layout,
            batch_size=batch_size,
            counts=plan.counts,
            kept=kept,
            select=select,
            query_positions=query_positions,
            probe_layers=probe_layers,
            request=request,
            final_splice=final_splice,  # the deepest layer's mask (masks are nested)
            prune=PruneState.build(plan.prune, layout, plan.reused, plan.spliced, batch_size, device),
            spliced=plan.spliced,
            absent=list(plan.counts),
        )
        self._register(self._step)
        return cache

    def end_step(self, images: dict[str, torch.Tensor] | None = None, plan: ReusePlan | None = None,
                 signals: dict[str, torch.Tensor] | None = None) -> StepRecord:
        """Close the step: keep its K/V, final hidden states, attention statistics and query images, (given
        the images and the step's plan) how stale each visual token's K/V now are, and what the step gave
        (`signals`, batch-first: its actions and logit margin, for the next plan's gates)."""
        step = self._step
        if step is None or step.in_prefill:
            raise RuntimeError("end_step() without a finished prefill: call begin_step() and run the model first")
        length = step.layout.length
        self.episode.prompt_kv = {
            layer: (k[:, :, :length], v[:, :, :length]) for layer, (k, v) in step.cache.prefill_kv.items()
        }
        self.episode.final_hidden = step.final_hidden
        self.episode.stats = (
            AttentionStats(*on_host(step.to_keys, step.entropy), query=step.request.query,
                           entropy_rows=step.request.entropy)
            if step.probe_layers else None
        )
        staleness = None
        if images is not None:
            self.episode.previous_images = {name: image.detach().clone() for name, image in images.items()}
            for name, span in step.layout.vision.items():  # the copies' patch vectors are the originals'
                known = known_patch_vectors(images[name], span.rows, span.cols)
                if known is not None:
                    remember_patch_vectors(self.episode.previous_images[name], span.rows, span.cols, *known)
            stale = plan.stale(length) if plan is not None else None
            # this step's own images (not the copies): the selector compared the same tensors, so their patch
            # similarities are not computed again; the anchors come out as new tensors
            self.episode.staleness, staleness = advance_staleness(self.episode.staleness, images, stale, step.layout)
        prune = step.prune
        dropped = prune.dropped if prune is not None else None
        void = torch.zeros(step.batch_size, length, dtype=torch.bool) if dropped is None else dropped.cpu()
        self.advance({**(signals if signals is not None else self.episode.signals), "void": void})
        self._remove_hooks()
        self._step = None
        return StepRecord(
            reused_per_layer=step.counts,
            tokens_per_layer=[length - c for c in step.absent],
            stats=self.episode.stats,
            staleness=staleness,
            dropped_per_layer=None if prune is None else
            [prune.dropped_count(i) if i in prune.dropped_at else 0 for i in range(self.num_layers)],
        )

    def advance(self, signals: dict[str, torch.Tensor] | None = None, untouched: bool = False) -> None:
        """One step done in every row: none is fresh any more; `signals`: what it gave (kept for the next plan);
        `untouched`: it ran without the engine (the cost guard), so nothing of it is kept to reuse."""
        if signals is not None:
            self.episode.signals = signals
        self.episode.steps = [n + 1 for n in self.episode.steps] or [1]
        self.episode.fresh.clear()
        self.episode.untouched = untouched

    # -- internals ----------------------------------------------------------------------------------------
    def _check_reusable(self, layout: TokenLayout, batch_size: int) -> None:
        kv = self.episode.prompt_kv
        if len(kv) != self.num_layers or self.episode.final_hidden is None:
            raise RuntimeError("a reuse plan needs a previous step in this episode; the first step must be full")
        k = kv[0][0]
        if k.shape[0] != batch_size or k.shape[2] != layout.length:
            raise RuntimeError(
                f"previous step had batch {k.shape[0]} x {k.shape[2]} tokens, this one {batch_size} x {layout.length}; "
                "reset() the engine between episodes"
            )

    @staticmethod
    def _row_maps(plan: ReusePlan, length: int, batch_size: int, device: torch.device):
        """Per layer: kept positions [B, K_l] (None: nothing reused) and the rows of the previous layer to keep,
        built once per step on the CPU and moved to the model's device once (never inside a layer hook)."""
        kept: list[torch.Tensor | None] = []
        select: list[torch.Tensor | None] = []
        previous: torch.Tensor | None = None
        previous_count = 0
        for reused in plan.reused:
            count = reused.shape[1]
            if count == 0:
                kept.append(None)
                select.append(None)
                continue
            if count == previous_count:
                kept.append(previous)
                select.append(None)
                continue
            reused = reused.cpu()
            keep = torch.ones(batch_size, length, dtype=torch.bool)
            keep.scatter_(1, reused, False)
            rows = torch.arange(length).expand(batch_size, length)[keep].view(batch_size, length - count)
            select.append(rows if previous is None else torch.searchsorted(previous, rows))
            kept.append(rows)
            previous, previous_count = rows, count
        moved = {id(t): t.to(device) for t in kept + select if t is not None}
        return [moved[id(t)] if t is not None else None for t in kept], [moved[id(t)] if t is not None else None for t in select]

    def _rows_of(self, tensor: torch.Tensor, rows: torch.Tensor, dim: int) -> torch.Tensor:
        """Gather `rows` [B, K] along `dim` of a tensor whose batch dim may be 1 (broadcast)."""
        batch = rows.shape[0]
        tensor = tensor.expand(batch, *tensor.shape[1:])
        shape = [1] * tensor.dim()
        shape[0], shape[dim] = batch, rows.shape[1]
        index = rows.to(tensor.device).view(shape).expand(*[rows.shape[1] if d == dim else s for d, s in enumerate(tensor.shape)])
        return tensor.gather(dim, index)

    def _mask_rows(self, layer: nn.Module, mask: torch.Tensor | None, rows: torch.Tensor, length: int, dtype) -> torch.Tensor:
        """The attention-mask rows of query positions `rows` [B, K] against all `length` keys: [B, 1, K, L]."""
        if mask is not None:
            return self._rows_of(mask, rows, dim=2)
        if getattr(layer.self_attn, "is_causal", True):
            allowed = torch.arange(length, device=rows.device)[None, None, :] <= rows[:, :, None]
        else:
            allowed = torch.ones(rows.shape[0], rows.shape[1], length, dtype=torch.bool, device=rows.device)
        allowed = allowed[:, None]
        if self._additive_mask:
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
        return allowed

    def _before_layer(self, index: int, layer: nn.Module, args: tuple, kwargs: dict):
        step = self._step
        if step is None:
            return None
        if not step.in_prefill:
            return self._decode_without_dropped(step, index, args, kwargs)
        prune = step.prune
        if prune is not None:
            if index == 0 and prune.wants_embeds:  # the decoder's input, before any row is cut
                prune.embeds = args[0] if args else kwargs["hidden_states"]
            if index in prune.queries:  # a rule's scoring layer: the full-length rotary table and mask
                prune.rope = prune.rope or kwargs["position_embeddings"]
                prune.masks[index] = kwargs.get("attention_mask")
            if index in prune.rules:
                self._apply_rule(step, index, args[0] if args else kwargs["hidden_states"])
        if index in step.probe_layers:  # the full-length rotary table and mask, before this hook cuts them
            step.rope = step.rope or kwargs["position_embeddings"]
            step.masks[index] = kwargs.get("attention_mask")
        if step.kept[index] is None:
            return None
        rows = step.kept[index]
        hidden = args[0] if args else kwargs["hidden_states"]
        if step.select[index] is not None:
            select = step.select[index]
            hidden = hidden.gather(1, select[:, :, None].expand(-1, -1, hidden.shape[-1]))
        if prune is not None and index in prune.inserts:  # recycled tokens enter their slots
            slots, tokens = prune.inserts[index]
            local = torch.searchsorted(rows, slots)[:, :, None].expand(-1, -1, hidden.shape[-1])
            hidden = hidden.scatter(1, local, tokens.to(hidden.dtype))
        count = step.absent[index]
        positions = prune.positions_at.get(index) if prune is not None else None
        renumbered = None if positions is None else id(positions)
        cos, sin = kwargs["position_embeddings"]
        memo_key = ("rope", count, renumbered)
        if memo_key not in step.memo:
            at = rows if positions is None else positions.gather(1, rows)
            step.memo[memo_key] = (self._rows_of(cos, at, 1), self._rows_of(sin, at, 1))
        kwargs["position_embeddings"] = step.memo[memo_key]
        mask = kwargs.get("attention_mask")
        dropped = prune.dropped_at.get(index) if prune is not None else None
        mask_key = ("mask", count, id(mask), None if dropped is None else id(dropped), renumbered)
        if mask_key not in step.memo:
            if positions is not None:
                rows_mask = causal_by_position(positions, rows, dropped, hidden.dtype if self._additive_mask else None)
            else:
                rows_mask = self._mask_rows(layer, mask, rows, step.layout.length, hidden.dtype)
                rows_mask = rows_mask if dropped is None else exclude_keys(rows_mask, dropped)
            step.memo[mask_key] = rows_mask
        kwargs["attention_mask"] = step.memo[mask_key]
        for name in ("position_ids", "cache_position"):
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.dim() == 2:
                kwargs[name] = self._rows_of(value, rows, 1)
            elif isinstance(value, torch.Tensor) and value.dim() == 1:
                kwargs[name] = value[rows[0]]
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _apply_rule(self, step: _ActiveStep, layer: int, hidden: torch.Tensor) -> None:
        """Score the visual tokens by layer-1's attention in this forward, let the rule drop some (and recycle
        them, from `hidden`, the states entering `layer`), and take them out of every layer from `layer` on (rows,
        masks, positions, the cache's splice)."""
        prune, length, batch = step.prune, step.layout.length, step.batch_size
        rule, scoring = prune.rules[layer], layer - 1
        queries = prune.queries[scoring]
        attn = self.layers[scoring].self_attn
        if rule.recycle is not None and prune.order is None:
            self._require_causal(scoring, length)
        positions = prune.positions_at.get(scoring)
        at = queries if positions is None else positions.gather(1, queries)
        cos, sin = prune.rope
        rotated = apply_rotary(attn, prune.q_rows.pop(scoring), self._rows_of(cos, at, 1), self._rows_of(sin, at, 1))
        if positions is not None:
            mask_rows = causal_by_position(positions, queries, prune.dropped_at[scoring],
                                           rotated.dtype if self._additive_mask else None)
        else:
            mask_rows = self._mask_rows(self.layers[scoring], prune.masks.get(scoring), queries, length, rotated.dtype)
            if scoring in prune.dropped_at:
                mask_rows = exclude_keys(mask_rows, prune.dropped_at[scoring])
        keys = step.cache.prefill_kv[scoring][0]
        scaling = getattr(attn, "scaling", rotated.shape[-1] ** -0.5)
        probs = torch.softmax(attention_scores(rotated[None], [keys], mask_rows, scaling)[0], dim=-1)  # [B, H, n, L]
        if rule.rope_corrected:
            every = torch.arange(length, device=queries.device).expand(batch, length)
            probs = probs / self._rope_only_scores(attn, at, every if positions is None else positions.clamp(max=length - 1),
                                                   rotated.shape[-1], scaling)
        dropped, chosen = prune.choose(rule, probs if rule.per_head else probs.mean(dim=1))
        previous = step.kept[scoring]
        if previous is None:
            previous = torch.arange(length, device=dropped.device).expand(batch, length).contiguous()
        inserted = None
        if rule.recycle is not None:
            inserted = prune.recycle(rule, layer, dropped, chosen, hidden, previous)
        else:
            prune.dropped = dropped
        gone = prune.gone
        positions = None
        if inserted is not None or prune.order is not None:  # once renumbered, every later rule renumbers (v1.5)
            positions = prune.renumber(inserted, max(span.stop for span in step.layout.vision.values()))
        for index in range(layer, self.num_layers):
            prune.dropped_at[index] = gone
            if positions is not None:
                prune.positions_at[index] = positions
            rows = rows_of_mask(prune.absent(index, gone))
            same = rows.shape == previous.shape and not (index == layer and inserted is not None)
            step.select[index] = None if same else torch.searchsorted(previous, rows).clamp_(max=previous.shape[1] - 1)
            step.kept[index] = rows
            step.absent[index] = length - rows.shape[1]
            pad = None
            if step.spliced is not None and bool(step.spliced[index].any()):
                pad = step.spliced[index].to(rows.device).gather(1, rows)
            base_k, base_v = step.cache.splice.get(index, (None, None, None, None))[:2]
            step.cache.splice[index] = (base_k, base_v, rows, pad)
            previous = rows

    def _rope_only_scores(self, attn: nn.Module, queries: torch.Tensor, keys: torch.Tensor, head_dim: int,
                          scaling: float) -> torch.Tensor:
        """[B, 1, n, L]: scaled dot products of all-ones queries at positions `queries` [B, n] and all-ones keys at
        positions `keys` [B, L], each rotated by the layer's RoPE: what position alone contributes to a score."""
        cos, sin = self._step.prune.rope
        batch = queries.shape[0]
        ones_q = torch.ones(batch, 1, queries.shape[1], head_dim, device=queries.device)
        ones_k = torch.ones(batch, 1, keys.shape[1], head_dim, device=queries.device)
        q = apply_rotary(attn, ones_q, self._rows_of(cos, queries, 1).float(), self._rows_of(sin, queries, 1).float())
        k = apply_rotary(attn, ones_k, self._rows_of(cos, keys, 1).float(), self._rows_of(sin, keys, 1).float())
        return (q @ k.transpose(-1, -2)) * scaling

    def _require_causal(self, index: int, length: int) -> None:
        """Recycling renumbers positions and builds a causal mask by position: refuse any other mask."""
        mask, attn = self._step.prune.masks.get(index), self.layers[index].self_attn
        if mask is None:
            causal = getattr(attn, "is_causal", True)
        else:
            allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
            lower = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
            causal = bool((allowed[..., :length, :length] == lower).all())
        if not causal:
            raise ValueError("a recycling pruner (SparseVLM v1.5) renumbers positions and needs a causal decoder mask "
                             "without padding; this backbone's prompt mask is not causal (e.g. a bidirectional prefix). "
                             "Use pruner 'sparsevlm' (v2.0, no recycling) with it")

    def _reader_layer(self, index: int, layer: nn.Module, args: tuple, kwargs: dict):
        step = self._step
        if step is None or step.in_prefill:
            return None
        return self._decode_without_dropped(step, index, args, kwargs)

    def _decode_without_dropped(self, step: _ActiveStep, index: int, args: tuple, kwargs: dict):
        """A decode pass's queries at a layer from which tokens were dropped: their keys are excluded."""
        prune = step.prune
        if prune is None or index not in prune.dropped_at:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        past = step.cache.get_seq_length(index)
        positions = kwargs.get("cache_position")
        positions = (torch.arange(past, past + hidden.shape[1], device=hidden.device) if positions is None
                     else positions.to(hidden.device))
        mask = kwargs.get("attention_mask")
        if mask is None:  # sdpa's causal fast path: an explicit causal mask over cache + new positions
            allowed = torch.arange(past + hidden.shape[1], device=hidden.device)[None, :] <= positions[:, None]
            mask = allowed[None, None]
            if self._additive_mask:
                mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
                    ~mask, torch.finfo(hidden.dtype).min)
        kwargs["attention_mask"] = exclude_keys(mask, prune.dropped_at[index])
        if index in prune.positions_at:  # renumbered: a new token follows the present ones (the cache's usable length)
            rotary = getattr(self.decoder, "rotary_emb", None)
            if rotary is None:
                raise ValueError(f"{type(self.decoder).__name__} has no rotary_emb, so decode passes after a "
                                 "recycling pruner cannot be renumbered")
            shifted = positions - prune.dropped_count(index)
            kwargs["position_embeddings"] = rotary(hidden, shifted[None].expand(hidden.shape[0], -1))
        return args, kwargs

    def _after_q_proj(self, index: int, q_proj: nn.Module, args: tuple, output: torch.Tensor):
        step = self._step
        if step is None or not step.in_prefill:
            return None
        prune = step.prune
        if prune is not None and index in prune.queries:
            rows, queries = step.kept[index], prune.queries[index]
            local = queries if rows is None else torch.searchsorted(rows, queries)
            attn = self.layers[index].self_attn
            picked = output.gather(1, local[:, :, None].expand(-1, -1, output.shape[-1]))
            prune.q_rows[index] = query_heads(attn, picked, self._head_dim(attn))
        if index not in step.probe_layers:
            return None
        rows = step.kept[index]
        key = ("probe rows", None if rows is None else step.absent[index])
        if key not in step.memo:
            queries = step.query_positions
            local = queries if rows is None else torch.searchsorted(rows, queries)
            step.memo[key] = local[:, :, None].expand(-1, -1, output.shape[-1])
        attn = self.layers[index].self_attn
        step.q_rows[index] = query_heads(attn, output.gather(1, step.memo[key]), self._head_dim(attn))
        if step.request.entropy == "computed":  # every row this layer computes, at its positions (None: all)
            step.computed_rows[index] = (query_heads(attn, output, self._head_dim(attn)), rows)
        return None

    def _head_dim(self, attn: nn.Module) -> int:
        head_dim = getattr(attn, "head_dim", None)
        if head_dim is None:
            config = self.decoder.config
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return head_dim

    def _summarize_probe(self, step: _ActiveStep) -> None:
        """Attention statistics of every probed layer from the query rows kept during the prefill, at once."""
        layers = sorted(step.probe_layers)
        attn = self.layers[layers[0]].self_attn
        queries = step.query_positions
        cos, sin = step.rope
        rotated = apply_rotary(
            attn, torch.stack([step.q_rows[i] for i in layers]), self._rows_of(cos, queries, 1), self._rows_of(sin, queries, 1)
        )
        length = step.layout.length
        masks = [step.masks[i] for i in layers]
        dtype = rotated.dtype
        dropped = {} if step.prune is None else step.prune.dropped_at
        if all(m is masks[0] for m in masks) and not any(i in dropped for i in layers):
            mask_rows = self._mask_rows(self.layers[layers[0]], masks[0], queries, length, dtype)
        else:  # e.g. sliding-window and global layers, or tokens dropped from some layer on: each its own mask
            rows = [self._mask_rows(self.layers[i], m, queries, length, dtype) for i, m in zip(layers, masks)]
            rows = [r if i not in dropped else exclude_keys(r, dropped[i]) for i, r in zip(layers, rows)]
            mask_rows = torch.stack([r.expand(queries.shape[0], *r.shape[1:]) for r in rows])
        keys = [step.cache.prefill_kv[i][0] for i in layers]
        scaling = getattr(attn, "scaling", rotated.shape[-1] ** -0.5)
        to_keys, entropy = summarize_layers(rotated, keys, mask_rows, scaling)
        for n, layer in enumerate(layers):
            step.to_keys[layer], step.entropy[layer] = to_keys[n], entropy[n]
        step.q_rows.clear()
        for layer, (heads, rows) in step.computed_rows.items():  # one layer at a time: row counts differ
            if rows is None:
                rows = torch.arange(length, device=heads.device).expand(heads.shape[0], length)
            rotated = apply_rotary(self.layers[layer].self_attn, heads, self._rows_of(cos, rows, 1),
                                   self._rows_of(sin, rows, 1))
            mask_rows = self._mask_rows(self.layers[layer], step.masks[layer], rows, length, dtype)
            if layer in dropped:
                mask_rows = exclude_keys(mask_rows, dropped[layer])
            step.entropy[layer] = computed_rows_entropy(rotated, step.cache.prefill_kv[layer][0], mask_rows, scaling)
        step.computed_rows.clear()

    def _after_decoder(self, decoder: nn.Module, args: tuple, output: Any):
        step = self._step
        if step is None or not step.in_prefill:
            return None
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        rows = step.kept[-1]
        if rows is not None or step.final_splice is not None:
            previous = self.episode.final_hidden
            if previous is None:  # tokens dropped at a step with nothing reused: their final states stay void
                previous = hidden.new_zeros(hidden.shape[0], step.layout.length, hidden.shape[-1])
            previous = previous.to(hidden.device, hidden.dtype)
            if rows is not None:
                index = rows[:, :, None].expand(-1, -1, hidden.shape[-1])
                hidden = previous.scatter(1, index, hidden)
            if step.final_splice is not None:
                hidden = torch.where(step.final_splice[:, :, None], previous, hidden)
            if isinstance(output, tuple):
                output = (hidden, *output[1:])
            else:
                output.last_hidden_state = hidden
        step.final_hidden = hidden.detach()
        if step.probe_layers:
            self._summarize_probe(step)
        step.in_prefill = False
        step.cache.recording = False
        return output


def on_host(*parts: dict[int, torch.Tensor]) -> tuple[dict[int, torch.Tensor], ...]:
    """Per-layer tensors moved to the CPU in one transfer (the next plan reads them there: no device sync while
    planning); CPU tensors are returned as they are."""
    if all(t.device.type == "cpu" for part in parts for t in part.values()):
        return parts
    return in_one_transfer(parts, torch.device("cpu"))


def in_one_transfer(parts: tuple[dict[int, torch.Tensor], ...], device: torch.device) -> tuple[dict[int, torch.Tensor], ...]:
    """`parts` on `device`, copied as one flat tensor of their common dtype and split back (values and dtypes kept)."""
    tensors = [t for part in parts for t in part.values()]
    if not tensors:
        return parts
    common = reduce(torch.promote_types, (t.dtype for t in tensors))
    flat = torch.cat([t.to(common).reshape(-1) for t in tensors]).to(device)
    pieces = iter(flat.split([t.numel() for t in tensors]))
    return tuple({layer: next(pieces).view(t.shape).to(t.dtype) for layer, t in part.items()} for part in parts)
