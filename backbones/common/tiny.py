"""What the random-weight presets of the Prismatic families share (for tests, CPU benchmarks, the micro-policies):
the decoder sizes and towers of each preset, the tiny tokenizer's vocabulary, LIBERO-like action statistics, and
the OpenVLA config.json of a preset."""

from __future__ import annotations

from vlacache.types import InputError

from .config import OpenVLAConfig
from .vision import get_vit_spec

_TINY_TOWERS = ["vlacache-tiny-dinov2-reg4", "vlacache-tiny-siglip"]
# The tiny tokenizer has 512 pieces + <PAD>; the model vocabulary is padded to a multiple of 64 like OpenVLA's.
TINY_VOCAB = 576
TINY_PAD_ID = 512

_MICRO_TOWERS = ["vlacache-micro-dinov2-reg4", "vlacache-micro-siglip"]
_MICRO_FINE_TOWERS = ["vlacache-micro-fine-dinov2-reg4", "vlacache-micro-fine-siglip"]
_MICRO_WIDE_TOWERS = ["vlacache-micro-wide-dinov2-reg4", "vlacache-micro-wide-siglip"]
_RELEASED_TOWERS = ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"]

# Decoder sizes, and the vision towers (224 px, 14 px patches unless named) of each preset.
DECODER_PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
    "cpu-25m": dict(hidden_size=768, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=12, num_key_value_heads=12),
    # the micro-policies (vlacache train): 128 px cameras, an 8 x 8 patch grid, a 4 x 128 decoder
    "micro": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                  towers=_MICRO_TOWERS),
    # the same on a 16 x 16 grid of 8 px patches (4x the visual tokens): a single camera seen in finer detail
    "micro-fine": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, towers=_MICRO_FINE_TOWERS),
    # `micro` with twice the hidden width in the decoder (4 x 256; MLP 512, not 688, to ship under 10 MB in bf16)
    # and the towers (128): the one-camera policy underfits at `micro`
    "micro-wide": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=8, towers=_MICRO_WIDE_TOWERS),
    # `micro` with a deeper decoder (8 and 16 layers of the same width): does the drift of reused K/V depend on depth?
    "micro-deep8": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=8, num_attention_heads=4,
                        num_key_value_heads=4, towers=_MICRO_TOWERS),
    "micro-deep16": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=16, num_attention_heads=4,
                         num_key_value_heads=4, towers=_MICRO_TOWERS),
    # the released size (Llama-2-7B, DINOv2 ViT-L + SigLIP so400m at 224 px, the 32064-row vocabulary), for the
    # real-size CPU benchmarks (scripts/bench_7b.py): build it in bfloat16 (15 GB), never in a test
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, towers=_RELEASED_TOWERS, vocab_size=32064),
}

# LIBERO-like statistics so the un-normalised actions have realistic ranges.
_LIBERO_Q01 = [-0.75, -0.80, -0.94, -0.12, -0.17, -0.21, 0.0]
_LIBERO_Q99 = [0.94, 0.86, 0.94, 0.13, 0.17, 0.29, 1.0]


def libero_action_stats() -> dict:
    """A fresh {"action": {q01, q99, mask, ...}} entry with LIBERO-like bounds (each preset owns its copy)."""
    return {"action": {"q01": list(_LIBERO_Q01), "q99": list(_LIBERO_Q99), "mask": [True] * 6 + [False],
                       "mean": [0.0] * 7, "std": [1.0] * 7, "min": list(_LIBERO_Q01), "max": list(_LIBERO_Q99)}}


def preset_openvla_config(name: str) -> OpenVLAConfig:
    """An OpenVLA config.json (original field layout) for the random-weight preset `name` of DECODER_PRESETS."""
    if name not in DECODER_PRESETS:
        raise InputError(f"unknown preset '{name}'; presets: {', '.join(DECODER_PRESETS)}")
    sizes = dict(DECODER_PRESETS[name])
    towers = sizes.pop("towers", _TINY_TOWERS)
    vocab = sizes.pop("vocab_size", TINY_VOCAB)
    text = dict(model_type="llama", vocab_size=vocab, pad_token_id=TINY_PAD_ID, max_position_embeddings=2048,
                rms_norm_eps=1e-6, **sizes)
    stats = libero_action_stats()
    data = {
        "model_type": "openvla",
        "architectures": ["OpenVLAForActionPrediction"],
        "vision_backbone_id": "dinosiglip-vit-so-224px",
        "llm_backbone_id": f"vlacache-{name}-llama",
        "arch_specifier": "no-align+fused-gelu-mlp",
        "use_fused_vision_backbone": True,
        "timm_model_ids": list(towers),
        "timm_override_act_layers": [None, None],
        "image_sizes": [get_vit_spec(t).img_size for t in towers],
        "image_resize_strategy": "resize-naive",
        "n_action_bins": 256,
        "pad_token_id": TINY_PAD_ID,
        "pad_to_multiple_of": 64,
        "llm_max_length": 2048,
        "output_projector_states": False,
        "norm_stats": {"libero_spatial_no_noops": stats},
        "text_config": text,
        "torch_dtype": "float32",
    }
    return OpenVLAConfig.from_dict(data)
