"""The center crop of the OpenVLA / OFT LIBERO evaluations (their LIBERO policies were trained with random crops)."""

from __future__ import annotations

import math

import torch

__all__ = ["center_crop"]


def _axis(n: int, side: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample positions of tf.image.crop_and_resize along one axis (box [lo, lo + side], output size n)."""
    lo = (1.0 - side) / 2.0
    hi = lo + side
    pos = lo * (n - 1) + torch.arange(n, dtype=torch.float32) * ((hi - lo) * (n - 1) / (n - 1))
    first = pos.floor().long().clamp(0, n - 1)
    second = pos.ceil().long().clamp(0, n - 1)
    return first, second, pos - pos.floor()


def center_crop(images: torch.Tensor, scale: float = 0.9) -> torch.Tensor:
    """Crop the central `scale` of the image area and resize back (bilinear), as OFT's `center_crop_image`:
    uint8 -> float [0, 1], tf.image.crop_and_resize with a centred box of side sqrt(scale), clip, -> uint8
    (TF's saturating conversion, trunc(x * 255.5)). images: uint8 [B, H, W, 3] -> uint8 [B, H, W, 3]."""
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"crop scale must lie in (0, 1], got {scale}")
    side = math.sqrt(scale)
    x = images.to(torch.float32) * (1.0 / 255.0)
    top, bottom, ylerp = _axis(images.shape[1], side)
    left, right, xlerp = _axis(images.shape[2], side)
    xlerp = xlerp[None, None, :, None]
    ylerp = ylerp[None, :, None, None]
    upper = x[:, top][:, :, left] + (x[:, top][:, :, right] - x[:, top][:, :, left]) * xlerp
    lower = x[:, bottom][:, :, left] + (x[:, bottom][:, :, right] - x[:, bottom][:, :, left]) * xlerp
    out = (upper + (lower - upper) * ylerp).clamp(0.0, 1.0)
    return (out * 255.5).clamp(max=255.0).to(torch.uint8)
