"""Random-weight π0 / π0.5 models of the real structure (SigLIP, PaliGemma's Gemma decoder, a Gemma expert), small
enough for tests and CPU runs, with the small local tokenizer."""

from __future__ import annotations

import torch

from vlacache.backbones.common.tokenizer import load_tokenizer, tiny_tokenizer_dir
from vlacache.types import InputError

# name -> (decoder hidden, layers, heads, expert hidden, vision hidden, vision layers, image size, patch, chunk)
PRESETS = {
    "tiny": (64, 4, 4, 32, 32, 2, 56, 14, 10),  # tests: 16 tokens per camera
    "micro": (128, 4, 4, 64, 64, 2, 128, 16, 8),  # trainable on a CPU: 128 px cameras, 64 tokens each, ~1M parameters
    # CPU benchmarks at the released token counts (224 px, 256 tokens per camera, chunk 50): the other families'
    # cpu-25m decoder (4 x 768), with SigLIP and the expert ~32M parameters
    "cpu-25m": (768, 4, 12, 384, 384, 4, 224, 14, 50),
}
RELEASED = "3b"  # the released π0 / π0.5 shape (transformers' default config): Gemma 2B + SigLIP so400m + 300M expert


def preset_config(cls, name: str, vocab: int):
    """The transformers config of preset `name` for `cls` (PI0Backbone / PI05Backbone)."""
    import transformers

    if name == RELEASED:
        return getattr(transformers, "PI05Config" if cls.state_in_prompt else "PI0Config")()
    if name not in PRESETS:
        raise InputError(f"unknown {cls.registry_name} preset '{name}'; presets: {', '.join([*PRESETS, RELEASED])}")
    hidden, layers, heads, expert, vision, vision_layers, image, patch, chunk = PRESETS[name]
    head_dim = hidden // heads
    config_class = getattr(transformers, "PI05Config" if cls.state_in_prompt else "PI0Config")
    fields = dict(
        vlm_config=dict(model_type="paligemma", projection_dim=hidden, image_token_id=vocab,
                        text_config=dict(model_type="gemma", hidden_size=hidden, num_hidden_layers=layers,
                                         intermediate_size=2 * hidden, num_attention_heads=heads, num_key_value_heads=1,
                                         head_dim=head_dim, vocab_size=vocab),
                        vision_config=dict(model_type="siglip_vision_model", hidden_size=vision,
                                           intermediate_size=2 * vision, num_hidden_layers=vision_layers,
                                           num_attention_heads=2, patch_size=patch, image_size=image, vision_use_head=False)),
        # the expert writes into the prefix cache by layer: same layers, kv heads and head_dim as the decoder
        dit_config=dict(model_type="gemma", hidden_size=expert, num_hidden_layers=layers, intermediate_size=2 * expert,
                        num_attention_heads=heads, num_key_value_heads=1, head_dim=head_dim),
        chunk_size=chunk, max_action_dim=8, num_inference_steps=10)
    if not cls.state_in_prompt:
        fields["max_state_dim"] = 8
    return config_class(**fields)


def build_preset(cls, name: str, seed: int = 0, device="cpu", dtype=torch.float32, attn_implementation="sdpa", **options):
    """A random-weight backbone of class `cls` and preset `name`, deterministic for a given seed, built in `dtype`
    (the '3b' preset: 3.3B parameters, 6.6 GB in bfloat16). π0.5's adaptive norms start at zero (the expert would
    ignore time and prefix), so they are drawn at random too."""
    import transformers

    tokenizer = load_tokenizer(tiny_tokenizer_dir())
    config = preset_config(cls, name, len(tokenizer))
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialised in place at its size: the 3B preset never exists in float32
    try:
        model = getattr(transformers, cls.model_class)(config)
    finally:
        torch.set_default_dtype(previous)
    if cls.state_in_prompt:
        with torch.no_grad():
            for module_name, module in model.named_modules():
                if module_name.endswith(("input_layernorm.dense", "post_attention_layernorm.dense", "norm.dense")):
                    module.weight.normal_(std=0.3)
                    module.bias.normal_(std=0.3)
    return cls(model.to(device, dtype), tokenizer, seed=options.pop("seed", seed), **options)
