"""Random-weight OpenVLA-OFT models of the released structure (the shared tiny towers, tokenizer and decoder sizes)."""

from __future__ import annotations

import torch

from vlacache.backbones.common.config import OpenVLAConfig
from vlacache.backbones.common.tiny import DECODER_PRESETS, preset_openvla_config
from vlacache.backbones.common.tokenizer import load_tokenizer, tiny_tokenizer_dir
from vlacache.backbones.common.vlm import PrismaticVLM
from vlacache.types import InputError

from .film import VisionFiLM
from .heads import L1RegressionActionHead, ProprioProjector

__all__ = ["PRESETS", "preset_config", "build_preset", "LIBERO_PROPRIO_Q01", "LIBERO_PROPRIO_Q99"]

# Width of the action head's MLPResNet (the released 7B head uses 4096).
PRESETS: dict[str, dict] = {"tiny": dict(head_hidden=64), "cpu-25m": dict(head_hidden=256), "micro": dict(head_hidden=256),
                            "micro-deep8": dict(head_hidden=256), "micro-deep16": dict(head_hidden=256),
                            "7b": dict(head_hidden=4096)}
assert set(PRESETS) <= set(DECODER_PRESETS)

# LIBERO-like robot-state statistics: eef position (3), axis-angle (3), gripper qpos (2).
LIBERO_PROPRIO_Q01 = [-0.21, -0.27, 0.90, 2.90, -0.85, -0.60, 0.000, -0.040]
LIBERO_PROPRIO_Q99 = [0.14, 0.31, 1.26, 3.30, 0.62, 0.42, 0.040, -0.001]


def preset_config(name: str) -> OpenVLAConfig:
    """OpenVLA's preset config.json with OFT's extra 'proprio' statistics."""
    if name not in PRESETS:
        raise InputError(f"unknown OpenVLA-OFT preset '{name}'; presets: {', '.join(PRESETS)}")
    data = preset_openvla_config(name).to_dict()
    data["llm_backbone_id"] = f"vlacache-{name}-llama-oft"
    for stats in data["norm_stats"].values():
        stats["proprio"] = {
            "q01": list(LIBERO_PROPRIO_Q01), "q99": list(LIBERO_PROPRIO_Q99),
            "min": list(LIBERO_PROPRIO_Q01), "max": list(LIBERO_PROPRIO_Q99),
            "mean": [(a + b) / 2 for a, b in zip(LIBERO_PROPRIO_Q01, LIBERO_PROPRIO_Q99)], "std": [0.1] * 8,
        }
    return OpenVLAConfig.from_dict(data)


@torch.no_grad()
def _round_to_bf16(module: torch.nn.Module) -> None:
    """Make the weights exactly bf16-representable: the released head ships in bf16, so save -> load is exact."""
    for param in module.parameters():
        param.copy_(param.to(torch.bfloat16).to(param.dtype))


def build_preset(
    name: str,
    seed: int = 0,
    device="cpu",
    dtype=torch.float32,
    attn_implementation: str = "sdpa",
    unnorm_key: str | None = None,
    chunk: int = 8,
    use_proprio: bool = True,
    center_crop: bool = False,
    film: bool = False,
):
    """A random-weight OpenVLAOFTBackbone of preset `name`, deterministic for a given seed. `film=True` adds
    random FiLM projections to both towers (drawn after every other weight, so the rest equals film=False)."""
    from .backbone import OpenVLAOFTBackbone

    config = preset_config(name)
    torch.manual_seed(seed)
    model = PrismaticVLM(config, attn_implementation)
    llm_dim = model.language_model.config.hidden_size
    stats = next(iter(config.norm_stats.values()))
    head = L1RegressionActionHead(llm_dim, PRESETS[name]["head_hidden"], len(stats["action"]["q01"]))
    _round_to_bf16(head)
    projector = ProprioProjector(llm_dim, len(stats["proprio"]["q01"])) if use_proprio else None
    film_module = VisionFiLM(model.vision_backbone, llm_dim) if film else None
    return OpenVLAOFTBackbone.placed(model, load_tokenizer(tiny_tokenizer_dir()), head, projector, film_module,
                                     device, dtype, chunk=chunk, unnorm_key=unnorm_key, center_crop=center_crop)
