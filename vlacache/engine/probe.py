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
    # One exp pass: with t = s - max(s), e = exp(t) and Z = sum(e), p = e / Z and H = log Z - sum(e * t) / Z.
    shifted = attention_scores(queries, keys, mask_rows, scaling)
    shifted -= shifted.amax(dim=-1, keepdim=True)
    weights = shifted.exp()
    total = weights.sum(dim=-1)
    entropy = total.log() - torch.linalg.vecdot(weights, shifted) / total  # masked keys: 0 * finite floor = 0
    layers, batch, heads, n, length = weights.shape
    rows = total.reciprocal().view(layers, batch, 1, heads * n) / (heads * n)  # each row's 1 / Z, averaged
    to_keys = rows @ weights.view(layers, batch, heads * n, length)
    return to_keys.view(layers, batch, length), entropy.mean(dim=(2, 3))


@torch.no_grad()  # statistics for the next plan's choices, never trained through
def attention_scores(queries: torch.Tensor, keys: Sequence[torch.Tensor], mask_rows: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """QK^T * scaling + mask [P, B, H, n, L] in float32, P layers written into one buffer (arguments as
    `summarize_layers`); masked keys get the dtype's finite minimum, so their softmax weight is exactly 0."""
    layers, batch, heads, n, head_dim = queries.shape
    kv_heads, length = keys[0].shape[1], keys[0].shape[2]
    grouped = (queries.float() * scaling).reshape(layers, batch, kv_heads, heads // kv_heads * n, head_dim)
    scores = grouped.new_empty(layers, batch, kv_heads, heads // kv_heads * n, length)
    for layer, (q, k) in enumerate(zip(grouped, keys)):
        torch.matmul(q, k.float().transpose(-1, -2), out=scores[layer])
    scores = scores.view(layers, batch, heads, n, length)
    floor = torch.finfo(scores.dtype).min
    if mask_rows.dtype == torch.bool:
        return scores.masked_fill_(~mask_rows, floor)
    return scores.add_(mask_rows.float()).clamp_min_(floor)


def computed_rows_entropy(queries: torch.Tensor, keys: torch.Tensor, mask_rows: torch.Tensor, scaling: float) -> torch.Tensor:
    """Entropy [B] of one layer's head-averaged attention, averaged over the query rows it computed (the public
    reference code's schedule statistic): each row of the head mean re-normalised (+1e-10), entropy in nats with
    log(p + 1e-10). queries: [B, H, n, d] after RoPE; keys: [B, H_kv, L, d]; mask_rows: [B, 1, n, L]."""
    probs = torch.softmax(attention_scores(queries[None], [keys], mask_rows, scaling)[0], dim=-1).mean(dim=1)
    probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-10)
    return -(probs * (probs + 1e-10).log()).sum(dim=-1).mean(dim=-1)
