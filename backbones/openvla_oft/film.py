"""FiLM (feature-wise linear modulation) of OpenVLA-OFT's vision towers by the average language embedding.

What OpenVLA-OFT(+) does (prismatic/models/film_vit_wrapper.py, prismatic/extern/hf/modeling_prismatic.py,
experiments/robot/openvla_utils.py, vla-scripts/finetune.py of moojink/openvla-oft):

* every block of BOTH towers (DINOv2 ``featurizer`` and SigLIP ``fused_featurizer``) is wrapped; the wrapper
  holds the original block as ``block`` and two ``nn.Linear(llm_dim, vision_dim)`` projections ``scale`` (gamma)
  and ``shift`` (beta). Inside a block, between the attention and the MLP residual sub-blocks:
  ``x = x + ls1(attn(norm1(x))); x = x * (1 + gamma) + beta; x = x + ls2(mlp(norm2(x)))``, with gamma / beta
  broadcast over the tokens (prefix tokens included).
* the conditioning vector is the plain mean (no attention mask) of the input embeddings of every token that is
  not an action placeholder: BOS, the prompt (incl. its trailing space token) and the stop token. The same vector
  conditions every camera image.
* the ``vision_backbone--<step>_checkpoint.pt`` file is ``FiLMedPrismaticVisionBackbone.state_dict()`` of the
  LoRA-wrapped (peft, target_modules="all-linear") model, saved without a "module." prefix:
  ``vision_backbone.<tower>.blocks.<i>.block.<...>``, ``vision_backbone.<tower>.blocks.<i>.scale|shift.*``,
  every vision ``nn.Linear`` as ``<name>.base_layer.weight|bias`` + ``<name>.lora_A.default.weight`` +
  ``<name>.lora_B.default.weight``; the reference loader applies LoRA with ``lora_alpha = min(rank, 16)``
  (weight = base + alpha / rank * B @ A). Plain ``<name>.weight`` keys (no LoRA) are accepted as well.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from vlacache.backbones.common.checkpoint import CheckpointError
from vlacache.backbones.common.vision import FusedVisionBackbone, VisionTransformer

__all__ = [
    "FiLMProjection",
    "FiLMTower",
    "VisionFiLM",
    "average_language_embedding",
    "film_state_to_released",
    "released_to_film_state",
    "SAVE_LORA_RANK",
]

TOWERS = ("featurizer", "fused_featurizer")
PREFIX = "vision_backbone."
SAVE_LORA_RANK = 32  # OFT's default lora_rank; the reference loader needs LoRA factors of the rank it is run with
_LORA = re.compile(r"^(.*)\.lora_([AB])\.default\.weight$")
_BLOCK = re.compile(r"^(featurizer|fused_featurizer)\.blocks\.(\d+)\.(.+)$")
_RELEASED_BLOCK = re.compile(r"^vision_backbone\.(featurizer|fused_featurizer)\.blocks\.(\d+)\.(block|scale|shift)\.(.+)$")


class FiLMProjection(nn.Module):
    """One block's gamma (``scale``) and beta (``shift``) projections, llm_dim -> vision_dim."""

    def __init__(self, llm_dim: int, vision_dim: int) -> None:
        super().__init__()
        self.scale = nn.Linear(llm_dim, vision_dim)
        self.shift = nn.Linear(llm_dim, vision_dim)


class FiLMTower(nn.Module):
    def __init__(self, llm_dim: int, vision_dim: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(FiLMProjection(llm_dim, vision_dim) for _ in range(depth))

    def forward(self, tower: VisionTransformer, pixel_values: torch.Tensor, language: torch.Tensor) -> torch.Tensor:
        """`tower.forward` with FiLM between each block's attention and MLP: [B, 3, H, W] -> [B, patches, D]."""
        spec = tower.spec
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[-2:]) != (spec.img_size,) * 2:
            raise ValueError(f"expected pixel_values [B, 3, {spec.img_size}, {spec.img_size}], got {tuple(pixel_values.shape)}")
        x = tower.patch_embed(pixel_values.to(tower.pos_embed.dtype)) + tower.pos_embed
        prefix = [t.expand(x.shape[0], -1, -1) for t in (tower.cls_token, tower.reg_token) if t is not None]
        if prefix:
            x = torch.cat([*prefix, x], dim=1)
        language = language.to(x.dtype)
        for block, film in zip(tower.blocks[: tower.feature_block_index + 1], self.blocks):
            gamma, beta = film.scale(language)[:, None], film.shift(language)[:, None]
            x = x + block.ls1(block.attn(block.norm1(x)))
            x = x * (1 + gamma) + beta
            x = x + block.ls2(block.mlp(block.norm2(x)))
        return x[:, spec.num_prefix_tokens :]


class VisionFiLM(nn.Module):
    """FiLM projections for both towers (every block, as released; the unused last block's too)."""

    def __init__(self, vision_backbone: FusedVisionBackbone, llm_dim: int) -> None:
        super().__init__()
        self.llm_dim = llm_dim
        for name in TOWERS:
            spec = getattr(vision_backbone, name).spec
            setattr(self, name, FiLMTower(llm_dim, spec.embed_dim, spec.depth))

    def forward(self, vision_backbone: FusedVisionBackbone, pixel_values: torch.Tensor, language: torch.Tensor) -> torch.Tensor:
        """[B, 6, H, W] + average language embedding [B, llm_dim] -> [B, patches, D1 + D2]."""
        first = self.featurizer(vision_backbone.featurizer, pixel_values[:, :3], language)
        second = self.fused_featurizer(vision_backbone.fused_featurizer, pixel_values[:, 3:], language)
        return torch.cat([first, second.to(first.dtype)], dim=2)

    def flops(self, vision_backbone: FusedVisionBackbone) -> float:
        """Per image: gamma and beta of every applied block, 2 x MACs."""
        return sum(
            2.0 * 2 * self.llm_dim * getattr(vision_backbone, n).embed_dim * (getattr(vision_backbone, n).feature_block_index + 1)
            for n in TOWERS
        )


def average_language_embedding(text: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """OFT's FiLM input: mean over BOS + prompt embeddings [B, T, D] and the stop embedding [B, 1, D] -> [B, D]
    (the action placeholders are excluded; no attention mask)."""
    return torch.cat([text, stop], dim=1).mean(dim=1)


# -- the released vision_backbone--*_checkpoint.pt layout -----------------------------------------------------------
def _linear_names(vision_backbone: nn.Module) -> list[str]:
    return [name for name, module in vision_backbone.named_modules() if isinstance(module, nn.Linear)]


def _released_key(key: str) -> str:
    """Our vision_backbone key (without 'vision_backbone.') -> the released FiLM-wrapped key."""
    m = _BLOCK.match(key)
    return f"{PREFIX}{m.group(1)}.blocks.{m.group(2)}.block.{m.group(3)}" if m else PREFIX + key


def film_state_to_released(
    vision_backbone: FusedVisionBackbone, film: VisionFiLM, lora_rank: int | None = SAVE_LORA_RANK
) -> dict[str, torch.Tensor]:
    """Both towers + FiLM projections as the released file's state dict. With `lora_rank`, every vision Linear
    is written peft-style (base_layer + zero LoRA factors, so the effective weight is exactly the base)."""
    linears = set(_linear_names(vision_backbone)) if lora_rank else set()
    out: dict[str, torch.Tensor] = {}
    for key, value in vision_backbone.state_dict().items():
        owner, leaf = key.rsplit(".", 1)
        value = _cpu(value)
        if owner in linears:
            base = _released_key(owner)
            out[f"{base}.base_layer.{leaf}"] = value
            if leaf == "weight":
                out[f"{base}.lora_A.default.weight"] = value.new_zeros(lora_rank, value.shape[1])
                out[f"{base}.lora_B.default.weight"] = value.new_zeros(value.shape[0], lora_rank)
        else:
            out[_released_key(key)] = value
    for key, value in film.state_dict().items():
        m = _BLOCK.match(key)
        out[f"{PREFIX}{m.group(1)}.blocks.{m.group(2)}.{m.group(3)}"] = _cpu(value)
    return out


def _cpu(value: torch.Tensor) -> torch.Tensor:
    return value.detach() if value.is_meta else value.detach().cpu()


def merge_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft layout -> plain: `<m>.base_layer.<p>` -> `<m>.<p>`; `<m>.weight += min(r, 16) / r * B @ A`.
    Unpaired LoRA factors (or ones without a base weight) are kept under their own names (so strict loading
    reports them)."""
    out: dict[str, torch.Tensor] = {}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _LORA.match(key)
        if m:
            factors.setdefault(m.group(1), {})[m.group(2)] = value
        else:
            out[key.replace(".base_layer.", ".")] = value
    for owner, pair in factors.items():
        weight = out.get(f"{owner}.weight")
        a, b = pair.get("A"), pair.get("B")
        if (weight is None or a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]
                or (b.shape[0], a.shape[1]) != tuple(weight.shape)):
            for side, value in pair.items():
                out[f"{owner}.lora_{side}.default.weight"] = value
            continue
        rank = a.shape[0]
        delta = (min(rank, 16) / rank) * (b.float() @ a.float())
        out[f"{owner}.weight"] = (weight.float() + delta).to(weight.dtype) if delta.any() else weight
    return out


def released_to_film_state(
    state: dict[str, torch.Tensor], vision_backbone: FusedVisionBackbone, film: VisionFiLM, source: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A released file's state dict ("module." already stripped) -> (vision_backbone state, film state) in our
    names, after checking it strictly against the model (CheckpointError naming `source` and the released keys)."""
    merged = merge_lora(state)
    expected = film_state_to_released(vision_backbone, film, lora_rank=None)
    missing = [k for k in expected if k not in merged]
    unexpected = [k for k in merged if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(merged[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected if k in merged and tuple(merged[k].shape) != tuple(expected[k].shape)
    ]
    problems = [f"{label} ({len(names)}): {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}"
                for label, names in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatches", mismatched)) if names]
    if problems:
        raise CheckpointError(
            f"{source}: the FiLM vision backbone does not match the model (towers from config.json, FiLM "
            f"projections llm_dim {film.llm_dim} -> tower width per block):\n  " + "\n  ".join(problems)
        )
    vision, projections = {}, {}
    for key, value in merged.items():
        m = _RELEASED_BLOCK.match(key)
        if m and m.group(3) != "block":
            projections[f"{m.group(1)}.blocks.{m.group(2)}.{m.group(3)}.{m.group(4)}"] = value
        elif m:
            vision[f"{m.group(1)}.blocks.{m.group(2)}.{m.group(4)}"] = value
        else:
            vision[key[len(PREFIX):]] = value
    return vision, projections
