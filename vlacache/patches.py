"""Model-input images seen as the ViT's patch grid: per-patch pixel similarity and images assembled patch by patch."""

from __future__ import annotations

import torch
from einops import rearrange

from .types import InputError


_MEMO_SIZE = 16  # recent images' patch vectors (a few cameras' current, previous and anchor frames)
_grids: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_cosines: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _identity(image: torch.Tensor) -> tuple:
    # the memo holds the tensor itself, so its id and storage cannot be reused while the entry lives; the version
    # counter changes with every in-place write (inference tensors have none: the engine never writes its query
    # images, previous frames or anchors in place, it replaces them)
    version = None if image.is_inference() else image._version
    return id(image), image.data_ptr(), version, tuple(image.shape), image.stride()


def _remember(memo: dict, key: tuple, value: tuple) -> tuple:
    if len(memo) >= _MEMO_SIZE:
        memo.pop(next(iter(memo)))
    memo[key] = value
    return value


def patch_vectors(image: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw pixels of each patch of a uint8 image [B, H, W, 3] as float32 vectors [B, rows*cols, p*q*3] and
    their norms [B, rows*cols]; an image seen again (the previous query frame, an anchor) is not recomputed."""
    key = (*_identity(image), rows, cols)
    hit = _grids.get(key)
    if hit is None:
        vectors = rearrange(image.float(), "b (r p) (c q) ch -> b (r c) (p q ch)", r=rows, c=cols)
        hit = _remember(_grids, key, (image, vectors, vectors.norm(dim=-1)))
    return hit[1], hit[2]


def remember_patch_vectors(image: torch.Tensor, rows: int, cols: int, vectors: torch.Tensor, norms: torch.Tensor) -> None:
    """Record what `patch_vectors(image, rows, cols)` gives, known without computing it (a copy of an image seen
    before, or an image assembled patch by patch from two seen ones: the same values, bit for bit)."""
    _remember(_grids, (*_identity(image), rows, cols), (image, vectors, norms))


def known_patch_vectors(image: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`patch_vectors` of an image if they were computed (or recorded) recently, else None."""
    hit = _grids.get((*_identity(image), rows, cols))
    return None if hit is None else (hit[1], hit[2])


def patch_cosine(current: torch.Tensor, previous: torch.Tensor, rows: int, cols: int, eps: float | None = None) -> torch.Tensor:
    """Cosine similarity [B, rows*cols] of the raw pixels of each patch of two uint8 images [B, H, W, 3] (float32).
    eps None: two all-black patches count as identical (1); a number: dot / (|a| |b| + eps), the public reference
    code's form, under which a black patch scores 0. A pair compared again in the same step (the selector, then
    the staleness report) is not recomputed; the result must not be written to."""
    if current.shape != previous.shape:
        raise InputError(f"current and previous query images differ in shape: {tuple(current.shape)} vs {tuple(previous.shape)}")
    if current.shape[1] % rows or current.shape[2] % cols:
        raise InputError(f"image {tuple(current.shape[1:3])} does not split into a {rows}x{cols} patch grid")
    key = (*_identity(current), *_identity(previous), rows, cols, eps)
    hit = _cosines.get(key)
    if hit is not None:
        return hit[2]
    a, na = patch_vectors(current, rows, cols)
    b, nb = patch_vectors(previous, rows, cols)
    if eps is not None:
        cosine = (a * b).sum(-1) / (na * nb + eps)
    else:
        cosine = (a * b).sum(-1) / (na * nb).clamp_min(1e-12)
        both_black = (na == 0) & (nb == 0)
        cosine = torch.where(both_black, torch.ones_like(cosine), cosine)
    return _remember(_cosines, key, (current, previous, cosine))[2]


def where_patches(mask: torch.Tensor, chosen: torch.Tensor, other: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """An image [B, H, W, C] whose patches (a rows x cols grid) come from `chosen` where the per-patch mask [B,
    rows*cols] is set, else from `other`."""
    batch, height, width, channels = other.shape
    grid = (batch, rows, height // rows, cols, width // cols, channels)
    picked = torch.where(mask.reshape(batch, rows, 1, cols, 1, 1), chosen.reshape(grid), other.reshape(grid))
    return picked.reshape(other.shape)
