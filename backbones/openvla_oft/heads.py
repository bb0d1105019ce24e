"""OpenVLA-OFT's extra modules (proprio projector, L1 regression action head) and its BOUNDS_Q99 normalisation.

Parameter names follow the released `proprio_projector--*_checkpoint.pt` / `action_head--*_checkpoint.pt`
files (after stripping DDP's "module." prefix), so they load strictly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from vlacache.backbones.common.statistics import q99_bounds

__all__ = [
    "ProprioProjector",
    "MLPResNetBlock",
    "MLPResNet",
    "L1RegressionActionHead",
    "unnormalize_actions",
]


class ProprioProjector(nn.Module):
    """Robot state -> one decoder token: fc1 (proprio_dim -> llm_dim), GELU, fc2 (llm_dim -> llm_dim)."""

    def __init__(self, llm_dim: int, proprio_dim: int) -> None:
        super().__init__()
        self.llm_dim, self.proprio_dim = llm_dim, proprio_dim
        self.fc1 = nn.Linear(proprio_dim, llm_dim, bias=True)
        self.fc2 = nn.Linear(llm_dim, llm_dim, bias=True)
        self.act_fn1 = nn.GELU()

    def forward(self, proprio: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn1(self.fc1(proprio)))


class MLPResNetBlock(nn.Module):
    """x + ReLU(Linear(LayerNorm(x))), as `ffn.0` (LayerNorm), `ffn.1` (Linear), `ffn.2` (ReLU)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    """LayerNorm -> fc1 -> ReLU -> residual blocks -> LayerNorm -> fc2."""

    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.mlp_resnet_blocks = nn.ModuleList(MLPResNetBlock(hidden_dim) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class L1RegressionActionHead(nn.Module):
    """OFT's L1 regression head: the decoder's final hidden states of the action rows, reshaped to
    [B, chunk, action_dim * llm_dim] (one row per future action), through an MLPResNet -> [B, chunk, action_dim]."""

    def __init__(self, input_dim: int, hidden_dim: int, action_dim: int = 7, num_blocks: int = 2) -> None:
        super().__init__()
        self.input_dim, self.hidden_dim, self.action_dim = input_dim, hidden_dim, action_dim
        self.model = MLPResNet(num_blocks, input_dim * action_dim, hidden_dim, action_dim)

    def predict_action(self, hidden: torch.Tensor, chunk: int) -> torch.Tensor:
        """hidden: [B, chunk * action_dim, llm_dim] -> normalised actions [B, chunk, action_dim]."""
        return self.model(hidden.reshape(hidden.shape[0], chunk, -1))

    forward = predict_action


def unnormalize_actions(normalized: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """BOUNDS_Q99 inverse, as OFT: 0.5 (x + 1)(q99 - q01 + 1e-8) + q01 where mask (x elsewhere)."""
    low, high, mask = q99_bounds(stats, "action")
    x = np.asarray(normalized, dtype=np.float64)
    return np.where(mask, 0.5 * (x + 1.0) * (high - low + 1e-8) + low, x)
