"""OpenVLA's action tokens: the 256 bins of [-1, 1] mapped to the last ids of the text vocabulary."""

from __future__ import annotations

import numpy as np


def tokens_to_normalized(tokens: np.ndarray, text_vocab_size: int, n_bins: int = 256) -> np.ndarray:
    """Token id t -> bin clip(text_vocab_size - t - 1, 0, n_bins - 2) -> its centre in [-1, 1]."""
    edges = np.linspace(-1.0, 1.0, n_bins)
    centres = (edges[:-1] + edges[1:]) / 2.0
    index = np.clip(text_vocab_size - tokens.astype(np.int64) - 1, 0, centres.shape[0] - 1)
    return centres[index]


def normalized_to_tokens(normalized: np.ndarray, text_vocab_size: int, n_bins: int = 256) -> np.ndarray:
    """OpenVLA's ActionTokenizer: clip to [-1, 1], bin d = digitize(x, linspace(-1, 1, n_bins)) in [1, n_bins],
    token text_vocab_size - d (the inverse of `tokens_to_normalized` up to the bin width)."""
    bins = np.linspace(-1.0, 1.0, n_bins)
    return (text_vocab_size - np.digitize(np.clip(normalized, -1.0, 1.0), bins)).astype(np.int64)
