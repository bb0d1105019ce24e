"""A stock DynamicCache that splices last step's keys/values into reused positions during a cached prefill."""

from __future__ import annotations

import torch
from transformers import DynamicCache


class ReuseCache(DynamicCache):
    """DynamicCache subclass used for every step while the engine is attached.

    The step starts empty, so the model builds positions 0..L-1 and a fresh mask as for a full prefill. For a
    layer with reused positions, `update()` receives K/V of the kept rows only; it writes them into a copy of
    last step's full K/V in place (positions `kept`) and hands the full tensors on. Decode steps then append as usual.
    The prefill K/V of every layer are kept as `prefill_kv` so the next step can reuse them.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.splice: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.prefill_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recording = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        splice = self.splice.pop(layer_idx, None)
        if splice is not None:
            previous_k, previous_v, kept = splice
            index = kept[:, None, :, None].expand(-1, key_states.shape[1], -1, key_states.shape[-1])
            # in place: last step's K/V are dead once this step has read them (the engine resets an episode
            # whose step did not finish, so a half-written tensor is never reused)
            key_states = previous_k.scatter_(2, index, key_states.to(previous_k.dtype))
            value_states = previous_v.scatter_(2, index, value_states.to(previous_v.dtype))
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.recording:
            self.prefill_kv[layer_idx] = (keys, values)
        return keys, values
