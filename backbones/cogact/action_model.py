"""CogACT's diffusion action head: a DiT over (condition token + action tokens) and DDIM sampling with CFG.

Structure and key names follow CogACT's `action_model/models.py` and `action_model.py` (public code): the
checkpoint's `action_model` dict is the state dict of `ActionModel`, whose only module is `net` (the DiT):

  net.history_embedder.linear.{weight,bias}   Linear(7 -> D); built but never used by CogACT, stored anyway
  net.x_embedder.linear.{weight,bias}         Linear(7 -> D), the noisy actions
  net.t_embedder.mlp.{0,2}.{weight,bias}      Linear(256 -> D), SiLU, Linear(D -> D) on a 256-d sinusoid
  net.z_embedder.linear.{weight,bias}         Linear(4096 -> D), the cognition feature
  net.z_embedder.uncondition                  [1, 4096], the learned "no condition" input for CFG
  net.positional_embedding                    [future + past + 2, D] = [17, D]: the condition token, then
                                              the 16 action tokens
  net.blocks.N.attn.{qkv,proj}.{weight,bias}  timm Attention (qkv bias), pre-norm blocks
  net.blocks.N.mlp.{fc1,fc2}.{weight,bias}    timm Mlp, GELU (tanh approximation), ratio 4
  net.final_layer.linear.{weight,bias}        Linear(D -> 7) after a LayerNorm (learn_sigma False)

Every LayerNorm (norm1, norm2, final_layer.norm_final) has elementwise_affine=False, eps 1e-6: no keys.
The condition token is t_embedder(t) + z_embedder(z): CogACT's DiT is not adaLN-modulated.
Uncertainty: the sub-key names come from CogACT's public training code, not from inspecting a released .pt;
the loader lists expected vs found keys on any mismatch.

Diffusion (CogACT's `create_diffusion`): 100 training steps, "squaredcos_cap_v2" (cosine) betas, epsilon
prediction, fixed-small variance; sampling by DDIM on the respaced schedule "ddim10" (timesteps 0, 10, ..., 90,
the model sees the original timestep values), eta 0, no clipping of x0; classifier-free guidance
eps = eps_uncond + scale * (eps_cond - eps_uncond), the two passes batched.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from vlacache.backbones.common.vision import Attention, Mlp

FREQUENCY_EMBEDDING_SIZE = 256


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding (cos half, then sin half) of the diffusion step, then a SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        weight = self.mlp[0].weight
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size).to(weight.dtype))


class LinearEmbedder(nn.Module):
    """`x_embedder` / `history_embedder`: a Linear under the name `linear`."""

    def __init__(self, in_size: int, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class ConditionEmbedder(LinearEmbedder):
    """`z_embedder`: Linear on the cognition feature, plus the learned unconditional input for CFG."""

    def __init__(self, token_size: int, hidden_size: int) -> None:
        super().__init__(token_size, hidden_size)
        self.uncondition = nn.Parameter(torch.zeros(1, token_size))


class DiTBlock(nn.Module):
    """Plain pre-norm transformer block; the LayerNorms carry no parameters."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act="gelu_tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x))


class DiT(nn.Module):
    """CogACT's DiT: [t_emb + z_emb, x_emb(a_0..a_T-1)] + positions -> blocks -> predicted noise of the actions."""

    def __init__(
        self,
        in_channels: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        token_size: int,
        future_action_window_size: int,
        past_action_window_size: int = 0,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.history_embedder = LinearEmbedder(in_channels, hidden_size)
        self.x_embedder = LinearEmbedder(in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.z_embedder = ConditionEmbedder(token_size, hidden_size)
        rows = future_action_window_size + past_action_window_size + 2
        self.positional_embedding = nn.Parameter(torch.zeros(rows, hidden_size))
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, in_channels)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random initialisation for the presets (global torch RNG). Unlike CogACT's training init, the final
        layer is not zeroed, so random-weight actions depend on the condition."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.z_embedder.uncondition, std=0.02)
        self.positional_embedding.normal_(std=self.positional_embedding.shape[1] ** -0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x [N, T, C] noisy actions, t [N] diffusion steps, z [N, 1, token] conditions -> noise [N, T, C]."""
        x = self.x_embedder(x)
        c = self.t_embedder(t).unsqueeze(1) + self.z_embedder(z)
        x = torch.cat([c, x], dim=1)
        x = x + self.positional_embedding
        for block in self.blocks:
            x = block(x)
        return self.final_layer(x)[:, 1:]


class ActionModel(nn.Module):
    """The checkpoint's `action_model`: holds the DiT as `net` (the diffusion schedule has no weights)."""

    def __init__(self, net: DiT) -> None:
        super().__init__()
        self.net = net


# -- diffusion --------------------------------------------------------------------------------------------


def cosine_betas(steps: int, max_beta: float = 0.999) -> np.ndarray:
    """The "squaredcos_cap_v2" schedule: beta_i = min(1 - abar((i+1)/n) / abar(i/n), 0.999), float64."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)])


def ddim_timesteps(train_steps: int, sample_steps: int) -> list[int]:
    """guided-diffusion's `space_timesteps(n, "ddimK")`: the first stride giving exactly K steps from 0."""
    for stride in range(1, train_steps + 1):
        if len(range(0, train_steps, stride)) == sample_steps:
            return list(range(0, train_steps, stride))
    raise ValueError(f"cannot take exactly {sample_steps} DDIM steps with an even stride over {train_steps} steps")


class DDIMSampler:
    """Deterministic DDIM (eta 0) on the respaced cosine schedule, epsilon prediction, x0 not clipped."""

    def __init__(self, train_steps: int = 100, sample_steps: int = 10) -> None:
        self.timesteps = ddim_timesteps(train_steps, sample_steps)
        full = np.cumprod(1.0 - cosine_betas(train_steps))
        betas, last = [], 1.0  # respacing as guided-diffusion's SpacedDiffusion does it
        for i in self.timesteps:
            betas.append(1 - full[i] / last)
            last = full[i]
        alphas_cumprod = np.cumprod(1.0 - np.array(betas))
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.sqrt_recip = np.sqrt(1.0 / alphas_cumprod)
        self.sqrt_recipm1 = np.sqrt(1.0 / alphas_cumprod - 1)

    def sample(self, denoise, noise: torch.Tensor) -> torch.Tensor:
        """`denoise(x, t)` returns the predicted noise for x [B, T, C] at original timesteps t [B]."""
        x = noise
        batch = x.shape[0]
        for i in reversed(range(len(self.timesteps))):
            t = torch.full((batch,), self.timesteps[i], dtype=torch.long, device=x.device)
            eps = denoise(x, t)
            recip = torch.tensor(self.sqrt_recip[i], dtype=torch.float32, device=x.device)
            recipm1 = torch.tensor(self.sqrt_recipm1[i], dtype=torch.float32, device=x.device)
            pred_x0 = recip * x - recipm1 * eps
            eps = (recip * x - pred_x0) / recipm1
            prev = torch.tensor(self.alphas_cumprod_prev[i], dtype=torch.float32, device=x.device)
            x = pred_x0 * torch.sqrt(prev) + torch.sqrt(1 - prev) * eps
        return x


def sample_actions(
    net: DiT,
    cognition: torch.Tensor,
    noise: torch.Tensor,
    sampler: DDIMSampler,
    cfg_scale: float = 1.5,
) -> torch.Tensor:
    """Normalised actions [B, T, C] for cognition features [B, token] from the initial noise [B, T, C].

    cfg_scale > 1 batches a conditional and an unconditional pass (z = the learned `uncondition`), as CogACT's
    `forward_with_cfg`; cfg_scale <= 1 runs the conditional pass only."""
    dtype = net.x_embedder.linear.weight.dtype
    z = cognition[:, None].to(dtype)
    noise = noise.to(dtype)
    if cfg_scale > 1.0:
        uncond = net.z_embedder.uncondition[None].expand(z.shape[0], 1, -1)
        z_both = torch.cat([z, uncond], dim=0)

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            eps = net(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), z_both)
            cond, uncond_eps = eps.chunk(2, dim=0)
            return uncond_eps + cfg_scale * (cond - uncond_eps)

    else:

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return net(x, t, z)

    return sampler.sample(denoise, noise)
