"""Random-weight OpenVLA models of the real structure, for tests, CPU benchmarks and the embedded default."""

from __future__ import annotations

import torch

from vlacache.backbones.common.config import OpenVLAConfig
from vlacache.backbones.common.tiny import DECODER_PRESETS, preset_openvla_config
from vlacache.backbones.common.tokenizer import load_tokenizer, tiny_tokenizer_dir
from vlacache.backbones.common.vlm import PrismaticVLM, place_model
from vlacache.types import InputError

PRESETS = DECODER_PRESETS


def preset_config(name: str) -> OpenVLAConfig:
    """An OpenVLA config.json (original field layout) for a random-weight preset."""
    if name not in PRESETS:
        raise InputError(f"unknown OpenVLA preset '{name}'; presets: {', '.join(PRESETS)}")
    return preset_openvla_config(name)


def build_preset(name: str, seed: int = 0, device="cpu", dtype=torch.float32, attn_implementation="sdpa", unnorm_key=None):
    """A random-weight OpenVLABackbone of preset `name`, deterministic for a given seed."""
    from .backbone import OpenVLABackbone

    config = preset_config(name)
    torch.manual_seed(seed)
    model = PrismaticVLM(config, attn_implementation)
    model = place_model(model, torch.device(device), dtype)
    return OpenVLABackbone(model, load_tokenizer(tiny_tokenizer_dir()), unnorm_key)
