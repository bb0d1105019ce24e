"""OpenVLA as a vlacache backbone: load a released checkpoint directory, preprocess, prefill, decode 7 tokens."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import DynamicCache

from vlacache.backbone import ActionOutput, Backbone, LoadConfig, PrefillOutput, PreparedInputs, validate_observation
from vlacache.flops import DecoderDims
from vlacache.images import center_crop
from vlacache.registry import register_backbone
from vlacache.types import InputError, Observation, Span, TokenLayout, VisionSpan

from .actions import (
    STATS_FILE, load_norm_stats, normalize_q99, normalized_to_tokens, resolve_unnorm_key, tokens_to_normalized, unnormalize,
)
from .checkpoint import (
    ensure_fits, load_safetensors_dir, load_state_dict_strict, loaded_nbytes, read_config, save_safetensors_dir,
    weight_files,
)
from .config import OpenVLAConfig
from .model import OpenVLAModel, place_model
from .tokenizer import copy_tokenizer_files, load_tokenizer
from .vision import normalize_for_towers

PROMPT = "In: What action should the robot take to {instruction}?\nOut:"


def cache_keyword(forward) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.24; use whichever this version takes."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


@register_backbone("openvla")
class OpenVLABackbone(Backbone):
    """OpenVLA (Prismatic DINOv2+SigLIP + Llama-2) on stock transformers, one 'primary' camera, 7-DoF actions."""

    cameras = ("primary",)
    action_token_logits = True

    @dataclass
    class Config(LoadConfig):
        """Exactly one of `checkpoint` (a released directory) or `preset` (random weights: tiny, cpu-25m).
        center_crop: the LIBERO fine-tunes' evaluation crops the central 90% of the area (trained with crops)."""

        center_crop: bool = False

    center_crop = False

    def __init__(self, model: OpenVLAModel, tokenizer, unnorm_key: str | None = None) -> None:
        self.model = model.eval()
        self.config = model.config
        self.tokenizer = tokenizer
        self.unnorm_key = resolve_unnorm_key(self.config.norm_stats, unnorm_key)
        self.space_token = tokenizer.convert_tokens_to_ids("\u2581")
        self._cache_kw = cache_keyword(model.language_model.forward)

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
        config = read_openvla_config(path)
        resolve_unnorm_key(config.norm_stats, unnorm_key)  # a wrong key fails before any weights are read
        tokenizer = load_tokenizer(path)
        with torch.device("meta"):
            model = OpenVLAModel(config, attn_implementation)
        files, _ = weight_files(path)
        ensure_fits(path, loaded_nbytes(files, dtype), device, dtype)
        load_state_dict_strict(model, load_safetensors_dir(path, dtype, device), assign=True)
        return cls(place_model(model, device, dtype), tokenizer, unnorm_key)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write the checkpoint in the released layout: config.json, dataset_statistics.json, (sharded)
        safetensors, tokenizer files."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        (path / STATS_FILE).write_text(json.dumps(self.config.norm_stats, indent=2))
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        save_safetensors_dir(path, state, max_shard_bytes=max_shard_bytes)
        copy_tokenizer_files(self.tokenizer_dir, path)

    @property
    def tokenizer_dir(self) -> Path:
        return Path(self.tokenizer.name_or_path)

    # -- the four stages ----------------------------------------------------------------------------------
    @property
    def decoder(self):
        return self.model.language_model.model

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def prepare(self, obs: Observation) -> PreparedInputs:
        return prepare_prismatic(self, obs)

    def prompt_ids(self, instruction: str) -> list[int]:
        ids = self.tokenizer(PROMPT.format(instruction=instruction.lower())).input_ids  # no strip, as the official code
        if ids[-1] != self.space_token:
            ids.append(self.space_token)
        return ids

    def embed(self, inputs: PreparedInputs) -> torch.Tensor:
        return self.model.embed(inputs.model_inputs["pixel_values"], inputs.model_inputs["input_ids"])

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

    @property
    def action_dim(self) -> int:
        return len(self.config.norm_stats[self.unnorm_key]["action"]["q01"])

    # -- accounting ---------------------------------------------------------------------------------------
    def decoder_dims(self) -> DecoderDims:
        return DecoderDims.from_config(self.model.language_model.config)

    def decode_passes(self) -> int:
        return self.action_dim - 1

    def causal_lm(self) -> torch.nn.Module:
        return self.model.language_model

    def vision_towers(self) -> list[torch.nn.Module]:
        return [self.model.vision_backbone]

    def vision_flops(self) -> float:
        return self.model.vision_flops()


def read_openvla_config(path: Path) -> OpenVLAConfig:
    """config.json of a checkpoint dir, with the statistics the official evaluations use (dataset_statistics.json
    when present, see `load_norm_stats`)."""
    config = OpenVLAConfig.from_dict(read_config(path))
    config.norm_stats = load_norm_stats(path, config.norm_stats)
    return config


def batch_prompt_ids(backbone, instructions: tuple[str, ...]) -> torch.Tensor:
    """The backbone's prompt ids for each instruction as one [B, T] tensor; all must tokenize to one length."""
    ids = [backbone.prompt_ids(instruction) for instruction in instructions]
    if len({len(i) for i in ids}) != 1:
        raise InputError(
            "instructions in one batch tokenize to different lengths "
            f"({sorted({len(i) for i in ids})}); batch observations that share an instruction"
        )
    return torch.tensor(ids, dtype=torch.long, device=backbone.device)


def prepare_prismatic(backbone, obs: Observation) -> PreparedInputs:
    """One camera through the fused towers' preprocessing, the backbone's prompt ids, and the layout
    [BOS | patches | rest of the prompt]; shared by the Prismatic-based backbones (OpenVLA, CogACT)."""
    images, instructions = validate_observation(obs, backbone.cameras)
    model = backbone.model
    query = resize_images(images["primary"], model.featurizer_spec.img_size)
    if getattr(backbone, "center_crop", False):
        query = center_crop(query)
    input_ids = batch_prompt_ids(backbone, instructions)
    num_patches = model.vision_backbone.num_patches
    rows, cols = model.vision_backbone.grid
    length = input_ids.shape[1] + num_patches
    layout = TokenLayout(
        length=length,
        vision={"primary": VisionSpan(1, 1 + num_patches, rows=rows, cols=cols, patch_size=model.featurizer_spec.patch_size)},
        text=Span(1 + num_patches, length),
        extra={"bos": Span(0, 1)},
    )
    pixel_values = normalize_for_towers(query, model.featurizer_spec, model.fused_spec)
    return PreparedInputs(
        batch_size=len(instructions),
        instructions=instructions,
        query_images={"primary": query},
        layout=layout,
        model_inputs={"pixel_values": pixel_values.to(backbone.device, backbone.dtype), "input_ids": input_ids},
        source_sizes={name: tuple(image.shape[1:3]) for name, image in images.items()},
    )


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize of uint8 [B, H, W, 3] to size x size ('resize-naive'), as OpenVLA's processor does."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    out = [np.asarray(Image.fromarray(image.numpy()).resize((size, size), Image.BICUBIC)) for image in images]
    return torch.from_numpy(np.stack(out))
