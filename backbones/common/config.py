"""The released OpenVLA config.json (also OpenVLA-OFT's; CogACT's VLM is described in it), parsed into what the
Prismatic VLM needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import LlamaConfig

try:  # transformers 5.x validates config fields through huggingface_hub's strict dataclasses
    from huggingface_hub.errors import StrictDataclassError as FieldValidationError
except ImportError:  # pragma: no cover
    FieldValidationError = ValueError

from .checkpoint import CheckpointError, check_field_types

REQUIRED = ("vision_backbone_id", "arch_specifier", "use_fused_vision_backbone", "timm_model_ids", "image_sizes",
            "text_config", "norm_stats")
_NOT_LLAMA_FIELDS = ("model_type", "architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path")


@dataclass
class OpenVLAConfig:
    """Fields of an OpenVLA HF `config.json` (model_type 'openvla'), kept with their original names."""

    vision_backbone_id: str
    arch_specifier: str
    use_fused_vision_backbone: bool
    timm_model_ids: list[str]
    image_sizes: list[int]
    text_config: dict[str, Any]
    norm_stats: dict[str, Any] | None  # None: only in dataset_statistics.json (see statistics.load_norm_stats)
    llm_backbone_id: str = "llama2-7b-pure"
    image_resize_strategy: str = "resize-naive"
    n_action_bins: int = 256
    pad_token_id: int = 32000
    pad_to_multiple_of: int = 64
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OpenVLAConfig":
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise CheckpointError(f"config.json lacks the OpenVLA field(s) {missing}; is this an OpenVLA HF checkpoint?")
        known = {f for f in cls.__dataclass_fields__ if f != "raw"}
        check_field_types(cls, {k: v for k, v in data.items() if k in known}, "config.json")
        if data.get("model_type", "openvla") != "openvla":
            raise CheckpointError(f"config.json has model_type '{data['model_type']}', expected 'openvla'")
        if not data["use_fused_vision_backbone"] or len(data["timm_model_ids"]) != 2:
            raise CheckpointError("only the fused DINOv2 + SigLIP vision backbone (use_fused_vision_backbone: true) is supported")
        if "fused-gelu-mlp" not in data["arch_specifier"]:
            raise CheckpointError(f"arch_specifier '{data['arch_specifier']}' is not supported; expected '...fused-gelu-mlp'")
        if data.get("image_resize_strategy", "resize-naive") != "resize-naive":
            raise CheckpointError(f"image_resize_strategy '{data['image_resize_strategy']}' is not supported; "
                                  "expected 'resize-naive'")
        return cls(**{k: v for k, v in data.items() if k in known}, raw=dict(data))

    def llama_config(self, attn_implementation: str = "sdpa") -> LlamaConfig:
        """LlamaConfig from `text_config`: only the fields that differ from LlamaConfig's defaults are stored."""
        fields = {k: v for k, v in self.text_config.items() if k not in _NOT_LLAMA_FIELDS}
        config = checked_llama_config(fields)
        config._attn_implementation = attn_implementation
        return config

    @property
    def text_vocab_size(self) -> int:
        """Token ids below this are the tokenizer's; the 256 action tokens are its last ids."""
        return self.llama_config().vocab_size - self.pad_to_multiple_of

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.raw)
        for name in self.__dataclass_fields__:
            if name != "raw":
                data[name] = getattr(self, name)
        return data


def checked_llama_config(fields: dict[str, Any]) -> LlamaConfig:
    """A LlamaConfig, with transformers' field validation reported as a config.json problem."""
    try:
        return LlamaConfig(**fields)
    except (TypeError, ValueError, FieldValidationError) as err:
        raise CheckpointError(f"config.json text_config is invalid: {err}; restore it from the released config.json") from err
