"""π0 and π0.5 on transformers' own `PI0ForConditionalGeneration` / `PI05ForConditionalGeneration`.

A query runs like the classes' `sample_actions`, split into the runtime's stages so the cache engine can act on
the prefix:
- prepare: each camera resized to the SigLIP input keeping its aspect ratio (bilinear, centred on black), as
  openpi's LIBERO client does before it sends a frame, scaled to [-1, 1]; the prompt is
  `<image>` x 256 per camera, then BOS and the instruction (π0: "{instruction}\\n"; π0.5: "Task: {instruction},
  State: {256-bin state};\\nAction: "), as the transformers processors build it;
- embed: SigLIP + projector for the image tokens, the scaled text embeddings (`embed_prefix`);
- prefill: the PaliGemma decoder once over the prefix, bidirectionally, into the cache. The engine's hooks sit
  on these decoder layers: reused visual tokens take last query's K/V here;
- decode: `num_inference_steps` Euler steps of flow matching from fresh noise; each step runs the action expert
  over the prefix cache (its own layers append their K/V to the prefix's, layer by layer) and is cropped back to
  the prefix, exactly as `sample_actions` does. The expert never sees the engine.

Normalisation: a checkpoint with a `dataset_statistics.json` (what `vlacache train` exports) normalises the
state and un-normalises the actions with BOUNDS_Q99 (q01 / q99 per dimension to [-1, 1], clipped: the map
vlacache's other families and its demonstrations use); a LeRobot policy folder with its own normalizer files
and modes (π0: MEAN_STD, π0.5: QUANTILES, LeRobot's formulas; `lerobot.py`). Without statistics (the
random-weight presets) states go in and actions come out as they are.

Noise: "episode" draws each query's initial noise from a CPU generator seeded with `seed` at episode start (as
LeRobot's policies draw fresh noise per call); "fixed" re-seeds at every query.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import DynamicCache

from vlacache.backbone import Backbone, LoadConfig, PrefillOutput, ActionOutput, PreparedInputs, validate_observation
from vlacache.backbones.common.prismatic import cache_keyword
from vlacache.backbones.common.statistics import STATS_FILE, denormalize, load_norm_stats, normalize, resolve_unnorm_key
from vlacache.flops import DecoderDims, layer_flops
from vlacache.registry import register_backbone
from vlacache.types import InputError, Observation, Span, TokenLayout, VisionSpan

NOISE_MODES = ("episode", "fixed")
UNNORMALIZED_FIELD = "vlacache_unnormalized"  # config.json: true when the model works on raw states and actions
CAMERAS_FIELD = "vlacache_cameras"  # config.json: the cameras the model was trained with, in order
STATE_BINS = 256


@dataclass
class ActionStatistics:
    """The dataset statistics a backbone normalises with (`vlacache train` sets `norm_stats`)."""

    norm_stats: dict


class PI0FamilyBackbone(Backbone):
    """What π0 and π0.5 share: the PaliGemma prefix the engine hooks, the expert's flow-matching loop, noise."""

    cameras = ("primary", "wrist")
    state_in_prompt: ClassVar[bool] = False
    prompt_tokens: ClassVar[int] = 48  # the prompt is padded to this many tokens (the transformers processor's)

    @dataclass
    class Config(LoadConfig):
        noise: str = "episode"  # or "fixed": the same initial noise at every query
        action_dim: int = 7

    def __init__(self, model: nn.Module, tokenizer, action_dim: int = 7, seed: int = 0, noise: str = "episode",
                 cameras: tuple[str, ...] = ("primary", "wrist"), norm_stats: dict | None = None,
                 unnorm_key: str | None = None) -> None:
        if noise not in NOISE_MODES:
            raise InputError(f"noise '{noise}' is not one of {list(NOISE_MODES)}")
        config = model.config
        if action_dim > config.max_action_dim:
            raise InputError(f"action_dim {action_dim} exceeds the model's max_action_dim {config.max_action_dim}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cameras = tuple(cameras)
        self.action_dim = action_dim
        self.seed, self.noise = seed, noise
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        vision = config.vlm_config.vision_config
        self.image_size, self.patch_size = vision.image_size, vision.patch_size
        self.grid = self.image_size // self.patch_size
        self.image_token = config.vlm_config.image_token_id
        self.config = ActionStatistics(dict(norm_stats or {}))
        self.unnorm_key = resolve_unnorm_key(self.config.norm_stats, unnorm_key) if self.config.norm_stats else None

    # -- what the engine and the runtime see --------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        return self.model.model.vlm.language_model

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def action_chunk(self) -> int:
        return self.model.config.chunk_size

    @property
    def uses_proprio(self) -> bool:
        return True

    def decoder_dims(self) -> DecoderDims:
        return DecoderDims.from_config(self.decoder.config)

    def head_flops(self) -> float:
        """The expert's denoising steps: each a pass of its tokens over the prefix and themselves."""
        dims = DecoderDims.from_config(self.model.config.dit_config)
        tokens = self.action_chunk + (0 if self.state_in_prompt else 1)
        # projections and MLP; the attention to the prefix is left out (its length is not known here)
        return self.model.config.num_inference_steps * dims.layers * layer_flops(dims, tokens, keys=0)

    def vision_towers(self) -> list[nn.Module]:
        return [self.model.model.vlm.vision_tower]

    def cache_readers(self) -> list[nn.Module]:
        return [self.model.model.dit]  # the action expert: its layer i attends to the prefix cache's layer i

    # -- the four stages ----------------------------------------------------------------------------------
    def prompt_ids(self, instruction: str, state: np.ndarray | None = None) -> list[int]:
        """BOS and the instruction as the transformers processor writes π0's prompt."""
        return [self.tokenizer.bos_token_id, *self.tokenizer(instruction.strip() + "\n", add_special_tokens=False).input_ids]

    def prepare(self, obs: Observation) -> PreparedInputs:
        images, instructions = validate_observation(obs, self.cameras)
        batch = len(instructions)
        query = {name: resize_with_pad(images[name], self.image_size) for name in self.cameras}
        states = self.states(obs.proprio, batch)
        ids = [self.prompt_ids(text, None if states is None else states[row]) for row, text in enumerate(instructions)]
        longest = max(len(i) for i in ids)
        if longest > self.prompt_tokens:
            raise InputError(f"the prompt is {longest} tokens, more than the {self.prompt_tokens} this model's prompts "
                             "are padded to; shorten the instruction")
        # padded to a fixed length, as the processor does: the layout (and the cache's episode) stays the same
        # when a π0.5 state changes the prompt's length
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        per_image = self.grid * self.grid
        vision = {name: VisionSpan(i * per_image, (i + 1) * per_image, rows=self.grid, cols=self.grid,
                                   patch_size=self.patch_size) for i, name in enumerate(self.cameras)}
        start = len(self.cameras) * per_image
        length = start + self.prompt_tokens
        input_ids = torch.tensor([[self.image_token] * start + row + [pad] * (self.prompt_tokens - len(row))
                                  for row in ids], dtype=torch.long)
        attention = torch.tensor([[1] * (start + len(row)) + [0] * (self.prompt_tokens - len(row)) for row in ids])
        pixels = torch.stack([query[name] for name in self.cameras], dim=1).permute(0, 1, 4, 2, 3).float()
        model_inputs = {
            "input_ids": input_ids.to(self.device),
            "pixel_values": ((pixels / 255.0 - 0.5) / 0.5).to(self.device, self.dtype),
            "pixel_attention_mask": torch.ones(batch, len(self.cameras), dtype=torch.bool, device=self.device),
            "attention_mask": attention.to(self.device),
        }
        if not self.state_in_prompt:
            state = np.zeros((batch, self.model.config.max_state_dim), dtype=np.float32)
            if states is not None:
                state[:, : states.shape[1]] = states
            model_inputs["state"] = torch.from_numpy(state).to(self.device, self.dtype)
        return PreparedInputs(
            batch_size=batch, instructions=instructions, query_images=query,
            layout=TokenLayout(length=length, vision=vision, text=Span(start, start + longest),
                               extra={"padding": Span(start + longest, length)}),
            model_inputs=model_inputs, source_sizes={name: tuple(image.shape[1:3]) for name, image in images.items()})

    def states(self, proprio: Any, batch: int) -> np.ndarray | None:
        """The robot state [B, d] (float32) as the model reads it, or None when the observation has none."""
        if proprio is None:
            return None
        if isinstance(proprio, torch.Tensor):
            proprio = proprio.detach().cpu().numpy()
        state = np.asarray(proprio, dtype=np.float64).reshape(batch, -1)
        limit = getattr(self.model.config, "max_state_dim", self.model.config.max_action_dim)
        if state.shape[1] > limit:
            raise InputError(f"the state has {state.shape[1]} values, more than the model's {limit}")
        if not np.all(np.isfinite(state)):
            raise InputError("proprio contains NaN or inf")
        stats = self.statistics
        if stats is not None and "proprio" in stats:
            state = normalize(state, stats["proprio"], "proprio")
        return state.astype(np.float32)

    @property
    def statistics(self) -> dict | None:
        """The statistics of `unnorm_key` (None: the model's own normalised values in and out)."""
        return self.config.norm_stats[self.unnorm_key] if self.unnorm_key is not None else None

    def embed(self, inputs: PreparedInputs) -> torch.Tensor:
        m = inputs.model_inputs
        return self.model.model.embed_prefix(m["input_ids"], m["pixel_values"], m["pixel_attention_mask"])

    def prefill(self, embeds: torch.Tensor, inputs: PreparedInputs, cache: DynamicCache) -> PrefillOutput:
        mask = inputs.model_inputs["attention_mask"]
        vlm = self.model.model.vlm
        out = vlm(inputs_embeds=embeds, attention_mask=mask, position_ids=mask.cumsum(-1) - 1,
                  token_type_ids=torch.zeros(embeds.shape[:2], dtype=torch.long, device=embeds.device), use_cache=True,
                  **{cache_keyword(vlm.forward): cache})
        # the last prefix position's logits through the tied embeddings (what PaliGemma would generate next)
        logits = out.last_hidden_state[:, -1] @ self.decoder.embed_tokens.weight.T
        return PrefillOutput(logits=logits.float(), extra={"prefix_length": cache.get_seq_length()})

    def decode(self, prefill: PrefillOutput, inputs: PreparedInputs, cache: DynamicCache) -> ActionOutput:
        normalized = self.denoise(cache, inputs, prefill.extra["prefix_length"], self.initial_noise(inputs.batch_size))
        actions = normalized[..., : self.action_dim].float().cpu().numpy()
        stats = self.statistics
        if stats is not None:
            actions = denormalize(actions, stats["action"], "action").astype(np.float32)
        return ActionOutput(actions=actions)

    # -- training (`vlacache train`) ------------------------------------------------------------------------
    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def bc_loss(self, obs: Observation, actions: np.ndarray) -> torch.Tensor:
        """The model's own flow-matching loss (MSE of the predicted velocity, random time and noise) on the
        demonstrated chunk, normalised with the statistics `vlacache train` set (BOUNDS_Q99, clipped), zero-padded to
        max_action_dim."""
        if self.statistics is None:
            raise InputError("training needs action statistics: `vlacache train` sets them from the demonstrations")
        inputs = self.prepare(obs)
        m = inputs.model_inputs
        chunk, config = self.action_chunk, self.model.config
        target = np.zeros((inputs.batch_size, chunk, config.max_action_dim), dtype=np.float32)
        target[..., : self.action_dim] = normalize(actions[:, :chunk, : self.action_dim], self.statistics["action"], "action")
        extra = {} if self.state_in_prompt else {"state": m["state"]}
        out = self.model(input_ids=m["input_ids"], pixel_values=m["pixel_values"],
                         pixel_attention_mask=m["pixel_attention_mask"], attention_mask=m["attention_mask"],
                         actions=torch.from_numpy(target).to(self.device, self.dtype), **extra)
        return out.loss

    def denoise(self, cache: DynamicCache, inputs: PreparedInputs, prefix_length: int, noise: torch.Tensor) -> torch.Tensor:
        """Euler steps from t = 1 to 0 over the prefix cache, as `sample_actions` takes them: [B, chunk, max_dim]."""
        config, m = self.model.config, inputs.model_inputs
        steps = config.num_inference_steps
        dt = -1.0 / steps
        x = noise.to(self.device, self.dtype)
        extra = {} if self.state_in_prompt else {"state": m["state"]}
        with torch.no_grad():
            for step in range(steps):
                time = torch.full((x.shape[0],), 1.0 + step * dt, dtype=torch.float32, device=self.device)
                out = self.model(noise=x, timestep=time, pixel_attention_mask=m["pixel_attention_mask"],
                                 attention_mask=m["attention_mask"], cache=cache, **extra)
                cache.crop(prefix_length - cache.get_seq_length())
                x = x + dt * out.logits
        return x

    def initial_noise(self, batch: int) -> torch.Tensor:
        """[B, chunk, max_action_dim] standard normal noise: the episode generator's next draw, or ("fixed") the
        first draw of a generator seeded with `seed`."""
        if self.noise == "fixed":
            self.generator.manual_seed(self.seed)
        config = self.model.config
        return torch.randn(batch, config.chunk_size, config.max_action_dim, generator=self.generator)

    # -- episodes -----------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.generator.manual_seed(self.seed)

    def episode_state(self) -> Any:
        return self.generator.get_state()

    def load_episode_state(self, state: Any) -> None:
        if state is None:
            self.reset()
        else:
            self.generator.set_state(copy.deepcopy(state))

    def reset_rows(self, rows: list[int]) -> None:
        raise InputError("π0's noise generator is shared by the whole batch, so its rows cannot start episodes "
                         "alone; reset the whole batch")

    keep_rows = reset_rows

    # -- construction -------------------------------------------------------------------------------------
    model_class: ClassVar[str] = ""

    @classmethod
    def from_config(cls, config: "PI0FamilyBackbone.Config") -> "PI0FamilyBackbone":
        device, dtype = config.placement()
        options = dict(seed=config.seed, noise=config.noise, action_dim=config.action_dim, unnorm_key=config.unnorm_key)
        if config.preset is not None:
            from .tiny import build_preset

            return build_preset(cls, config.preset, device=device, dtype=dtype,
                                attn_implementation=config.attn_implementation, **options)
        return cls.from_pretrained(config.checkpoint_dir(), device=device, dtype=dtype,
                                   attn_implementation=config.attn_implementation, **options)

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", dtype=torch.float32, attn_implementation: str = "sdpa",
                        **options) -> "PI0FamilyBackbone":
        """A transformers-format checkpoint folder (config.json of model_type pi0 / pi05, safetensors, tokenizer),
        or a LeRobot policy folder (config.json with `type` pi0 / pi05, its normalizer files, plus the PaliGemma
        tokenizer files: `lerobot.py`)."""
        import transformers
        from vlacache.backbones.common.tokenizer import load_tokenizer
        from vlacache.errors import CheckpointError
        from vlacache.manifest import verify_manifest

        from . import lerobot

        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path} has no config.json; a {cls.registry_name} checkpoint folder holds "
                                  "config.json, model.safetensors and the tokenizer")
        verify_manifest(path)  # a SHA256SUMS (shipped and trained policies have one): every listed file checked
        fields = json.loads(config_file.read_text())
        config, trained_cameras = None, fields.get(CAMERAS_FIELD)
        if lerobot.is_lerobot(fields):
            config = lerobot.transformers_config(cls.registry_name, fields, path)
            trained_cameras = lerobot.cameras(fields) or None
            norm_stats = lerobot.statistics(path, fields)
            options.setdefault("action_dim", lerobot.action_dim(fields) or 7)
            missing = ("its processor pipelines (policy_preprocessor.json / policy_postprocessor.json) name no "
                       "normalizer statistics: a base checkpoint, trained on no one robot's ranges")
        else:
            model_type = fields.get("model_type")
            if model_type != cls.registry_name:
                family = {"pi0": "pi0", "pi05": "pi05"}.get(model_type, "another backbone")
                raise CheckpointError(f"{path} is a '{model_type}' checkpoint, not '{cls.registry_name}'; load it with "
                                      f"backbone name '{family}'")
            norm_stats = load_norm_stats(path, None) if (path / STATS_FILE).is_file() else None
            missing = f"it has no {STATS_FILE} ({{dataset: {{action: {{q01, q99, mask}}, proprio: ...}}}})"
        if norm_stats is None and fields.get(UNNORMALIZED_FIELD) is not True:
            raise CheckpointError(f"{path}: {missing}. π0 predicts normalised states and actions, so without the "
                                  "statistics it was trained with its actions would reach the robot unscaled; put "
                                  "the statistics of its fine-tuning data into the folder")
        wanted = tuple(options.get("cameras", cls.cameras))
        if trained_cameras is not None and len(trained_cameras) != len(wanted):
            raise CheckpointError(f"{path} was trained with {len(trained_cameras)} camera(s) ({', '.join(trained_cameras)}); "
                                  f"this backbone feeds {len(wanted)} ({', '.join(wanted)}), and π0 has no slot for "
                                  "the difference; use a checkpoint trained with these cameras")
        model = getattr(transformers, cls.model_class).from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, **({} if config is None else {"config": config}))
        if norm_stats is not None:
            options["norm_stats"] = norm_stats
        with torch.no_grad():  # own, aligned memory: tensors read from a file can sit at offsets that send the
            for tensor in [*model.parameters(), *model.buffers()]:  # CPU kernels down other (rounding) paths
                tensor.data = tensor.data.clone()
        return cls(model.to(device), load_tokenizer(path), **options)

    def save_pretrained(self, path: str | Path) -> None:
        """config.json + model.safetensors (transformers' format), the tokenizer and, when set, the dataset
        statistics (dataset_statistics.json), loadable by `from_pretrained`."""
        # a backbone without statistics (a random preset) says so, so that loading it back is not refused
        setattr(self.model.config, UNNORMALIZED_FIELD, not self.config.norm_stats)
        setattr(self.model.config, CAMERAS_FIELD, list(self.cameras))
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        if self.config.norm_stats:
            (Path(path) / STATS_FILE).write_text(json.dumps(self.config.norm_stats, indent=2))


@register_backbone("pi0")
class PI0Backbone(PI0FamilyBackbone):
    """π0 (PaliGemma prefix over the cameras and the prompt; a Gemma action expert with the state as its first
    token, flow matching) on transformers' `PI0ForConditionalGeneration`. Cameras 'primary' and 'wrist'."""

    model_class = "PI0ForConditionalGeneration"


@register_backbone("pi05")
class PI05Backbone(PI0FamilyBackbone):
    """π0.5 (the state discretised into the prompt, so it is part of the cached prefix; an expert with adaptive
    norms on the flow time) on transformers' `PI05ForConditionalGeneration`. Cameras 'primary' and 'wrist'."""

    model_class = "PI05ForConditionalGeneration"
    state_in_prompt = True
    prompt_tokens = 200

    def prompt_ids(self, instruction: str, state: np.ndarray | None = None) -> list[int]:
        """BOS and "Task: ..., State: ...;\\nAction: " with the state (assumed in [-1, 1]) in 256 bins, as the
        transformers π0.5 processor writes it."""
        task = instruction.strip().replace("_", " ").replace("\n", " ")
        bins = "" if state is None else " ".join(str(int(b)) for b in discretize_state(state))
        text = f"Task: {task}, State: {bins};\nAction: "
        return [self.tokenizer.bos_token_id, *self.tokenizer(text, add_special_tokens=False).input_ids]


def resize_with_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, H, W, 3] to [B, size, size, 3]: scaled by one factor so the longer side fits (PIL bilinear), then
    centred on a black square (the offsets rounded down); a frame already of that size is left as it is."""
    height, width = images.shape[1:3]
    if height == size and width == size:
        return images
    ratio = max(width / size, height / size)
    new_width, new_height = int(width / ratio), int(height / ratio)
    top, left = max(0, (size - new_height) // 2), max(0, (size - new_width) // 2)
    out = torch.zeros(images.shape[0], size, size, 3, dtype=torch.uint8)
    for row, image in enumerate(images):
        resized = Image.fromarray(image.numpy()).resize((new_width, new_height), Image.BILINEAR)
        out[row, top:top + new_height, left:left + new_width] = torch.from_numpy(np.array(resized))
    return out


def discretize_state(state: np.ndarray) -> np.ndarray:
    """A state in [-1, 1] as 256 bin indices (the bins' left edges split [-1, 1] evenly)."""
    edges = torch.linspace(-1.0, 1.0, STATE_BINS + 1)[:-1]
    return (torch.bucketize(torch.as_tensor(state, dtype=torch.float32), edges, right=True) - 1).numpy()
