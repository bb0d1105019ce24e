"""The Prismatic VLM that OpenVLA, OpenVLA-OFT and CogACT build on, with OpenVLA's released key names:
vision_backbone, projector, language_model."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM

from .checkpoint import CheckpointError
from .config import OpenVLAConfig
from .vision import FusedMLPProjector, FusedVisionBackbone, get_vit_spec


class PrismaticVLM(nn.Module):
    """Fused DINOv2 + SigLIP towers, the GELU MLP projector, and a stock transformers LlamaForCausalLM."""

    def __init__(self, config: OpenVLAConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        featurizer, fused = (get_vit_spec(i) for i in config.timm_model_ids)
        for spec, size in zip((featurizer, fused), config.image_sizes):
            if spec.img_size != size:
                raise CheckpointError(f"image_sizes {config.image_sizes} do not match the towers' input size {spec.img_size}")
        self.featurizer_spec, self.fused_spec = featurizer, fused
        self.vision_backbone = FusedVisionBackbone(featurizer, fused)
        llama = config.llama_config(attn_implementation)
        self.projector = FusedMLPProjector(self.vision_backbone.embed_dim, llama.hidden_size)
        self.language_model = LlamaForCausalLM(llama)

    def vision_flops(self) -> float:
        """One image through both towers (all blocks but the unused last) and the projector, 2 x MACs."""
        total = 0.0
        n = self.vision_backbone.num_patches
        for spec in (self.featurizer_spec, self.fused_spec):
            tokens = n + int(spec.class_token) + spec.reg_tokens
            d = spec.embed_dim
            block = 2 * tokens * (4 * d * d + 2 * d * spec.mlp_dim) + 4 * tokens * tokens * d
            total += (spec.depth - 1) * block + 2 * n * 3 * spec.patch_size**2 * d
        vd, ld = self.vision_backbone.embed_dim, self.language_model.config.hidden_size
        return total + 2 * n * (vd * 4 * vd + 4 * vd * ld + ld * ld)

    def embed(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """[BOS] + projected patch tokens + the rest of the prompt, as decoder input embeddings."""
        patches = self.projector(self.vision_backbone(pixel_values))
        text = self.language_model.get_input_embeddings()(input_ids)
        return torch.cat([text[:, :1], patches.to(text.dtype), text[:, 1:]], dim=1)


def _rebuild_rotary(model: nn.Module, device: torch.device) -> None:
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb"):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            with torch.device(device):
                setattr(parent, name.rsplit(".", 1)[-1], type(module)(config=module.config))


def place_model(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move to device/dtype. Rotary tables are rebuilt: after a meta-device build + assign-load they were never
    materialised (they are not in checkpoints), and a dtype cast must not round them to bf16."""
    _rebuild_rotary(model, torch.device("cpu"))
    model = model.to(device=device, dtype=dtype)
    _rebuild_rotary(model, device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"tensors left uninitialised after loading: {left[:10]}")
    return model
