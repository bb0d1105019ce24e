"""CogACT's two networks: the Prismatic VLM (the shared library's) and the DiT action model."""

from __future__ import annotations

import torch

from vlacache.backbones.common.config import OpenVLAConfig
from vlacache.backbones.common.vision import get_vit_spec
from vlacache.backbones.common.vlm import PrismaticVLM, place_model

from .action_model import ActionModel, DiT
from .config import LLM_BACKBONES, CogACTConfig


def vlm_config(config: CogACTConfig, vocab_size: int | None = None) -> OpenVLAConfig:
    """The same VLM as OpenVLA's (fused towers, GELU-MLP projector, Llama): describe it as an OpenVLA config."""
    text = dict(config.text_config) if config.text_config is not None else dict(LLM_BACKBONES[config.llm_backbone_id])
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    return OpenVLAConfig(
        vision_backbone_id=config.vision_backbone_id,
        arch_specifier=config.arch_specifier,
        use_fused_vision_backbone=True,
        timm_model_ids=list(config.timm_model_ids),
        image_sizes=[get_vit_spec(tower).img_size for tower in config.timm_model_ids],
        text_config=text,
        norm_stats=config.norm_stats,
        llm_backbone_id=config.llm_backbone_id,
        image_resize_strategy=config.image_resize_strategy,
    )


def build_vlm(config: CogACTConfig, attn_implementation: str = "sdpa", vocab_size: int | None = None) -> PrismaticVLM:
    return PrismaticVLM(vlm_config(config, vocab_size), attn_implementation)


def build_action_model(config: CogACTConfig, token_size: int) -> ActionModel:
    return ActionModel(
        DiT(
            in_channels=config.action_dim,
            token_size=token_size,
            future_action_window_size=config.future_action_window_size,
            past_action_window_size=config.past_action_window_size,
            **config.dit,
        )
    )


def place(vlm: PrismaticVLM, action_model: ActionModel, device: torch.device, dtype: torch.dtype):
    """VLM to `dtype`; the action head always runs in float32, as CogACT's inference does (it casts only the
    VLM to bf16 and the cognition feature to the head's dtype)."""
    vlm = place_model(vlm, device, dtype).eval()
    action_model = action_model.to(device=device, dtype=torch.float32).eval()
    return vlm, action_model
