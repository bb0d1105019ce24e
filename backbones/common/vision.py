"""timm-compatible Vision Transformers, fused DINOv2 + SigLIP backbone and projector, in plain torch.

Parameter names follow timm exactly (with OpenVLA's LayerScale rename ``gamma`` -> ``scale_factor``), so
the ``vision_backbone.*`` and ``projector.*`` weights of a released OpenVLA checkpoint load strictly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlacache.errors import VlacacheError

__all__ = [
    "ViTSpec",
    "VIT_SPECS",
    "UnknownViTError",
    "get_vit_spec",
    "VisionTransformer",
    "FusedVisionBackbone",
    "FusedMLPProjector",
    "normalize_for_towers",
]

_ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}
_GLOBAL_POOLS = ("token", "map", "")


@dataclass(frozen=True)
class ViTSpec:
    """Architecture of one ViT tower (the subset of timm's VisionTransformer options OpenVLA uses)."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    class_token: bool
    reg_tokens: int
    layer_scale: bool
    global_pool: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    img_size: int = 224
    patch_size: int = 14
    norm_eps: float = 1e-6
    act: str = "gelu"

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}; "
                "pick a head count that divides the width"
            )
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}; "
                "use an image size that the patch size divides"
            )
        if self.depth < 2:
            raise ValueError(
                f"depth {self.depth} < 2: OpenVLA reads the second-to-last block, so a tower needs >= 2 blocks"
            )
        if self.global_pool not in _GLOBAL_POOLS:
            raise ValueError(f"global_pool {self.global_pool!r} is not one of {_GLOBAL_POOLS}")
        if self.act not in _ACTIVATIONS:
            raise ValueError(f"act {self.act!r} is not one of {sorted(_ACTIVATIONS)}")

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols) at ``img_size``."""
        side = self.img_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        """Number of patch tokens at ``img_size``."""
        rows, cols = self.grid
        return rows * cols

    @property
    def num_prefix_tokens(self) -> int:
        """Class + register tokens prepended to the patch tokens."""
        return int(self.class_token) + self.reg_tokens


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_HALF = (0.5, 0.5, 0.5)

VIT_SPECS: dict[str, ViTSpec] = {
    "vit_large_patch14_reg4_dinov2.lvd142m": ViTSpec(
        embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096, class_token=True, reg_tokens=4,
        layer_scale=True, global_pool="token", mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
    ),
    "vit_so400m_patch14_siglip_224": ViTSpec(
        embed_dim=1152, depth=27, num_heads=16, mlp_dim=4304, class_token=False, reg_tokens=0,
        layer_scale=False, global_pool="map", mean=_HALF, std=_HALF,
    ),
    "vlacache-tiny-dinov2-reg4": ViTSpec(
        embed_dim=32, depth=3, num_heads=2, mlp_dim=64, class_token=True, reg_tokens=4,
        layer_scale=True, global_pool="token", mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
    ),
    "vlacache-tiny-siglip": ViTSpec(
        embed_dim=48, depth=3, num_heads=2, mlp_dim=96, class_token=False, reg_tokens=0,
        layer_scale=False, global_pool="map", mean=_HALF, std=_HALF,
    ),
    # The micro-policies trained here (vlacache train): 128 px images, 16 px patches, an 8 x 8 grid per camera.
    "vlacache-micro-dinov2-reg4": ViTSpec(
        embed_dim=64, depth=4, num_heads=4, mlp_dim=128, class_token=True, reg_tokens=4,
        layer_scale=True, global_pool="token", mean=_IMAGENET_MEAN, std=_IMAGENET_STD, img_size=128, patch_size=16,
    ),
    "vlacache-micro-siglip": ViTSpec(
        embed_dim=64, depth=4, num_heads=4, mlp_dim=128, class_token=False, reg_tokens=0,
        layer_scale=False, global_pool="map", mean=_HALF, std=_HALF, img_size=128, patch_size=16,
    ),
}
# The micro towers on a 16 x 16 grid of 8 px patches (the `micro-fine` preset), and twice as wide (`micro-wide`).
for _tower in ("dinov2-reg4", "siglip"):
    VIT_SPECS[f"vlacache-micro-fine-{_tower}"] = dataclasses.replace(VIT_SPECS[f"vlacache-micro-{_tower}"], patch_size=8)
    VIT_SPECS[f"vlacache-micro-wide-{_tower}"] = dataclasses.replace(VIT_SPECS[f"vlacache-micro-{_tower}"],
                                                                     embed_dim=128, mlp_dim=256)


class UnknownViTError(VlacacheError, KeyError):
    """Raised for a timm model id that has no entry in ``VIT_SPECS``."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def get_vit_spec(timm_id: str) -> ViTSpec:
    """Return the ``ViTSpec`` registered for a timm model id (as listed in OpenVLA's ``timm_model_ids``)."""
    try:
        return VIT_SPECS[timm_id]
    except KeyError:
        known = ", ".join(sorted(VIT_SPECS))
        raise UnknownViTError(
            f"unknown vision tower {timm_id!r}; known ids: {known}. "
            "Add a ViTSpec for it to VIT_SPECS in vlacache.backbones.common.vision"
        ) from None


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (timm ``patch_embed``)."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm ``Attention``)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two-layer MLP (timm ``Mlp``)."""

    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate=_ACTIVATIONS[act])
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scaling; OpenVLA names the parameter ``scale_factor`` (timm: ``gamma``)."""

    def __init__(self, dim: int, init_value: float = 0.1) -> None:
        super().__init__()
        self.scale_factor = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


class Block(nn.Module):
    """Pre-norm transformer block (timm ``Block``)."""

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        d = spec.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=spec.norm_eps)
        self.attn = Attention(d, spec.num_heads)
        self.ls1 = LayerScale(d) if spec.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=spec.norm_eps)
        self.mlp = Mlp(d, spec.mlp_dim, spec.act)
        self.ls2 = LayerScale(d) if spec.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class AttentionPoolLatent(nn.Module):
    """Parameters of timm's attention-pool head (SigLIP ``map`` pooling); held only for strict loading."""

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        d = spec.embed_dim
        self.latent = nn.Parameter(torch.zeros(1, 1, d))
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=spec.norm_eps)
        self.mlp = Mlp(d, spec.mlp_dim, spec.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "attn_pool exists only so released checkpoints load strictly; OpenVLA never pools the towers"
        )


class VisionTransformer(nn.Module):
    """A timm ViT whose forward returns the patch tokens of the second-to-last block (OpenVLA featurizer)."""

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.spec = spec
        d = spec.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if spec.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, spec.reg_tokens, d)) if spec.reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.num_patches, d))
        self.patch_embed = PatchEmbed(spec.patch_size, d)
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(d, eps=spec.norm_eps)
        self.attn_pool = AttentionPoolLatent(spec) if spec.global_pool == "map" else None
        self.reset_parameters()

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @property
    def num_patches(self) -> int:
        return self.spec.num_patches

    @property
    def feature_block_index(self) -> int:
        """Index of the block whose output ``forward`` returns (``depth - 2``)."""
        return self.spec.depth - 2

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random, sane initialisation (uses the global torch RNG; seed with ``torch.manual_seed``)."""
        for name, param in self.named_parameters():
            if param.device.type == "meta":
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "scale_factor":
                param.fill_(0.1)
            elif leaf == "bias":
                param.zero_()
            elif param.ndim == 1:
                param.fill_(1.0)
            else:
                nn.init.trunc_normal_(param, std=0.02, a=-0.04, b=0.04)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Map normalised pixels ``[B, 3, H, W]`` to patch tokens ``[B, num_patches, D]``."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"expected pixel_values of shape [B, 3, H, W], got {tuple(pixel_values.shape)}; "
                "pass one normalised RGB image batch per tower"
            )
        size = self.spec.img_size
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"image is {tuple(pixel_values.shape[-2:])} but this tower's pos_embed covers {size}x{size}; "
                f"resize the images to {size}x{size} first"
            )
        x = self.patch_embed(pixel_values.to(self.pos_embed.dtype)) + self.pos_embed
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if prefix:
            x = torch.cat([*prefix, x], dim=1)
        for block in self.blocks[: self.feature_block_index + 1]:
            x = block(x)
        return x[:, self.spec.num_prefix_tokens :]


class FusedVisionBackbone(nn.Module):
    """DINOv2 (``featurizer``) + SigLIP (``fused_featurizer``) towers, patch tokens concatenated on channels."""

    def __init__(self, featurizer_spec: ViTSpec, fused_spec: ViTSpec) -> None:
        super().__init__()
        if featurizer_spec.grid != fused_spec.grid or featurizer_spec.patch_size != fused_spec.patch_size:
            raise ValueError(
                f"the towers' patch grids differ: featurizer {featurizer_spec.grid} (patch "
                f"{featurizer_spec.patch_size}) vs fused_featurizer {fused_spec.grid} (patch "
                f"{fused_spec.patch_size}); use specs with the same img_size and patch_size"
            )
        self.featurizer = VisionTransformer(featurizer_spec)
        self.fused_featurizer = VisionTransformer(fused_spec)

    @property
    def embed_dim(self) -> int:
        return self.featurizer.embed_dim + self.fused_featurizer.embed_dim

    @property
    def num_patches(self) -> int:
        return self.featurizer.num_patches

    @property
    def grid(self) -> tuple[int, int]:
        return self.featurizer.spec.grid

    @property
    def patch_size(self) -> int:
        return self.featurizer.spec.patch_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Map ``[B, 6, H, W]`` (featurizer channels, then fused channels) to ``[B, N, D1 + D2]``."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 6:
            raise ValueError(
                f"expected pixel_values of shape [B, 6, H, W], got {tuple(pixel_values.shape)}; "
                "build them with normalize_for_towers"
            )
        first = self.featurizer(pixel_values[:, :3])
        second = self.fused_featurizer(pixel_values[:, 3:])
        return torch.cat([first, second.to(first.dtype)], dim=2)


class FusedMLPProjector(nn.Module):
    """OpenVLA ``fused-gelu-mlp`` projector: vision_dim -> 4*vision_dim -> llm_dim -> llm_dim."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.act_fn1 = nn.GELU()
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.act_fn2 = nn.GELU()
        self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(patches)))))


def normalize_for_towers(
    images_uint8: torch.Tensor, featurizer_spec: ViTSpec, fused_spec: ViTSpec
) -> torch.Tensor:
    """Turn ``[B, H, W, 3]`` uint8 images into ``[B, 6, H, W]`` float32, normalised once per tower."""
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 images of shape [B, H, W, 3], got {images_uint8.dtype} "
            f"{tuple(images_uint8.shape)}; stack HWC RGB uint8 frames (add a batch dim for one image)"
        )
    x = images_uint8.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    towers = []
    for spec in (featurizer_spec, fused_spec):
        mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        towers.append((x - mean) / std)
    return torch.cat(towers, dim=1)
