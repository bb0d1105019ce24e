"""The CogACT checkpoint's config.json, parsed into what the model needs.

A released CogACT folder (e.g. the hub repo CogACT/CogACT-Base) holds `checkpoints/<name>.pt`, a training
config and `dataset_statistics.json`. This loader reads `config.json` next to `checkpoints/` and looks each
field up at the top level, then under `"model"`, then under `"vla"` (training dumps nest them). Fields:

  vision_backbone_id       "dinosiglip-vit-so-224px"   (fused DINOv2 + SigLIP, 224 px)
  llm_backbone_id          "llama2-7b-pure"            (Llama-2-7B, Prismatic vocabulary 32064)
  arch_specifier           "no-align+fused-gelu-mlp"
  image_resize_strategy    "resize-naive"
  llm_max_length           2048
  action_model_type        "DiT-B"                     (DiT-S / DiT-B / DiT-L)
  action_dim               7
  future_action_window_size 15                          (16 predicted actions)
  past_action_window_size  0                           (CogACT supports only 0)

Uncertainty: the exact layout of the released training dump is not known here. When the VLM ids are absent
but `base_vlm` names a known Prismatic model ("prism-dinosiglip-224px+7b"), its ids are filled in. CogACT's
own loader takes action_model_type / future_action_window_size as arguments rather than from config.json, so
when config.json lacks them (and action_dim) they are read off the action-model weights (width and depth ->
DiT size, positional_embedding rows - 2 -> future window, x_embedder input -> action_dim).
`text_config` (LlamaConfig fields that differ from the defaults) is an optional extension used by the
random-weight presets, whose LLM is not one of the released ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import LlamaConfig

from vlacache.backbones.common.checkpoint import CheckpointError, check_field_types
from vlacache.backbones.common.config import checked_llama_config

# Prismatic vision backbone id -> (featurizer timm id, fused featurizer timm id), as in Prismatic's registry.
VISION_BACKBONES: dict[str, tuple[str, str]] = {
    "dinosiglip-vit-so-224px": ("vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"),
    "vlacache-tiny-dinosiglip-224px": ("vlacache-tiny-dinov2-reg4", "vlacache-tiny-siglip"),
    "vlacache-micro-dinosiglip-128px": ("vlacache-micro-dinov2-reg4", "vlacache-micro-siglip"),
}

# Prismatic LLM backbone id -> the LlamaConfig of the HF model it wraps (meta-llama/Llama-2-7b-hf), with the
# vocabulary Prismatic gives it: "<PAD>" added (id 32000) and the embeddings padded to a multiple of 64.
LLM_BACKBONES: dict[str, dict[str, Any]] = {
    "llama2-7b-pure": dict(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
        pad_token_id=32000, bos_token_id=1, eos_token_id=2,
    ),
}

# DiT sizes of CogACT's action model (action_model/action_model.py: DiT_S, DiT_B, DiT_L; MLP ratio 4).
ACTION_MODELS: dict[str, dict[str, int]] = {
    "DiT-S": dict(depth=6, hidden_size=384, num_heads=4),
    "DiT-B": dict(depth=12, hidden_size=768, num_heads=12),
    "DiT-L": dict(depth=24, hidden_size=1024, num_heads=16),
    "vlacache-tiny-DiT": dict(depth=2, hidden_size=32, num_heads=2),
    "vlacache-micro-DiT": dict(depth=3, hidden_size=128, num_heads=4),  # the micro-policy's head (vlacache train)
}

KNOWN_BASE_VLMS: dict[str, dict[str, str]] = {
    "prism-dinosiglip-224px+7b": dict(
        vision_backbone_id="dinosiglip-vit-so-224px", llm_backbone_id="llama2-7b-pure",
        arch_specifier="no-align+fused-gelu-mlp", image_resize_strategy="resize-naive",
    ),
}

_NOT_LLAMA_FIELDS = ("model_type", "architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path")
_SECTIONS = ("model", "vla")


def _lookup(data: dict[str, Any], name: str) -> Any:
    if name in data:
        return data[name]
    for section in _SECTIONS:
        if isinstance(data.get(section), dict) and name in data[section]:
            return data[section][name]
    return None


@dataclass
class CogACTConfig:
    """What a CogACT checkpoint needs besides its weights; `to_dict` writes the flat config.json layout."""

    vision_backbone_id: str = "dinosiglip-vit-so-224px"
    llm_backbone_id: str = "llama2-7b-pure"
    arch_specifier: str = "no-align+fused-gelu-mlp"
    image_resize_strategy: str = "resize-naive"
    llm_max_length: int = 2048
    action_model_type: str = "DiT-B"
    action_dim: int = 7
    future_action_window_size: int = 15
    past_action_window_size: int = 0
    text_config: dict[str, Any] | None = None
    norm_stats: dict[str, Any] = field(default_factory=dict, repr=False)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], norm_stats: dict[str, Any] | None = None, fallback: dict[str, Any] | None = None
    ) -> "CogACTConfig":
        """`fallback`: values for fields config.json does not have (e.g. `action_fields_from_weights`)."""
        if not isinstance(data, dict):
            raise CheckpointError(f"config.json must hold a JSON object, got {type(data).__name__}")
        values = {name: _lookup(data, name) for name in cls.__dataclass_fields__ if name not in ("norm_stats", "raw")}
        for name, value in (fallback or {}).items():
            if values.get(name) is None:
                values[name] = value
        base = _lookup(data, "base_vlm")
        if base in KNOWN_BASE_VLMS:
            for name, value in KNOWN_BASE_VLMS[base].items():
                values[name] = values[name] if values[name] is not None else value
        missing = [n for n in ("vision_backbone_id", "llm_backbone_id", "action_model_type") if values[n] is None]
        if missing:
            raise CheckpointError(
                f"config.json lacks the CogACT field(s) {missing} (and they cannot be inferred); expected "
                "vision_backbone_id, llm_backbone_id (or vla.base_vlm), arch_specifier, action_model_type, "
                "future_action_window_size (top level, or under 'model' / 'vla')"
            )
        values = {k: v for k, v in values.items() if v is not None}
        check_field_types(cls, values, "config.json")
        config = cls(**values, norm_stats=norm_stats if norm_stats is not None else {}, raw=dict(data))
        config.validate()
        return config

    def validate(self) -> None:
        if self.vision_backbone_id not in VISION_BACKBONES:
            raise CheckpointError(f"vision_backbone_id '{self.vision_backbone_id}' is not supported; "
                                  f"known: {sorted(VISION_BACKBONES)}")
        if self.llm_backbone_id not in LLM_BACKBONES and self.text_config is None:
            raise CheckpointError(
                f"llm_backbone_id '{self.llm_backbone_id}' is not supported; known: {sorted(LLM_BACKBONES)} "
                "(or give its LlamaConfig fields as 'text_config' in config.json)"
            )
        if "fused-gelu-mlp" not in self.arch_specifier:
            raise CheckpointError(f"arch_specifier '{self.arch_specifier}' is not supported; expected '...fused-gelu-mlp'")
        if self.image_resize_strategy != "resize-naive":
            raise CheckpointError(f"image_resize_strategy '{self.image_resize_strategy}' is not supported; "
                                  "expected 'resize-naive'")
        if self.action_model_type not in ACTION_MODELS:
            raise CheckpointError(f"action_model_type '{self.action_model_type}' is not one of {sorted(ACTION_MODELS)}")
        if self.past_action_window_size != 0:
            raise CheckpointError(f"past_action_window_size {self.past_action_window_size}: CogACT supports only 0")
        if self.future_action_window_size < 0 or self.action_dim < 1:
            raise CheckpointError(
                f"future_action_window_size {self.future_action_window_size} / action_dim {self.action_dim} are invalid"
            )

    @property
    def timm_model_ids(self) -> tuple[str, str]:
        return VISION_BACKBONES[self.vision_backbone_id]

    @property
    def chunk_size(self) -> int:
        """Predicted actions per step: the current one plus `future_action_window_size`."""
        return self.future_action_window_size + 1

    @property
    def dit(self) -> dict[str, int]:
        return ACTION_MODELS[self.action_model_type]

    def llama_config(self, attn_implementation: str = "sdpa") -> LlamaConfig:
        fields = dict(self.text_config) if self.text_config is not None else dict(LLM_BACKBONES[self.llm_backbone_id])
        config = checked_llama_config({k: v for k, v in fields.items() if k not in _NOT_LLAMA_FIELDS})
        config._attn_implementation = attn_implementation
        return config

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.raw)
        for name in self.__dataclass_fields__:
            if name in ("norm_stats", "raw") or (name == "text_config" and self.text_config is None):
                continue
            data[name] = getattr(self, name)
        return data


def action_fields_from_weights(action_state: dict[str, Any]) -> dict[str, Any]:
    """action_model_type, action_dim and future_action_window_size as the `net.*` weights imply them."""
    fields: dict[str, Any] = {}
    x = action_state.get("net.x_embedder.linear.weight")
    blocks = {k.split(".")[2] for k in action_state if k.startswith("net.blocks.")}
    if x is not None and getattr(x, "dim", lambda: 0)() == 2:
        fields["action_dim"] = int(x.shape[1])
        for name, size in ACTION_MODELS.items():
            if size["hidden_size"] == int(x.shape[0]) and size["depth"] == len(blocks):
                fields["action_model_type"] = name
                break
    positions = action_state.get("net.positional_embedding")
    if positions is not None and getattr(positions, "dim", lambda: 0)() == 2:
        fields["future_action_window_size"] = int(positions.shape[0]) - 2
    return fields
