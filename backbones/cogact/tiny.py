"""Random-weight CogACT models of the released structure (the shared tiny towers, tokenizer and decoder
sizes; a 2-block DiT of width 32), for tests and CPU runs."""

from __future__ import annotations

import torch

from vlacache.backbones.common.tiny import DECODER_PRESETS, TINY_PAD_ID, TINY_VOCAB, libero_action_stats
from vlacache.backbones.common.tokenizer import load_tokenizer, tiny_tokenizer_dir
from vlacache.types import InputError

from .config import CogACTConfig
from .model import build_action_model, build_vlm, place

PRESETS: dict[str, dict] = {
    "tiny": dict(llm=DECODER_PRESETS["tiny"], action_model_type="vlacache-tiny-DiT",
                 vision="vlacache-tiny-dinosiglip-224px"),
    # the micro-policy (vlacache train): the OpenVLA micro preset's 128 px towers and 4 x 128 decoder, a 3-block DiT
    "micro": dict(llm={k: v for k, v in DECODER_PRESETS["micro"].items() if k != "towers"},
                  action_model_type="vlacache-micro-DiT", vision="vlacache-micro-dinosiglip-128px"),
    # the CPU benchmarks' ~25M decoder (as OpenVLA's and OFT's cpu-25m) with the paper's DiT-B action model
    "cpu-25m": dict(llm=DECODER_PRESETS["cpu-25m"], action_model_type="DiT-B", vision="vlacache-tiny-dinosiglip-224px"),
}


def preset_config(name: str) -> CogACTConfig:
    """The config.json (+ dataset statistics) of a random-weight preset."""
    if name not in PRESETS:
        raise InputError(f"unknown CogACT preset '{name}'; presets: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    text = dict(model_type="llama", vocab_size=TINY_VOCAB, pad_token_id=TINY_PAD_ID, max_position_embeddings=2048,
                rms_norm_eps=1e-5, **preset["llm"])
    stats = libero_action_stats()
    data = {
        "vision_backbone_id": preset["vision"],
        "llm_backbone_id": f"vlacache-{name}-llama",
        "arch_specifier": "no-align+fused-gelu-mlp",
        "image_resize_strategy": "resize-naive",
        "llm_max_length": 2048,
        "action_model_type": preset["action_model_type"],
        "action_dim": 7,
        "future_action_window_size": 15,
        "past_action_window_size": 0,
        "text_config": text,
    }
    return CogACTConfig.from_dict(data, {"bridge_orig": stats})


def build_preset(name: str, seed: int = 0, device="cpu", dtype=torch.float32, attn_implementation="sdpa", **options):
    """A random-weight CogACTBackbone of preset `name`, deterministic for a given seed; `options` are
    CogACTBackbone's (unnorm_key, cfg_scale, ddim_steps, action_ensemble, ensemble_horizon, ensemble_alpha, noise)."""
    from .backbone import CogACTBackbone

    config = preset_config(name)
    torch.manual_seed(seed)
    vlm = build_vlm(config, attn_implementation)
    action_model = build_action_model(config, vlm.language_model.config.hidden_size)
    action_model.net.reset_parameters()
    vlm, action_model = place(vlm, action_model, torch.device(device), dtype)
    return CogACTBackbone(vlm, action_model, load_tokenizer(tiny_tokenizer_dir()), config, seed=seed, **options)
