"""Compiled steps (`CachedVLA(compile=True)`): torch.compile of the decoder without touching its modeling code.

- Blocks: every decoder layer's sub-modules except the attention (the norms and the MLP: the same classes at
  every layer) are compiled in place. torch inlines nn modules, so one graph serves every layer, and the row
  dimension is dynamic: a reuse plan of any size compiles nothing new. The attention, where the engine splices
  reused K/V, stays eager.
- Vision towers (the backbone's `vision_towers()`): compiled whole, with fixed shapes (one graph per batch size).
- Decode passes (OpenVLA's tokens after the first): one whole-decoder graph over a static K/V cache of prompt +
  decode length, filled from the prefill's K/V; fixed shapes, one graph per batch size. The engine's hooks are
  lifted while it runs (they have nothing to do after the prefill), so the graph never sees them. After a step
  that dropped tokens (pruning), the graph takes each layer's dropped keys as a tensor and an attention function
  registered with transformers (`kept_keys_attention`) keeps them out, layer by layer, as the hooks do eagerly.

The first step of a new shape compiles (a message says so); later steps reuse the graphs. `compile_counts()`
reads torch's counters, so a test can check that steady state compiles nothing.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch import nn

from ..messages import note
from .hooks import decoder_layers

COMPILED_SKIP = ("self_attn",)
KEYS_KEPT = "vlacache_keys_kept"  # keyword to the attention: bool [layers, B, K], the keys each layer may attend to


def kept_keys_attention(base: str, attn: nn.Module) -> str:
    """The name of an attention implementation registered with transformers: `base` (sdpa or eager) with the keys
    a layer may not attend to (the `KEYS_KEPT` keyword, indexed by the layer) masked out."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base not in ("sdpa", "eager"):
        raise ValueError(f"compiled decode passes after pruning need attn_implementation 'sdpa' or 'eager', not "
                         f"'{base}' (its kernel takes no mask); load the backbone with sdpa, or use compile=False")
    name = f"vlacache_kept_keys_{base}"
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
    inner = ALL_ATTENTION_FUNCTIONS[base] if base == "sdpa" else sys.modules[type(attn).__module__].eager_attention_forward

    def attention(module, query, key, value, attention_mask, **kwargs):
        kept = kwargs.pop(KEYS_KEPT)[module.layer_idx][:, None, None, : key.shape[-2]]  # [B, 1, 1, K]
        if attention_mask is None:  # sdpa's causal skip: one query may see every key, so `kept` is the whole mask
            attention_mask = kept
        elif attention_mask.dtype == torch.bool:
            attention_mask = attention_mask & kept
        else:
            attention_mask = attention_mask.masked_fill(~kept, torch.finfo(attention_mask.dtype).min)
        return inner(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def compile_counts() -> dict[str, int]:
    """torch.compile's totals so far: frames it compiled and distinct graphs it made (all models in this process)."""
    from torch._dynamo.utils import counters

    return {"frames": int(counters["frames"]["total"]), "graphs": int(counters["stats"]["unique_graphs"])}


class CompiledSteps:
    """The compiled pieces of one decoder (and of its causal LM's decode pass, when the backbone has decode
    passes). They are swapped in only while a step of their CachedVLA runs (`active`), so eager and compiled
    CachedVLAs can share one backbone."""

    _seen: set[tuple] = set()  # (decoder, shape) pairs compiled in this process: torch keeps their graphs

    def __init__(self, decoder: nn.Module, causal_lm: nn.Module | None = None, mode: str | None = None,
                 towers: list[nn.Module] | None = None) -> None:
        self.decoder, self.mode, self.causal_lm = decoder, mode, causal_lm
        self.blocks = [
            child for layer in decoder_layers(decoder) for name, child in layer.named_children() if name not in COMPILED_SKIP
        ]
        norm = getattr(decoder, "norm", None)
        if isinstance(norm, nn.Module):
            self.blocks.append(norm)
        self.towers = list(towers or [])
        # one compiled forward per block; torch keys its graphs by the class's forward, so all layers share them
        self._forwards = [torch.compile(block.forward, dynamic=True, mode=mode) for block in self.blocks]
        self._forwards += [torch.compile(tower.forward, dynamic=False, mode=mode) for tower in self.towers]
        self._decode = None if causal_lm is None else self._compiled_decode_pass(causal_lm)
        self._dropped: torch.Tensor | None = None  # the running step's dropped keys per layer (`keys_dropped`)
        self._static: dict[tuple, Any] = {}

    def decode_pass(self, embeds, position_ids, cache_position, cache, cache_keyword) -> torch.Tensor:
        """One compiled decode pass (the backbone's `decode_pass`), keeping out the keys the step dropped."""
        return self._decode(embeds, position_ids, cache_position, cache, cache_keyword, self._dropped)

    @contextmanager
    def keys_dropped(self, dropped: torch.Tensor | None):
        """Decode passes that keep out `dropped` (bool [layers, B, K], from `CacheEngine.keys_dropped`), layer by
        layer, through the `kept_keys_attention` implementation; nothing changes when `dropped` is None."""
        if dropped is None:
            yield
            return
        config = self.causal_lm.config
        base = config._attn_implementation
        config._attn_implementation = kept_keys_attention(base, decoder_layers(self.decoder)[0].self_attn)
        self._dropped = dropped
        try:
            yield
        finally:
            config._attn_implementation = base
            self._dropped = None

    @contextmanager
    def active(self, backbone):
        """The compiled blocks, towers and decode pass in place for one step; eager again afterwards."""
        for module, forward in zip(self.blocks + self.towers, self._forwards):
            module.forward = forward
        backbone.decode_pass = None if self._decode is None else self.decode_pass
        try:
            yield
        finally:
            for module in self.blocks + self.towers:
                del module.forward
            backbone.decode_pass = None

    def first_time(self, key: tuple, what: str, run: Callable[[], Any]) -> Any:
        """Run `run()`. The first time for `key` in this process (a new shape: torch compiles, tens of seconds on
        a CPU), say so and how long it took."""
        key = (id(self.decoder), *key)
        if key in CompiledSteps._seen:
            return run()
        note(f"compiling {what}: the first step of this shape; later steps reuse it")
        start = time.perf_counter()
        out = run()
        CompiledSteps._seen.add(key)
        note(f"compiled {what} in {time.perf_counter() - start:.1f} s")
        return out

    # -- decode passes ----------------------------------------------------------------------------------------
    def _compiled_decode_pass(self, causal_lm: nn.Module) -> Callable:
        """One decode pass of `causal_lm` over a static cache, compiled (fixed shapes: one graph per batch size)."""

        def one_pass(embeds, position_ids, cache_position, cache, cache_keyword, dropped):
            extra = {cache_keyword: cache}
            if dropped is not None:  # the prompt's dropped keys out, and the static cache's unwritten tail
                causal = torch.arange(dropped.shape[-1], device=dropped.device) <= cache_position[-1]
                extra[KEYS_KEPT] = ~dropped & causal
            out = causal_lm(inputs_embeds=embeds, position_ids=position_ids, cache_position=cache_position,
                            use_cache=True, logits_to_keep=1, **extra)
            return out.logits

        return torch.compile(one_pass, dynamic=False, mode=self.mode)

    def decode_cache(self, prompt_cache, length: int, passes: int):
        """A static K/V cache of `length + passes` positions holding the prompt's K/V from `prompt_cache`,
        allocated once per batch shape and refilled every step."""
        from transformers.cache_utils import StaticCache

        first = prompt_cache.layers[0].keys
        key = (first.shape[0], length + passes, first.dtype, first.device)
        static = self._static.get(key)
        if static is None:
            static = self._static[key] = StaticCache(config=self.causal_lm.config, max_cache_len=length + passes)
        else:
            static.reset()
        for index, layer in enumerate(prompt_cache.layers):
            static.update(layer.keys[:, :, :length], layer.values[:, :, :length], index)
        return static
