"""OpenVLA's action de-tokenisation and un-normalisation."""

from __future__ import annotations

from typing import Any

import numpy as np

from vlacache.types import InputError


def tokens_to_normalized(tokens: np.ndarray, text_vocab_size: int, n_bins: int = 256) -> np.ndarray:
    """Token id t -> bin clip(text_vocab_size - t - 1, 0, n_bins - 2) -> its centre in [-1, 1]."""
    edges = np.linspace(-1.0, 1.0, n_bins)
    centres = (edges[:-1] + edges[1:]) / 2.0
    index = np.clip(text_vocab_size - tokens.astype(np.int64) - 1, 0, centres.shape[0] - 1)
    return centres[index]


def resolve_unnorm_key(norm_stats: dict[str, Any], key: str | None) -> str:
    """The dataset whose statistics un-normalise actions; required when the checkpoint has several.
    As the official LIBERO evaluation does, 'libero_spatial' falls back to 'libero_spatial_no_noops' (and back)."""
    if key is None:
        if len(norm_stats) != 1:
            raise InputError(f"this checkpoint was trained on several datasets; pass unnorm_key, one of {sorted(norm_stats)}")
        return next(iter(norm_stats))
    for alias in (f"{key}_no_noops", key.removesuffix("_no_noops")):
        if key not in norm_stats and alias in norm_stats:
            return alias
    if key not in norm_stats:
        raise InputError(f"unknown unnorm_key '{key}'; this checkpoint has {sorted(norm_stats)}")
    return key


def unnormalize(normalized: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """0.5 (x + 1)(q99 - q01) + q01 on the dimensions where mask is true (BOUNDS_Q99)."""
    action = stats["action"]
    q01, q99 = np.asarray(action["q01"], dtype=np.float64), np.asarray(action["q99"], dtype=np.float64)
    mask = np.asarray(action.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
    return np.where(mask, 0.5 * (normalized + 1.0) * (q99 - q01) + q01, normalized)
