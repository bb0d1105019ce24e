"""What the backbones built on the Prismatic VLM share (OpenVLA, OpenVLA-OFT, CogACT): a base class holding the
VLM, its tokenizer and statistics, with the stages and accounting that depend only on them; the preprocessing
of one camera; and the OpenVLA HF checkpoint layout (read and written)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlacache.backbone import Backbone, PreparedInputs, validate_observation
from vlacache.flops import DecoderDims
from vlacache.images import center_crop
from vlacache.types import InputError, Observation, Span, TokenLayout, VisionSpan

from .checkpoint import read_config, save_safetensors_dir
from .config import OpenVLAConfig
from .statistics import STATS_FILE, load_norm_stats, resolve_unnorm_key
from .tokenizer import copy_tokenizer_files
from .vision import normalize_for_towers
from .vlm import PrismaticVLM

PROMPT = "In: What action should the robot take to {instruction}?\nOut:"


def cache_keyword(forward) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.24; use whichever this version takes."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


class PrismaticBackbone(Backbone):
    """A backbone whose VLM is a `PrismaticVLM` (fused DINOv2 + SigLIP towers, MLP projector, Llama decoder).

    Holds `model`, `tokenizer`, `config` (anything with `norm_stats`) and the resolved `unnorm_key`; provides
    the OpenVLA prompt, one-camera preparation, embedding and FLOPs accounting. Subclasses read out actions
    (`prefill` / `decode`) and override what their family does differently."""

    def __init__(self, model: PrismaticVLM, tokenizer, config: Any, unnorm_key: str | None = None) -> None:
        self.model = model.eval()
        self.config = config
        self.tokenizer = tokenizer
        self.unnorm_key = resolve_unnorm_key(config.norm_stats, unnorm_key)
        self.space_token = tokenizer.convert_tokens_to_ids("\u2581")
        self._cache_kw = cache_keyword(model.language_model.forward)

    @property
    def tokenizer_dir(self) -> Path:
        return Path(self.tokenizer.name_or_path)

    @property
    def decoder(self):
        return self.model.language_model.model

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def action_dim(self) -> int:
        return len(self.config.norm_stats[self.unnorm_key]["action"]["q01"])

    def prompt_ids(self, instruction: str) -> list[int]:
        """OpenVLA's prompt, ending in the "▁" piece (appended when the tokenizer does not end with it)."""
        ids = self.tokenizer(PROMPT.format(instruction=instruction.lower())).input_ids  # no strip, as the official code
        if ids[-1] != self.space_token:
            ids.append(self.space_token)
        return ids

    def prepare(self, obs: Observation) -> PreparedInputs:
        return prepare_prismatic(self, obs)

    def embed(self, inputs: PreparedInputs) -> torch.Tensor:
        return self.model.embed(inputs.model_inputs["pixel_values"], inputs.model_inputs["input_ids"])

    def decoder_dims(self) -> DecoderDims:
        return DecoderDims.from_config(self.model.language_model.config)

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


def save_openvla_layout(backbone: PrismaticBackbone, path: Path, max_shard_bytes: int) -> None:
    """Write the released OpenVLA layout: config.json, dataset_statistics.json, (sharded) safetensors, tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(backbone.config.to_dict(), indent=2))
    (path / STATS_FILE).write_text(json.dumps(backbone.config.norm_stats, indent=2))
    state = {k: v.detach().cpu() for k, v in backbone.model.state_dict().items()}
    save_safetensors_dir(path, state, max_shard_bytes=max_shard_bytes)
    copy_tokenizer_files(backbone.tokenizer_dir, path)


def batch_prompt_ids(backbone: Backbone, instructions: tuple[str, ...]) -> torch.Tensor:
    """The backbone's prompt ids for each instruction as one [B, T] tensor; all must tokenize to one length."""
    ids = [backbone.prompt_ids(instruction) for instruction in instructions]
    if len({len(i) for i in ids}) != 1:
        raise InputError(
            "instructions in one batch tokenize to different lengths "
            f"({sorted({len(i) for i in ids})}); batch observations that share an instruction"
        )
    return torch.tensor(ids, dtype=torch.long, device=backbone.device)


def prepare_prismatic(backbone: PrismaticBackbone, obs: Observation) -> PreparedInputs:
    """One camera through the fused towers' preprocessing, the backbone's prompt ids, and the layout
    [BOS | patches | rest of the prompt]."""
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
