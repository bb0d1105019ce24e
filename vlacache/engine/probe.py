"""Cheap attention statistics: softmax(QK^T) for a few query rows of chosen layers, batched over layers.

The model keeps its fused attention (sdpa). During the prefill a hook on each probed layer's `q_proj` keeps the
query rows the next plan reads (one gather); after the prefill all probed layers are summarized at once: one
rotary application, one matmul per layer against the keys the cache holds, one softmax. `output_attentions=True`
and eager attention are never used.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(attn: nn.Module, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on queries [..., B, H, n, d] with cos/sin [B, n, d], through the model's own function when it has one."""
    modeling = sys.modules.get(type(attn).__module__)
    rotary = getattr(modeling, "apply_rotary_pos_emb", None)
    if rotary is not None:
        return rotary(q, q, cos, sin)[0]
    return q * cos.unsqueeze(1) + _rotate_half(q) * sin.unsqueeze(1)


def query_heads(attn: nn.Module, q_rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """`q_proj` output rows [B, n, H*d] as heads [B, H, n, d] (with the layer's q_norm where it has one)."""
    batch, n, _ = q_rows.shape
    q = q_rows.view(batch, n, -1, head_dim)
    q_norm = getattr(attn, "q_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    return q.transpose(1, 2)


def summarize_layers(
    queries: torch.Tensor, keys: Sequence[torch.Tensor], mask_rows: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean attention over keys [P, B, L] and mean row entropy [P, B] of P layers at once.

    queries: [P, B, H, n, d] after RoPE; keys: P tensors [B, H_kv, L, d] (after RoPE; grouped-query heads are
    matched by reshaping the queries, never by copying keys); mask_rows: [B, 1, n, L] or [P, B, 1, n, L], bool
    (True = may attend) or additive float.
    """
    log_probs = attention_log_probs(queries, keys, mask_rows, scaling)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum(-1)
    return probs.mean(dim=(2, 3)), entropy.mean(dim=(2, 3))


def attention_log_probs(queries: torch.Tensor, keys: Sequence[torch.Tensor], mask_rows: torch.Tensor,
                        scaling: float) -> torch.Tensor:
    """log softmax(QK^T * scaling + mask) [P, B, H, n, L] of P layers (arguments as `summarize_layers`)."""
    layers, batch, heads, n, head_dim = queries.shape
    kv_heads = keys[0].shape[1]
    grouped = queries.float().reshape(layers, batch, kv_heads, heads // kv_heads * n, head_dim)
    scores = torch.stack([q @ k.float().transpose(-1, -2) for q, k in zip(grouped, keys)])
    scores = scores.view(layers, batch, heads, n, -1) * scaling
    if mask_rows.dtype == torch.bool:  # a finite floor: masked keys get probability 0 and add 0 * floor = 0 below
        scores = scores.masked_fill(~mask_rows, torch.finfo(scores.dtype).min)
    else:
        scores = (scores + mask_rows.float()).clamp_min(torch.finfo(scores.dtype).min)
    return torch.log_softmax(scores, dim=-1)
