"""CogACT's adaptive action ensemble (used in its SIMPLER evaluation).

Every policy query predicts a chunk of actions for the current and the following steps. The ensembler keeps
the last `pred_action_horizon` chunks; the action executed now is the weighted mean of what each kept chunk
predicted for *this* step (the newest chunk's first action, the previous chunk's second, ...), with weights
exp(alpha * cos_sim(prediction, newest prediction)) normalised to sum 1 (cosine with a 1e-7 guard).
"""

from __future__ import annotations

from collections import deque

import numpy as np


class AdaptiveEnsembler:
    """Per batch element, as CogACT's `AdaptiveEnsembler`; chunks are [B, T, D] (or [T, D], or [D])."""

    def __init__(self, pred_action_horizon: int, adaptive_ensemble_alpha: float = 0.0) -> None:
        if pred_action_horizon < 1:
            raise ValueError(f"pred_action_horizon must be >= 1, got {pred_action_horizon}")
        self.pred_action_horizon = pred_action_horizon
        self.adaptive_ensemble_alpha = adaptive_ensemble_alpha
        self.action_history: deque[np.ndarray] = deque(maxlen=pred_action_horizon)

    def reset(self) -> None:
        self.action_history.clear()

    def ensemble_action(self, cur_action: np.ndarray) -> np.ndarray:
        """Add the newest prediction and return the action for the current step ([B, D], [D] or [D])."""
        cur_action = np.asarray(cur_action)
        if self.action_history and self.action_history[-1].shape != cur_action.shape:
            raise ValueError(
                f"action chunk of shape {cur_action.shape} after {self.action_history[-1].shape}; reset() the "
                "ensembler when the batch or chunk size changes"
            )
        if cur_action.ndim >= 2 and cur_action.shape[-2] < self.pred_action_horizon:
            raise ValueError(f"chunks of {cur_action.shape[-2]} actions cannot cover a horizon of {self.pred_action_horizon}")
        self.action_history.append(cur_action)
        n = len(self.action_history)
        if cur_action.ndim == 1:  # one action per query: plain history
            preds = np.stack(self.action_history)[:, None]  # [n, 1, D]
        elif cur_action.ndim == 2:  # a chunk [T, D]: chunk k predicted this step at index n - 1 - k
            preds = np.stack([chunk[n - 1 - k] for k, chunk in enumerate(self.action_history)])[:, None]
        else:  # a batch of chunks [B, T, D]
            preds = np.stack([chunk[:, n - 1 - k] for k, chunk in enumerate(self.action_history)])  # [n, B, D]
        ref = preds[-1]
        dot = np.sum(preds * ref, axis=-1)
        cos = dot / (np.linalg.norm(preds, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-7)
        weights = np.exp(self.adaptive_ensemble_alpha * cos)
        weights = weights / weights.sum(axis=0, keepdims=True)
        out = np.sum(weights[..., None] * preds, axis=0)
        return out if cur_action.ndim == 3 else out[0]
