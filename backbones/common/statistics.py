"""A checkpoint's dataset statistics: where they come from, which dataset's apply, and the BOUNDS_Q99
(un)normalisation of actions and proprio that OpenVLA, OpenVLA-OFT and CogACT share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from vlacache.types import InputError

from .checkpoint import CheckpointError, read_json

STATS_FILE = "dataset_statistics.json"


class NormStats(dict):
    """{dataset: {"action": {q01, q99, mask, ...}, "proprio": ...}} plus `sources`: which file offered which
    datasets (for error messages)."""

    def __init__(self, stats: dict[str, Any], sources: dict[str, list[str]]) -> None:
        super().__init__(stats)
        self.sources = sources


def load_norm_stats(ckpt_dir: str | os.PathLike[str], from_config: Any, config_name: str = "config.json") -> NormStats:
    """The statistics that un-normalise actions: the checkpoint dir's dataset_statistics.json when it has one
    (both official evaluations replace config.json's `norm_stats` with it), else config.json's `norm_stats`.
    Checked here, at load time: a missing, null or empty set of statistics, or a dataset without action q01/q99,
    is an error naming the file."""
    ckpt_dir = Path(ckpt_dir)
    stats_file = ckpt_dir / STATS_FILE
    sources = {config_name: sorted(from_config) if isinstance(from_config, dict) else []}
    if stats_file.is_file():
        stats, origin = read_json(stats_file), stats_file
        sources[STATS_FILE] = sorted(stats) if isinstance(stats, dict) else []
    else:
        stats, origin = from_config, ckpt_dir / config_name
        if not stats:
            raise CheckpointError(
                f"{origin} has no action statistics (norm_stats is {'empty' if stats == {} else repr(stats)}) and there is no "
                f"{stats_file.name} next to it; copy the checkpoint's {STATS_FILE} into {ckpt_dir}"
            )
    if not isinstance(stats, dict) or not stats:
        raise CheckpointError(f"{origin} holds no dataset statistics; restore it from the released checkpoint")
    bad = [k for k, v in stats.items() if not _has_action_bounds(v)]
    if bad:
        raise CheckpointError(f"{origin}: dataset(s) {bad} lack action q01/q99 statistics; "
                              "restore it from the released checkpoint")
    return NormStats(stats, sources)


def _has_action_bounds(entry: Any) -> bool:
    action = entry.get("action") if isinstance(entry, dict) else None
    if not isinstance(action, dict) or not {"q01", "q99"} <= set(action):
        return False
    q01, q99 = action["q01"], action["q99"]
    return isinstance(q01, list) and isinstance(q99, list) and len(q01) == len(q99) > 0


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
        sources = getattr(norm_stats, "sources", None) or {"the checkpoint": sorted(norm_stats)}
        listed = "; ".join(f"{name}: {keys}" for name, keys in sources.items())
        used = " (dataset_statistics.json is the one used)" if len(sources) > 1 else ""
        raise InputError(f"unknown unnorm_key '{key}'; datasets in {listed}{used}; pass one of {sorted(norm_stats)}")
    return key


def unnormalize(normalized: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """0.5 (x + 1)(q99 - q01) + q01 on the dimensions where mask is true (BOUNDS_Q99)."""
    action = stats["action"]
    q01, q99 = np.asarray(action["q01"], dtype=np.float64), np.asarray(action["q99"], dtype=np.float64)
    mask = np.asarray(action.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
    return np.where(mask, 0.5 * (normalized + 1.0) * (q99 - q01) + q01, normalized)


def q99_bounds(stats: dict[str, Any], what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q01, q99, mask) of one statistics entry ("action" or "proprio"), as float64 / bool arrays."""
    try:
        low, high = np.asarray(stats["q01"], dtype=np.float64), np.asarray(stats["q99"], dtype=np.float64)
    except KeyError as err:
        raise InputError(f"{what} statistics lack {err.args[0]!r}; BOUNDS_Q99 normalisation needs q01 and q99") from None
    mask = np.asarray(stats.get("mask", np.ones_like(low, dtype=bool)), dtype=bool)
    return low, high, mask


def normalize_q99(values: np.ndarray, stats: dict[str, Any], what: str = "proprio") -> np.ndarray:
    """BOUNDS_Q99: 2 (p - q01) / (q99 - q01 + 1e-8) - 1 where mask (p elsewhere), then clipped to [-1, 1].
    `what="action"` normalises actions the same way (the training targets)."""
    low, high, mask = q99_bounds(stats, what)
    p = np.asarray(values, dtype=np.float64)
    return np.clip(np.where(mask, 2.0 * (p - low) / (high - low + 1e-8) - 1.0, p), -1.0, 1.0)


NORMALIZATIONS = ("BOUNDS_Q99", "MEAN_STD", "QUANTILES")


def normalize(values: np.ndarray, stats: dict[str, Any], what: str) -> np.ndarray:
    """Normalise `values` with one statistics entry by its "normalization" (BOUNDS_Q99 when absent, as the
    OpenVLA family's files; MEAN_STD and QUANTILES as LeRobot's normalizer writes them: (x - mean) / (std + 1e-8)
    and 2 (x - q01) / (q99 - q01) - 1, the denominator 1e-8 where q99 = q01)."""
    mode = normalization(stats, what)
    x = np.asarray(values, dtype=np.float64)
    if mode == "BOUNDS_Q99":
        return normalize_q99(x, stats, what)
    if mode == "MEAN_STD":
        return (x - _stat(stats, "mean", what)) / (_stat(stats, "std", what) + 1e-8)
    low, high = _stat(stats, "q01", what), _stat(stats, "q99", what)
    span = high - low
    return 2.0 * (x - low) / np.where(span == 0, 1e-8, span) - 1.0


def denormalize(values: np.ndarray, stats: dict[str, Any], what: str) -> np.ndarray:
    """The inverse of `normalize` for one statistics entry (BOUNDS_Q99: on the masked dimensions only)."""
    mode = normalization(stats, what)
    x = np.asarray(values, dtype=np.float64)
    if mode == "BOUNDS_Q99":
        return unnormalize(x, {"action": stats})
    if mode == "MEAN_STD":
        return x * _stat(stats, "std", what) + _stat(stats, "mean", what)
    low, high = _stat(stats, "q01", what), _stat(stats, "q99", what)
    return (x + 1.0) * (high - low) / 2.0 + low


def normalization(stats: dict[str, Any], what: str) -> str:
    mode = stats.get("normalization", "BOUNDS_Q99")
    if mode not in NORMALIZATIONS:
        raise InputError(f"{what} statistics name normalization {mode!r}; supported: {list(NORMALIZATIONS)}")
    return mode


def _stat(stats: dict[str, Any], key: str, what: str) -> np.ndarray:
    if key not in stats:
        raise InputError(f"{what} statistics lack {key!r}, which their {stats.get('normalization')} normalisation needs")
    return np.asarray(stats[key], dtype=np.float64)
