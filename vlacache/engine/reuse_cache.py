"""A stock DynamicCache that splices last step's keys/values into reused positions during a cached prefill."""

from __future__ import annotations

import torch
from transformers import DynamicCache


class ReuseCache(DynamicCache):
    """DynamicCache subclass used for every step while the engine is attached.

    The step starts empty, so the model builds positions 0..L-1 and a fresh mask as for a full prefill. For a
    layer with reused positions, `update()` receives K/V of the kept rows only; it writes them into a copy of
    last step's full K/V in place (positions `kept`) and hands the full tensors on; in a batch of episodes, rows
    that were computed only to pad the batch to one shape take last step's values too. Decode steps append as usual.
    The prefill K/V of every layer are kept as `prefill_kv` so the next step can reuse them.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.splice: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.prefill_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recording = True
        self.length = 0  # the prompt length (set by the engine): the size of a zero base for dropped tokens

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        splice = self.splice.pop(layer_idx, None)
        if splice is not None:
            previous_k, previous_v, kept, pad = splice
            if previous_k is None:  # tokens dropped, nothing reused: their K/V stay zero (no query attends to them)
                shape = (*key_states.shape[:2], self.length, key_states.shape[-1])
                previous_k, previous_v = key_states.new_zeros(shape), value_states.new_zeros(shape)
            key_states, value_states = key_states.to(previous_k.dtype), value_states.to(previous_v.dtype)
            index = None if kept is None or (kept.shape[0] == 1 and pad is None) else \
                kept[:, None, :, None].expand(-1, key_states.shape[1], -1, key_states.shape[-1])
            if pad is not None:  # rows computed only to fill the batch's common shape: their row reuses them
                fresh = ~pad[:, None, :, None]
                old_k = previous_k if index is None else previous_k.gather(2, index)
                old_v = previous_v if index is None else previous_v.gather(2, index)
                key_states, value_states = torch.where(fresh, key_states, old_k), torch.where(fresh, value_states, old_v)
            # in place: last step's K/V are dead once this step has read them (the engine resets an episode whose
            # step did not finish, so a half-written tensor is never reused)
            if kept is not None and kept.shape[0] == 1:  # one row: a plain copy of rows, cheaper than a scatter
                key_states = previous_k.index_copy_(2, kept[0], key_states)
                value_states = previous_v.index_copy_(2, kept[0], value_states)
            elif index is not None:
                key_states = previous_k.scatter_(2, index, key_states)
                value_states = previous_v.scatter_(2, index, value_states)
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.recording:
            self.prefill_kv[layer_idx] = (keys, values)
        return keys, values
