"""Compiled steps (`CachedVLA(compile=True)`): torch.compile of the decoder without touching its modeling code.

- Blocks: every decoder layer's sub-modules except the attention (the norms and the MLP: the same classes at
  every layer) are compiled in place. torch inlines nn modules, so one graph serves every layer, and the row
  dimension is dynamic: a reuse plan of any size compiles nothing new. The attention, where the engine splices
  reused K/V, stays eager.
- Decode passes (OpenVLA's tokens after the first): one whole-decoder graph over a static K/V cache of prompt +
  decode length, filled from the prefill's K/V; fixed shapes, one graph per batch size. The engine's hooks are
  lifted while it runs (they have nothing to do after the prefill), so the graph never sees them.

The first step of a new shape compiles (a message says so); later steps reuse the graphs. `compile_counts()`
reads torch's counters, so a test can check that steady state compiles nothing.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch import nn

from ..messages import note
from .hooks import decoder_layers

COMPILED_SKIP = ("self_attn",)


def compile_counts() -> dict[str, int]:
    """torch.compile's totals so far: frames it compiled and distinct graphs it made (all models in this process)."""
    from torch._dynamo.utils import counters

    return {"frames": int(counters["frames"]["total"]), "graphs": int(counters["stats"]["unique_graphs"])}


class CompiledSteps:
    """The compiled pieces of one decoder (and of its causal LM's decode pass, when the backbone has decode
    passes). They are swapped in only while a step of their CachedVLA runs (`active`), so eager and compiled
    CachedVLAs can share one backbone."""

    _seen: set[tuple] = set()  # (decoder, shape) pairs compiled in this process: torch keeps their graphs

    def __init__(self, decoder: nn.Module, causal_lm: nn.Module | None = None, mode: str | None = None) -> None:
        self.decoder, self.mode, self.causal_lm = decoder, mode, causal_lm
        self.blocks = [
            child for layer in decoder_layers(decoder) for name, child in layer.named_children() if name not in COMPILED_SKIP
        ]
        norm = getattr(decoder, "norm", None)
        if isinstance(norm, nn.Module):
            self.blocks.append(norm)
        # one compiled forward per block; torch keys its graphs by the class's forward, so all layers share them
        self._forwards = [torch.compile(block.forward, dynamic=True, mode=mode) for block in self.blocks]
        self.decode_pass = None if causal_lm is None else self._compiled_decode_pass(causal_lm)
        self._static: dict[tuple, Any] = {}

    @contextmanager
    def active(self, backbone):
        """The compiled blocks and decode pass in place for one step; eager again afterwards."""
        for block, forward in zip(self.blocks, self._forwards):
            block.forward = forward
        backbone.decode_pass = self.decode_pass
        try:
            yield
        finally:
            for block in self.blocks:
                del block.forward
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

        def one_pass(embeds, position_ids, cache_position, cache, cache_keyword):
            out = causal_lm(inputs_embeds=embeds, position_ids=position_ids, cache_position=cache_position,
                            use_cache=True, logits_to_keep=1, **{cache_keyword: cache})
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
