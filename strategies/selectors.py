"""Token selectors: which patches are static since the previous policy query."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from vlacache.registry import register_strategy
from vlacache.strategy import Candidates, PlanContext, TokenSelector
from vlacache.types import InputError


@register_strategy("selector", "none")
class NoSelector(TokenSelector):
    """Selects nothing: the policy runs the model untouched (the no-cache baseline)."""

    selects_nothing = True

    def select(self, ctx: PlanContext) -> dict[str, Candidates]:
        return {}


def patch_cosine(current: torch.Tensor, previous: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Cosine similarity [B, rows*cols] of the raw pixels of each patch of two uint8 images [B, H, W, 3]."""
    if current.shape != previous.shape:
        raise InputError(f"current and previous query images differ in shape: {tuple(current.shape)} vs {tuple(previous.shape)}")
    if current.shape[1] % rows or current.shape[2] % cols:
        raise InputError(f"image {tuple(current.shape[1:3])} does not split into a {rows}x{cols} patch grid")
    a = rearrange(current.float(), "b (r p) (c q) ch -> b (r c) (p q ch)", r=rows, c=cols)
    b = rearrange(previous.float(), "b (r p) (c q) ch -> b (r c) (p q ch)", r=rows, c=cols)
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    cosine = (a * b).sum(-1) / (na * nb).clamp_min(1e-12)
    both_black = (na == 0) & (nb == 0)
    return torch.where(both_black, torch.ones_like(cosine), cosine)


@register_strategy("selector", "pixel-cosine")
class PixelCosineSelector(TokenSelector):
    """The paper's static-token test: per patch of the model-input image (aligned with the ViT patch grid),
    cosine similarity of raw pixels against the same patch of the previous policy query frame of the same
    camera; patches with similarity >= tau are static, of which the top_k most similar are kept (per camera).
    cameras: the cameras whose patches may be reused (null: all), e.g. [primary] to never reuse the wrist view."""

    @dataclass
    class Config:
        tau: float = 0.996
        top_k: int | None = 100
        cameras: list[str] | None = None

    def select(self, ctx: PlanContext) -> dict[str, Candidates]:
        cameras = self.config.cameras
        if cameras is not None and not set(cameras) <= set(ctx.layout.vision):
            unknown = sorted(set(cameras) - set(ctx.layout.vision))
            raise InputError(
                f"selector 'pixel-cosine': cameras {unknown} are not inputs of this backbone, whose cameras are "
                f"{sorted(ctx.layout.vision)}; set selector.cameras to some of those (or null for all)"
            )
        out = {}
        for camera, span in ctx.layout.vision.items():
            similarity = patch_cosine(ctx.current[camera], ctx.previous[camera], span.rows, span.cols)
            mask = similarity >= self.config.tau
            if cameras is not None and camera not in cameras:
                mask = torch.zeros_like(mask)
            k = self.config.top_k
            if k is not None and k < mask.shape[1]:
                keep = torch.zeros_like(mask)
                top = similarity.masked_fill(~mask, float("-inf")).topk(k, dim=1).indices
                keep.scatter_(1, top, True)
                mask = mask & keep
            out[camera] = Candidates(mask=mask, score=similarity)
        return out
