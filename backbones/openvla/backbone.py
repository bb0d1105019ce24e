"""OpenVLA as a vlacache backbone: load a released checkpoint directory, preprocess, prefill, decode 7 tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from vlacache.backbone import ActionOutput, LoadConfig, PrefillOutput, PreparedInputs
from vlacache.backbones.common.checkpoint import (
    CheckpointError, ensure_fits, load_safetensors_dir, load_state_dict_strict, loaded_nbytes, verify_manifest,
    weight_files,
)
from vlacache.backbones.common.prismatic import PrismaticBackbone, read_openvla_config, save_openvla_layout
from vlacache.backbones.common.statistics import normalize_q99, resolve_unnorm_key, unnormalize
from vlacache.backbones.common.tokenizer import load_tokenizer
from vlacache.backbones.common.vlm import PrismaticVLM, place_model
from vlacache.registry import register_backbone
from vlacache.types import Observation

from .action_tokens import normalized_to_tokens, tokens_to_normalized

# what marks an OpenVLA-OFT directory (its L1 head; vlacache's own export also records its settings)
OFT_HEAD_PATTERN = "action_head--*_checkpoint.pt"
OFT_MARKER = "vlacache_oft"


@register_backbone("openvla")
class OpenVLABackbone(PrismaticBackbone):
    """OpenVLA (Prismatic DINOv2+SigLIP + Llama-2) on stock transformers, one 'primary' camera, 7-DoF actions."""

    cameras = ("primary",)
    action_token_logits = True

    @dataclass
    class Config(LoadConfig):
        """Exactly one of `checkpoint` (a released directory) or `preset` (random weights: tiny, cpu-25m).
        center_crop: the LIBERO fine-tunes' evaluation crops the central 90% of the area (trained with crops)."""

        center_crop: bool = False

    center_crop = False

    def __init__(self, model: PrismaticVLM, tokenizer, unnorm_key: str | None = None) -> None:
        super().__init__(model, tokenizer, model.config, unnorm_key)

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: "OpenVLABackbone.Config") -> "OpenVLABackbone":
        device, dtype = config.placement()
        if config.preset is not None:
            from .tiny import build_preset

            backbone = build_preset(config.preset, seed=config.seed, device=device, dtype=dtype,
                                    attn_implementation=config.attn_implementation, unnorm_key=config.unnorm_key)
        else:
            backbone = cls.from_pretrained(config.checkpoint_dir(), unnorm_key=config.unnorm_key, device=device, dtype=dtype,
                                           attn_implementation=config.attn_implementation)
        backbone.center_crop = config.center_crop
        return backbone

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        unnorm_key: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
    ) -> "OpenVLABackbone":
        """Load a released OpenVLA HF checkpoint directory unchanged (config.json, safetensors, tokenizer)."""
        path, device = Path(path), torch.device(device)
        verify_manifest(path)
        config = read_openvla_config(path)
        if OFT_MARKER in config.raw or any(path.glob(OFT_HEAD_PATTERN)):
            raise CheckpointError(
                f"{path} is an OpenVLA-OFT checkpoint (it holds {OFT_HEAD_PATTERN} or config.json records "
                f"'{OFT_MARKER}'): its actions come from that head, not from action tokens; load it as backbone "
                "'openvla-oft' (OpenVLAOFTBackbone)")
        resolve_unnorm_key(config.norm_stats, unnorm_key)  # a wrong key fails before any weights are read
        tokenizer = load_tokenizer(path)
        with torch.device("meta"):
            model = PrismaticVLM(config, attn_implementation)
        files, _ = weight_files(path)
        ensure_fits(path, loaded_nbytes(files, dtype), device, dtype)
        load_state_dict_strict(model, load_safetensors_dir(path, dtype, device), assign=True)
        return cls(place_model(model, device, dtype), tokenizer, unnorm_key)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write the checkpoint in the released layout: config.json, dataset_statistics.json, (sharded)
        safetensors, tokenizer files."""
        save_openvla_layout(self, Path(path), max_shard_bytes)

    # -- the four stages ----------------------------------------------------------------------------------
    def prefill(self, embeds: torch.Tensor, inputs: PreparedInputs, cache: DynamicCache) -> PrefillOutput:
        positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
        out = self.model.language_model(
            inputs_embeds=embeds, position_ids=positions, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache}
        )
        return PrefillOutput(logits=out.logits[:, -1].float())

    def decode(self, prefill: PrefillOutput, inputs: PreparedInputs, cache: DynamicCache) -> ActionOutput:
        """Greedy decoding of one token per action dimension, at positions L, L+1, ... (not 0)."""
        length = inputs.layout.length
        token = prefill.logits.argmax(-1)
        tokens = [token]
        embedding = self.model.language_model.get_input_embeddings()
        for i in range(self.action_dim - 1):
            positions = torch.full((1, 1), length + i, device=token.device)
            if self.decode_pass is not None:  # compiled, over a static cache (vlacache.engine.compiled)
                logits = self.decode_pass(embedding(token)[:, None], positions, positions[0], cache, self._cache_kw)
            else:
                logits = self.model.language_model(
                    inputs_embeds=embedding(token)[:, None], position_ids=positions, use_cache=True, logits_to_keep=1,
                    **{self._cache_kw: cache},
                ).logits
            token = logits[:, -1].argmax(-1)
            tokens.append(token)
        tokens = torch.stack(tokens, dim=1)
        return ActionOutput(actions=self.tokens_to_actions(tokens.cpu().numpy())[:, None], tokens=tokens)

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """The modules behaviour cloning trains (vlacache train)."""
        return {"model": self.model}

    def bc_loss(self, obs: Observation, actions: np.ndarray) -> torch.Tensor:
        """Behaviour cloning: cross-entropy of the 7 action tokens of `actions[:, 0]` (normalised with the
        checkpoint's BOUNDS_Q99 statistics and binned as OpenVLA's ActionTokenizer), teacher-forced after the
        prompt exactly as `decode` reads them. actions: [B, >=1, 7] in the model's convention."""
        inputs = self.prepare(obs)
        normalized = normalize_q99(actions[:, 0], self.config.norm_stats[self.unnorm_key]["action"], "action")
        targets = torch.from_numpy(normalized_to_tokens(normalized, self.config.text_vocab_size, self.config.n_action_bins))
        targets = targets.to(self.device)
        ids = torch.cat([inputs.model_inputs["input_ids"], targets[:, :-1]], dim=1)
        embeds = self.model.embed(inputs.model_inputs["pixel_values"], ids)
        positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
        logits = self.model.language_model(inputs_embeds=embeds, position_ids=positions, use_cache=False,
                                           logits_to_keep=targets.shape[1]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def tokens_to_actions(self, tokens: np.ndarray) -> np.ndarray:
        normalized = tokens_to_normalized(tokens, self.config.text_vocab_size, self.config.n_action_bins)
        return unnormalize(normalized, self.config.norm_stats[self.unnorm_key]).astype(np.float32)

    # -- accounting ---------------------------------------------------------------------------------------
    def decode_passes(self) -> int:
        return self.action_dim - 1

    def causal_lm(self) -> torch.nn.Module:
        return self.model.language_model
