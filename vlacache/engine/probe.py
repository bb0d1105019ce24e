"""Cheap attention statistics: recompute softmax(QK^T) for a few query rows of chosen layers.

The model keeps its fused attention (sdpa); the probe re-derives only the rows it needs, from the layer's
own projections and the keys the cache holds, so `output_attentions=True` and eager attention are never used.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(attn: nn.Module, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    modeling = sys.modules.get(type(attn).__module__)
    rotary = getattr(modeling, "apply_rotary_pos_emb", None)
    if rotary is not None:
        return rotary(q, q, cos, sin)[0]
    return q * cos.unsqueeze(1) + _rotate_half(q) * sin.unsqueeze(1)


def attention_rows(
    attn: nn.Module,
    normed_rows: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    mask_rows: torch.Tensor,
) -> torch.Tensor:
    """Attention probabilities [B, H, n, L] of n query rows.

    normed_rows: [B, n, D] the attention block's input (after its input norm) at the query rows;
    cos/sin: [B, n, d] their rotary embeddings; keys: [B, H_kv, L, d] the layer's full keys (after RoPE);
    mask_rows: [B, 1, n, L], bool (True = may attend) or additive float.
    """
    batch, n, _ = normed_rows.shape
    head_dim = keys.shape[-1]
    q = attn.q_proj(normed_rows).view(batch, n, -1, head_dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):
        q = attn.q_norm(q)
    q = _apply_rotary(attn, q, cos, sin)
    groups = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(groups, dim=1) if groups > 1 else keys
    scaling = getattr(attn, "scaling", head_dim**-0.5)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    if mask_rows.dtype == torch.bool:
        scores = scores.masked_fill(~mask_rows, float("-inf"))
    else:
        scores = scores + mask_rows.float()
    return torch.softmax(scores, dim=-1)


def summarize(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean attention over keys [B, L] and mean row entropy [B] of probabilities [B, H, n, L]."""
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
    return probs.mean(dim=(1, 2)), entropy.mean(dim=(1, 2))
