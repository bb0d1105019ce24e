"""Model-input images seen as the ViT's patch grid: per-patch pixel similarity and per-patch masks as pixels."""

from __future__ import annotations

import torch
from einops import rearrange

from .types import InputError


def patch_cosine(current: torch.Tensor, previous: torch.Tensor, rows: int, cols: int, eps: float | None = None) -> torch.Tensor:
    """Cosine similarity [B, rows*cols] of the raw pixels of each patch of two uint8 images [B, H, W, 3] (float32).
    eps None: two all-black patches count as identical (1); a number: dot / (|a| |b| + eps), the public reference
    code's form, under which a black patch scores 0."""
    if current.shape != previous.shape:
        raise InputError(f"current and previous query images differ in shape: {tuple(current.shape)} vs {tuple(previous.shape)}")
    if current.shape[1] % rows or current.shape[2] % cols:
        raise InputError(f"image {tuple(current.shape[1:3])} does not split into a {rows}x{cols} patch grid")
    a = rearrange(current.float(), "b (r p) (c q) ch -> b (r c) (p q ch)", r=rows, c=cols)
    b = rearrange(previous.float(), "b (r p) (c q) ch -> b (r c) (p q ch)", r=rows, c=cols)
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    if eps is not None:
        return (a * b).sum(-1) / (na * nb + eps)
    cosine = (a * b).sum(-1) / (na * nb).clamp_min(1e-12)
    both_black = (na == 0) & (nb == 0)
    return torch.where(both_black, torch.ones_like(cosine), cosine)


def patch_mask_to_pixels(mask: torch.Tensor, rows: int, cols: int, height: int, width: int) -> torch.Tensor:
    """A per-patch bool mask [B, rows*cols] as a per-pixel mask [B, H, W, 1] of the image it was computed on."""
    grid = mask.view(mask.shape[0], rows, cols)
    return grid.repeat_interleave(height // rows, dim=1).repeat_interleave(width // cols, dim=2)[..., None]
