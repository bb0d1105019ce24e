"""OpenVLA-OFT as a vlacache backbone: two cameras + proprio, one bidirectional decoder pass, L1 regression head.

Sequence (B rows of L = 1 + 2 * 256 + 1 + T + chunk * 7 + 1 tokens):
    BOS | primary patches (256) | wrist patches (256) | proprio token | prompt text (T) | chunk * 7 zero
    embeddings (action placeholders) | stop token (id 2)
The decoder attends BIDIRECTIONALLY over the whole sequence: an explicit all-True 4-D mask is passed to the stock
decoder (stock causal attention would run but give wrong actions). The action head reads the final (post-norm)
hidden states of the chunk * 7 rows starting one row BEFORE the first placeholder, i.e. the last prompt token
and the first chunk * 7 - 1 placeholders: OFT trains and runs its head on the next-token-aligned rows
(`last_hidden_states[:, NUM_PATCHES + NUM_PROMPT_TOKENS : ... + ACTION_DIM * NUM_ACTIONS_CHUNK]`), so a
released head only works on those rows. They are the layout's extra span "readout".
FiLM (OFT+, optional): both towers' blocks are modulated by the mean embedding of BOS + prompt + stop token (see
film.py); it lives inside `embed`, so the cache engine sees ordinary vision tokens.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from vlacache.backbone import ActionOutput, LoadConfig, PrefillOutput, PreparedInputs, validate_observation
from vlacache.backbones.common.checkpoint import (
    CheckpointError,
    ensure_fits,
    load_safetensors_dir,
    loaded_nbytes,
    weight_files,
    load_state_dict_strict,
    load_torch_file,
    read_config,
    save_torch_checkpoint,
    strip_prefix,
    verify_manifest,
)
from vlacache.backbones.common.config import OpenVLAConfig
from vlacache.backbones.common.prismatic import PrismaticBackbone, batch_prompt_ids, cache_keyword, save_openvla_layout
from vlacache.backbones.common.statistics import load_norm_stats, normalize_q99, resolve_unnorm_key
from vlacache.backbones.common.tokenizer import load_tokenizer
from vlacache.backbones.common.vision import normalize_for_towers
from vlacache.backbones.common.vlm import PrismaticVLM, place_model
from vlacache.flops import linear_flops
from vlacache.images import center_crop, resize_for_policy
from vlacache.registry import register_backbone
from vlacache.types import InputError, Observation, Span, TokenLayout, VisionSpan

from .film import VisionFiLM, average_language_embedding, film_state_to_released, released_to_film_state
from .heads import L1RegressionActionHead, ProprioProjector, unnormalize_actions

__all__ = ["OpenVLAOFTBackbone", "STOP_TOKEN", "HEAD_PATTERN", "PROPRIO_PATTERN", "FILM_PATTERN", "META_KEY"]

STOP_TOKEN = 2  # OFT's STOP_INDEX (Llama-2 </s>); the row keeps its normal embedding
HEAD_PATTERN = "action_head--*_checkpoint.pt"
PROPRIO_PATTERN = "proprio_projector--*_checkpoint.pt"
FILM_PATTERN = "vision_backbone--*_checkpoint.pt"
DDP_PREFIX = "module."
META_KEY = "vlacache_oft"  # written by save_pretrained into config.json; released checkpoints have none
SUPPORTED_ATTENTION = ("sdpa", "eager")


@register_backbone("openvla-oft")
class OpenVLAOFTBackbone(PrismaticBackbone):
    """OpenVLA-OFT (OpenVLA's VLM + proprio token + parallel decoding + L1 regression head), on stock transformers.

    Cameras 'primary' (third-person) and 'wrist'; `Observation.proprio` [8] (or [B, 8]) is required when the
    checkpoint has a proprio projector. Returns chunks of `chunk` un-normalised 7-d actions: [B, chunk, 7].
    """

    cameras = ("primary", "wrist")
    action_token_logits = False  # the L1 head regresses the actions; the last-position logits mean nothing

    @dataclass
    class Config(LoadConfig):
        chunk: int = 8
        use_film: bool = False
        use_proprio: bool = True
        center_crop: bool | None = None  # None: the checkpoint's own choice (`checkpoint_center_crop`)
        step: str | None = None  # which action_head--<step>_checkpoint.pt when a directory holds several

        def resolved(self) -> "OpenVLAOFTBackbone.Config":
            if self.center_crop is not None:
                return self
            crop = checkpoint_center_crop(self.checkpoint_dir()) if self.checkpoint is not None else False
            return dataclasses.replace(self, center_crop=crop)

    def __init__(
        self,
        model: PrismaticVLM,
        tokenizer,
        action_head: L1RegressionActionHead,
        proprio_projector: ProprioProjector | None,
        chunk: int = 8,
        unnorm_key: str | None = None,
        center_crop: bool = False,
        film: VisionFiLM | None = None,
    ) -> None:
        attn = getattr(model.language_model.config, "_attn_implementation", None) or "eager"
        if attn not in SUPPORTED_ATTENTION:
            raise InputError(
                f"attention implementation '{attn}' cannot take OFT's bidirectional 4-D mask; "
                f"use attn_implementation='sdpa' (recommended) or 'eager'"
            )
        if chunk < 1:
            raise InputError(f"chunk must be >= 1, got {chunk}")
        super().__init__(model, tokenizer, model.config, unnorm_key)
        self.action_head = action_head.eval()
        self.proprio_projector = proprio_projector.eval() if proprio_projector is not None else None
        self.chunk = chunk
        self.center_crop = center_crop
        self.film = film.eval() if film is not None else None
        self._decoder_kw = cache_keyword(self.decoder.forward)
        self._mask_memo: dict[tuple, torch.Tensor] = {}
        self._check_parts()

    def _check_parts(self) -> None:
        stats = self.config.norm_stats[self.unnorm_key]
        llm_dim = self.model.language_model.config.hidden_size
        head = self.action_head
        if head.input_dim != llm_dim or head.action_dim != self.action_dim:
            raise CheckpointError(
                f"action head takes rows of action_dim {head.action_dim} x width {head.input_dim}, but the decoder "
                f"width is {llm_dim} and the action statistics have {self.action_dim} dims"
            )
        if self.film is not None and self.film.llm_dim != llm_dim:
            raise CheckpointError(f"FiLM projections take language embeddings of width {self.film.llm_dim}, "
                                  f"the decoder width is {llm_dim}")
        if self.proprio_projector is not None:
            if "proprio" not in stats:
                raise CheckpointError(
                    f"norm_stats['{self.unnorm_key}'] has no 'proprio' statistics, which the proprio projector needs; "
                    "is this an OpenVLA-OFT checkpoint?"
                )
            dims = len(stats["proprio"]["q01"])
            if self.proprio_projector.proprio_dim != dims or self.proprio_projector.llm_dim != llm_dim:
                raise CheckpointError(
                    f"proprio projector maps {self.proprio_projector.proprio_dim} -> {self.proprio_projector.llm_dim}, "
                    f"but the proprio statistics have {dims} dims and the decoder width is {llm_dim}"
                )

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: "OpenVLAOFTBackbone.Config") -> "OpenVLAOFTBackbone":
        config = config.resolved()
        device, dtype = config.placement()
        options = dict(unnorm_key=config.unnorm_key, device=device, dtype=dtype,
                       attn_implementation=config.attn_implementation, chunk=config.chunk,
                       use_proprio=config.use_proprio, center_crop=config.center_crop)
        if config.preset is not None:
            from .tiny import build_preset

            return build_preset(config.preset, seed=config.seed, film=config.use_film, **options)
        return cls.from_pretrained(config.checkpoint_dir(), step=config.step, use_film=config.use_film, **options)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        unnorm_key: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        chunk: int = 8,
        use_proprio: bool = True,
        center_crop: bool | None = None,
        step: str | int | None = None,
        use_film: bool = False,
    ) -> "OpenVLAOFTBackbone":
        """Load a released OFT directory unchanged: the OpenVLA HF files (config.json, safetensors, tokenizer) plus
        `action_head--<step>_checkpoint.pt` and `proprio_projector--<step>_checkpoint.pt` (DDP state dicts).
        FiLM is on when the directory holds a `vision_backbone--<step>_checkpoint.pt` (the FiLM-wrapped towers,
        which replace the safetensors' vision weights, as OFT's loader does); `use_film=True` requires one.
        `center_crop=None`: the checkpoint's own choice (`checkpoint_center_crop`)."""
        path = Path(path)
        verify_manifest(path)
        if center_crop is None:
            center_crop = checkpoint_center_crop(path)
        raw = read_config(path)
        film_file = None
        if use_film or any(path.glob(FILM_PATTERN)):
            film_file = find_part(path, FILM_PATTERN, step, "FiLM vision backbone")
        meta = raw.get(META_KEY) or {}
        if "chunk" in meta and int(meta["chunk"]) != chunk:
            raise CheckpointError(
                f"{path / 'config.json'} says the action head was trained for chunks of {meta['chunk']} actions, "
                f"but the backbone config asks for chunk={chunk}; set chunk: {meta['chunk']}"
            )
        config = OpenVLAConfig.from_dict(raw)
        config.norm_stats = load_norm_stats(path, config.norm_stats)
        key = resolve_unnorm_key(config.norm_stats, unnorm_key)
        tokenizer = load_tokenizer(path)
        with torch.device("meta"):
            model = PrismaticVLM(config, attn_implementation)
        device = torch.device(device)
        files, _ = weight_files(path)
        ensure_fits(path, loaded_nbytes(files, dtype), device, dtype)
        state = load_safetensors_dir(path, dtype, device)
        film = None
        if film_file is not None:
            with torch.device("meta"):
                film = VisionFiLM(model.vision_backbone, model.language_model.config.hidden_size)
            released = strip_prefix(load_torch_file(film_file), DDP_PREFIX)
            vision, projections = released_to_film_state(released, model.vision_backbone, film, film_file)
            state = {k: v for k, v in state.items() if not k.startswith("vision_backbone.")}
            state.update({"vision_backbone." + k: v for k, v in vision.items()})
            film.load_state_dict(projections, strict=True, assign=True)
        load_state_dict_strict(model, state, assign=True)
        del state
        llm_dim = model.language_model.config.hidden_size
        action_dim = len(config.norm_stats[key]["action"]["q01"])
        head_file = find_part(path, HEAD_PATTERN, step, "action head")
        head = action_head_from_state(strip_prefix(load_torch_file(head_file), DDP_PREFIX), llm_dim, action_dim, head_file)
        projector = None
        if use_proprio:
            proprio_file = find_part(path, PROPRIO_PATTERN, step, "proprio projector")
            projector = proprio_projector_from_state(strip_prefix(load_torch_file(proprio_file), DDP_PREFIX), llm_dim,
                                                     proprio_file)
        return cls.placed(model, tokenizer, head, projector, film, device, dtype,
                          chunk=chunk, unnorm_key=key, center_crop=center_crop)

    @classmethod
    def placed(cls, model, tokenizer, head, projector, film, device, dtype, **options) -> "OpenVLAOFTBackbone":
        """Build from parts made on the CPU, moving the model and every optional part to device / dtype."""
        device = torch.device(device)

        def move(part):
            return part.to(device=device, dtype=dtype) if part is not None else None

        return cls(place_model(model, device, dtype), tokenizer, move(head), move(projector), film=move(film), **options)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 5 * 2**30, step: str | int = "latest") -> None:
        """Write the released OFT layout: OpenVLA's files + the head (bf16) and proprio projector (fp32) as DDP
        state dicts ("module." prefix). config.json also records the chunk size (key 'vlacache_oft')."""
        path = Path(path)
        save_openvla_layout(self, path, max_shard_bytes)
        config_path = path / "config.json"
        data = json.loads(config_path.read_text())
        data[META_KEY] = {
            "chunk": self.chunk,
            "action_dim": self.action_dim,
            "head_hidden_dim": self.action_head.hidden_dim,
            "proprio_dim": self.proprio_projector.proprio_dim if self.proprio_projector is not None else None,
            "center_crop": self.center_crop,
        }
        config_path.write_text(json.dumps(data, indent=2))
        for pattern in (HEAD_PATTERN, PROPRIO_PATTERN, FILM_PATTERN):
            for old in path.glob(pattern):
                old.unlink()
        head = {DDP_PREFIX + k: v.detach().cpu().to(torch.bfloat16) for k, v in self.action_head.state_dict().items()}
        save_torch_checkpoint(path / HEAD_PATTERN.replace("*", str(step)), head)
        if self.proprio_projector is not None:
            projector = {DDP_PREFIX + k: v.detach().cpu().float() for k, v in self.proprio_projector.state_dict().items()}
            save_torch_checkpoint(path / PROPRIO_PATTERN.replace("*", str(step)), projector)
        if self.film is not None:
            # OFT saves FiLMedPrismaticVisionBackbone.state_dict() (LoRA-wrapped linears, no "module." prefix)
            save_torch_checkpoint(path / FILM_PATTERN.replace("*", str(step)),
                                  film_state_to_released(self.model.vision_backbone, self.film))

    # -- the four stages ----------------------------------------------------------------------------------
    @property
    def num_action_tokens(self) -> int:
        return self.chunk * self.action_dim

    def prepare(self, obs: Observation) -> PreparedInputs:
        images, instructions = validate_observation(obs, self.cameras)
        batch = len(instructions)
        size = self.model.featurizer_spec.img_size
        # official get_vla_action: resize_image_for_policy (JPEG round trip + Lanczos-3) on any frame of another size
        query = {name: images[name] if images[name].shape[1:3] == (size, size)
                 else torch.from_numpy(resize_for_policy(images[name].numpy(), size)) for name in self.cameras}
        if self.center_crop:
            query = {name: center_crop(image) for name, image in query.items()}
        proprio = self.normalized_proprio(obs.proprio, batch)
        input_ids = batch_prompt_ids(self, instructions)
        layout = self.build_layout(input_ids.shape[1] - 1)
        pixel_values = torch.cat(
            [normalize_for_towers(query[name], self.model.featurizer_spec, self.model.fused_spec) for name in self.cameras],
            dim=1,
        )
        inputs = {"pixel_values": pixel_values.to(self.device, self.dtype), "input_ids": input_ids}
        if proprio is not None:
            inputs["proprio"] = torch.from_numpy(proprio).to(self.device, self.dtype)
        return PreparedInputs(
            batch_size=batch,
            instructions=instructions,
            query_images=query,
            layout=layout,
            model_inputs=inputs,
            source_sizes={name: tuple(image.shape[1:3]) for name, image in images.items()},
        )

    def build_layout(self, num_text: int) -> TokenLayout:
        """The token layout for a prompt of `num_text` tokens after BOS."""
        patches = self.model.vision_backbone.num_patches
        rows, cols = self.model.vision_backbone.grid
        patch = self.model.featurizer_spec.patch_size
        vision, start = {}, 1
        for name in self.cameras:
            vision[name] = VisionSpan(start, start + patches, rows=rows, cols=cols, patch_size=patch)
            start += patches
        extra = {"bos": Span(0, 1)}
        if self.proprio_projector is not None:
            extra["proprio"] = Span(start, start + 1)
            start += 1
        text = Span(start, start + num_text)
        actions = Span(text.stop, text.stop + self.num_action_tokens)
        stop = Span(actions.stop, actions.stop + 1)
        extra.update(actions=actions, stop=stop, readout=Span(actions.start - 1, actions.stop - 1))
        return TokenLayout(length=stop.stop, vision=vision, text=text, extra=extra)

    @property
    def action_chunk(self) -> int:
        return self.chunk

    @property
    def uses_proprio(self) -> bool:
        return self.proprio_projector is not None

    def normalized_proprio(self, proprio: Any, batch: int) -> np.ndarray | None:
        """Validate `Observation.proprio` and normalise it (BOUNDS_Q99) -> float [B, d]; None without a projector."""
        if self.proprio_projector is None:
            return None
        dims = self.proprio_projector.proprio_dim
        if proprio is None:
            raise InputError(
                f"OpenVLA-OFT needs the robot state: pass Observation(..., proprio=np.float32[{dims}]) "
                f"(LIBERO: eef position 3, axis-angle 3, gripper qpos 2), or [B, {dims}] for a batch"
            )
        if isinstance(proprio, torch.Tensor):
            proprio = proprio.detach().cpu().numpy()
        try:
            values = np.asarray(proprio, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"proprio must be a numeric array, got {type(proprio).__name__}") from None
        if values.ndim == 1 and batch == 1:
            values = values[None]
        if values.shape != (batch, dims):
            raise InputError(f"proprio has shape {values.shape}; this checkpoint expects [{dims}] or [batch={batch}, {dims}]")
        if not np.all(np.isfinite(values)):
            raise InputError("proprio contains NaN or inf")
        return normalize_q99(values, self.config.norm_stats[self.unnorm_key]["proprio"])

    def embed(self, inputs: PreparedInputs) -> torch.Tensor:
        pixel_values, input_ids = inputs.model_inputs["pixel_values"], inputs.model_inputs["input_ids"]
        batch, cameras = input_ids.shape[0], len(self.cameras)
        # both cameras through the towers as one batch (camera-major), then back to [B, cameras * P, D]
        views = (pixel_values.view(batch, cameras, 6, *pixel_values.shape[-2:]).transpose(0, 1)
                 .reshape(batch * cameras, 6, *pixel_values.shape[-2:]))
        embedding = self.model.language_model.get_input_embeddings()
        text = embedding(input_ids)
        stop = embedding(torch.full((batch, 1), STOP_TOKEN, dtype=torch.long, device=input_ids.device))
        if self.film is not None:
            # FiLM: BOS + prompt + stop averaged, the same vector for every camera (camera-major rows)
            language = average_language_embedding(text, stop).repeat(cameras, 1)
            features = self.film(self.model.vision_backbone, views, language)
        else:
            features = self.model.vision_backbone(views)
        patches = self.model.projector(features)
        patches = patches.view(cameras, batch, *patches.shape[1:]).transpose(0, 1).reshape(batch, -1, patches.shape[-1])
        parts = [text[:, :1], patches.to(text.dtype)]
        if self.proprio_projector is not None:
            parts.append(self.proprio_projector(inputs.model_inputs["proprio"]).to(text.dtype)[:, None])
        placeholders = text.new_zeros(batch, self.num_action_tokens, text.shape[-1])
        return torch.cat([*parts, text[:, 1:], placeholders, stop], dim=1)

    def attention_mask(self, batch: int, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """OFT's bidirectional mask as an explicit 4-D [B, 1, L, L] mask (bool for sdpa, additive zeros for eager):
        transformers returns a 4-D mask as-is from create_causal_mask, and sdpa then runs with is_causal=False."""
        eager = self.decoder.config._attn_implementation == "eager"
        key = (batch, length, str(device), dtype if eager else torch.bool)
        if key not in self._mask_memo:
            if eager:
                mask = torch.zeros(batch, 1, length, length, dtype=dtype, device=device)
            else:
                mask = torch.ones(batch, 1, length, length, dtype=torch.bool, device=device)
            self._mask_memo = {key: mask}
        return self._mask_memo[key]

    def run_decoder(self, embeds: torch.Tensor, cache: DynamicCache | None, causal: bool = False) -> torch.Tensor:
        """One decoder pass at positions 0..L-1 -> final (post-norm) hidden states [B, L, D]. `causal=True` runs
        stock causal attention instead (wrong for OFT; kept for tests that show the difference)."""
        batch, length = embeds.shape[:2]
        positions = torch.arange(length, device=embeds.device)[None]
        mask = None if causal else self.attention_mask(batch, length, embeds.device, embeds.dtype)
        out = self.decoder(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=cache is not None,
            **({self._decoder_kw: cache} if cache is not None else {}),
        )
        return out.last_hidden_state

    def prefill(self, embeds: torch.Tensor, inputs: PreparedInputs, cache: DynamicCache) -> PrefillOutput:
        hidden = self.run_decoder(embeds, cache)
        readout = inputs.layout.extra["readout"]
        logits = self.model.language_model.lm_head(hidden[:, -1]).float()
        return PrefillOutput(logits=logits, extra={"action_hidden": hidden[:, readout.start:readout.stop]})

    def decode(self, prefill: PrefillOutput, inputs: PreparedInputs, cache: DynamicCache) -> ActionOutput:
        """No decoder pass: the L1 head on the action rows, then BOUNDS_Q99 un-normalisation -> [B, chunk, 7]."""
        normalized = self.normalized_actions(prefill.extra["action_hidden"])
        return ActionOutput(actions=self.unnormalize(normalized.detach().float().cpu().numpy()))

    def normalized_actions(self, action_hidden: torch.Tensor) -> torch.Tensor:
        """Action rows' hidden states [B, chunk * 7, D] -> normalised actions [B, chunk, 7] (about [-1, 1])."""
        dtype = next(self.action_head.parameters()).dtype
        return self.action_head.predict_action(action_hidden.to(dtype), self.chunk)

    def trainable_modules(self) -> dict[str, nn.Module]:
        parts = {"model": self.model, "action_head": self.action_head, "proprio_projector": self.proprio_projector,
                 "film": self.film}
        return {name: part for name, part in parts.items() if part is not None}

    def bc_loss(self, obs: Observation, actions: np.ndarray) -> torch.Tensor:
        """Behaviour cloning: L1 between the head's normalised chunk and `actions[:, :chunk]` normalised with the
        checkpoint's BOUNDS_Q99 statistics (OFT's objective), through the same forward as inference."""
        inputs = self.prepare(obs)
        hidden = self.run_decoder(self.embed(inputs), None)
        readout = inputs.layout.extra["readout"]
        predicted = self.normalized_actions(hidden[:, readout.start:readout.stop]).float()
        stats = self.config.norm_stats[self.unnorm_key]["action"]
        target = torch.from_numpy(normalize_q99(actions[:, : self.chunk], stats, "action")).float().to(predicted.device)
        return torch.nn.functional.l1_loss(predicted, target)

    def unnormalize(self, normalized: np.ndarray) -> np.ndarray:
        return unnormalize_actions(normalized, self.config.norm_stats[self.unnorm_key]["action"]).astype(np.float32)

    # -- accounting ---------------------------------------------------------------------------------------
    def head_flops(self) -> float:
        return linear_flops(self.action_head, self.chunk)

    def decode_passes(self) -> int:
        return 0

    def vision_flops(self) -> float:
        """Both cameras through towers + projector, plus the proprio projector (the head is not counted)."""
        total = len(self.cameras) * super().vision_flops()
        if self.film is not None:
            total += len(self.cameras) * self.film.flops(self.model.vision_backbone)
        if self.proprio_projector is not None:
            d, p = self.proprio_projector.llm_dim, self.proprio_projector.proprio_dim
            total += 2.0 * (p * d + d * d)
        return total


def checkpoint_center_crop(path: Path) -> bool:
    """Whether a checkpoint's policy is evaluated on center-cropped images. A released OFT checkpoint: yes, as OFT's
    LIBERO evaluation does (its policies were trained with random crops). One written by `save_pretrained`: what
    its config.json records (vlacache's trainer shifts images but never crops them, so an older record without
    the key means no)."""
    meta = read_config(path).get(META_KEY)
    return bool(meta.get("center_crop", False)) if isinstance(meta, dict) else True


# -- the released .pt parts ---------------------------------------------------------------------------------
def find_part(path: Path, pattern: str, step: str | int | None, what: str) -> Path:
    """The one `pattern` file (e.g. action_head--*_checkpoint.pt) of a checkpoint directory."""
    wanted = pattern.replace("*", str(step)) if step is not None else None
    matches = sorted(p for p in path.glob(pattern) if wanted is None or p.name == wanted)
    if not matches:
        others = sorted(p.name for p in path.glob(pattern))
        found = f" (found {others})" if others else ""
        raise CheckpointError(
            f"missing {what} file {path / (wanted or pattern)}{found}; a released OpenVLA-OFT directory holds "
            f"'{HEAD_PATTERN}' and '{PROPRIO_PATTERN}' next to config.json and the safetensors (FiLM ones also "
            f"'{FILM_PATTERN}'); a directory with none of them is a plain OpenVLA checkpoint: load it as backbone 'openvla'"
        )
    if len(matches) > 1:
        raise CheckpointError(
            f"{path} holds several {what} files {[p.name for p in matches]}; choose one with step=<the part between "
            "'--' and '_checkpoint'>"
        )
    return matches[0]


def action_head_from_state(state: dict[str, torch.Tensor], llm_dim: int, action_dim: int, source: Path) -> L1RegressionActionHead:
    """Build the L1 regression head its state dict describes and load it strictly (CheckpointError naming `source`)."""
    fc1, fc2 = state.get("model.fc1.weight"), state.get("model.fc2.weight")
    if fc1 is None or fc2 is None or fc1.dim() != 2 or fc2.dim() != 2:
        raise CheckpointError(
            f"{source}: no L1 regression head (model.fc1.weight / model.fc2.weight); keys: {sorted(state)[:8]}. "
            "Only OFT's L1 regression head is supported (not the diffusion head)"
        )
    expected = llm_dim * action_dim
    if fc1.shape[1] != expected:
        raise CheckpointError(
            f"{source}: action head model.fc1.weight takes {fc1.shape[1]} inputs per row, but a chunk row is "
            f"action_dim {action_dim} x decoder width {llm_dim} = {expected}; the head belongs to another model "
            "or action dimension"
        )
    if fc2.shape[0] != action_dim:
        raise CheckpointError(f"{source}: action head model.fc2.weight outputs {fc2.shape[0]} values, "
                              f"the action statistics have {action_dim}")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"model\.mlp_resnet_blocks\.(\d+)\.", k))}
    head = L1RegressionActionHead(llm_dim, fc1.shape[0], action_dim, num_blocks=len(blocks))
    _load_part(head, state, source)
    return head


def proprio_projector_from_state(state: dict[str, torch.Tensor], llm_dim: int, source: Path) -> ProprioProjector:
    fc1 = state.get("fc1.weight")
    if fc1 is None or fc1.dim() != 2:
        raise CheckpointError(f"{source}: no proprio projector weights (fc1.weight); keys: {sorted(state)[:8]}")
    if fc1.shape[0] != llm_dim:
        raise CheckpointError(f"{source}: proprio projector fc1.weight projects to {fc1.shape[0]}, "
                              f"the decoder width is {llm_dim}")
    projector = ProprioProjector(llm_dim, fc1.shape[1])
    _load_part(projector, state, source)
    return projector


def _load_part(module: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    try:
        load_state_dict_strict(module, state)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None
