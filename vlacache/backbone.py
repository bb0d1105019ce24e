"""What a backbone provides to the rest of vlacache, and the input checks every backbone shares."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from .flops import DecoderDims
from .types import InputError, Observation, TokenLayout


@dataclass
class PreparedInputs:
    """One step's inputs after preprocessing: exact model-input images per camera, layout and model tensors."""

    batch_size: int
    instructions: tuple[str, ...]
    query_images: dict[str, torch.Tensor]
    layout: TokenLayout
    model_inputs: dict[str, Any] = field(default_factory=dict)
    source_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def episode_key(self) -> tuple:
        """Changes of any of these (instruction, batch size, camera image sizes before and after
        preprocessing, prompt length) reset the cache engine automatically."""
        return (self.instructions, self.batch_size, *self.batch_key())

    def batch_key(self) -> tuple:
        """What every row of a batch shares (image sizes, prompt length): a change resets all rows, as does a
        new batch size (unless `CachedVLA.keep_rows` shrank it). A new instruction in one row restarts that row."""
        shapes = tuple((name, tuple(image.shape[1:])) for name, image in sorted(self.query_images.items()))
        sources = tuple(sorted(self.source_sizes.items()))
        return (shapes, sources, self.layout.length)


@dataclass
class PrefillOutput:
    """Prefill result: logits of the last position [B, V] and anything the decoder needs to go on."""

    logits: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ActionOutput:
    """Decoded actions [B, chunk, action_dim] (un-normalised) and the raw action tokens if any."""

    actions: np.ndarray
    tokens: torch.Tensor | None = None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch spells it, if this machine has it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise InputError(f"device '{device}' is not a device name ({error}); use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"this torch ({torch.__version__}) is a CPU-only build" if torch.version.cuda is None
                   else "no CUDA device is visible")
            raise InputError(f"device '{device}' is not available: {why}; use device=cpu (or auto), "
                             "or install a CUDA build of torch")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InputError(f"device '{device}' does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device '{device}' is not available on this machine; use device=cpu or auto")
    return resolved


def shipped_policies_dir() -> Path:
    """Where the trained micro-policies shipped in the package live (vlacache/data/policies/<name>/)."""
    return Path(str(resources.files("vlacache") / "data" / "policies"))


def shipped_policies() -> list[str]:
    root = shipped_policies_dir()
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A checkpoint path as given, or the bare name of a policy shipped in the package (e.g.
    micro_oft_libero_spatial) when no such path exists here."""
    path = Path(checkpoint).expanduser()
    if path.exists() or len(path.parts) != 1:
        return path
    shipped = shipped_policies_dir() / path.name
    if shipped.is_dir():
        return shipped
    raise InputError(f"checkpoint '{checkpoint}' is neither a directory here nor a policy shipped with vlacache "
                     f"(shipped: {', '.join(shipped_policies()) or 'none'}); pass a checkpoint directory or a shipped name")


@dataclass
class LoadConfig:
    """Fields every backbone config shares: where the weights come from and how to place them."""

    checkpoint: str | None = None  # a released checkpoint directory, or the name of a shipped micro-policy
    preset: str | None = None
    unnorm_key: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    attn_implementation: str = "sdpa"
    seed: int = 0

    def placement(self) -> tuple[torch.device, torch.dtype]:
        """Check the shared fields and return (device, dtype) to build the backbone with."""
        if (self.checkpoint is None) == (self.preset is None):
            raise InputError(
                "backbone config: set exactly one of `checkpoint` (the released checkpoint) or `preset` "
                "(random weights of the real structure, e.g. tiny)"
            )
        if self.dtype not in DTYPES:
            raise InputError(f"backbone dtype '{self.dtype}' is not one of {sorted(DTYPES)}")
        return resolve_device(self.device), DTYPES[self.dtype]

    def checkpoint_dir(self) -> Path:
        """`checkpoint` as a path (a shipped policy's name resolved into the package)."""
        return resolve_checkpoint(self.checkpoint)

    def resolved(self) -> "LoadConfig":
        """This config with every setting whose default depends on the checkpoint filled in (a backbone whose
        defaults do, e.g. OFT's center crop, overrides this); what is built and what a fingerprint records."""
        return self


class Backbone(ABC):
    """A VLA model on stock transformers. The four stages below are timed separately by the runtime."""

    cameras: tuple[str, ...] = ("primary",)
    # True when the prefill's last-position logits are the first action token's distribution (OpenVLA), so
    # their top-1 minus top-2 probability is the policy's confidence; an L1 or diffusion head has no such logits
    action_token_logits: bool = False

    @property
    @abstractmethod
    def decoder(self) -> nn.Module:
        """The stock decoder model whose `.layers` the cache engine hooks (e.g. a LlamaModel)."""

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    @abstractmethod
    def prepare(self, obs: Observation) -> PreparedInputs:
        """Validate and preprocess an observation (images, prompt, layout)."""

    @abstractmethod
    def embed(self, inputs: PreparedInputs) -> torch.Tensor:
        """Vision towers + projector + text embeddings -> decoder input embeddings [B, L, D]."""

    @abstractmethod
    def prefill(self, embeds: torch.Tensor, inputs: PreparedInputs, cache: DynamicCache) -> PrefillOutput:
        """One decoder pass over the whole prompt, filling `cache`."""

    @abstractmethod
    def decode(self, prefill: PrefillOutput, inputs: PreparedInputs, cache: DynamicCache) -> ActionOutput:
        """Everything after the prefill: decode steps and the action head."""

    @abstractmethod
    def decoder_dims(self) -> DecoderDims:
        """Sizes for FLOPs accounting."""

    def vision_flops(self) -> float:
        return 0.0

    def head_flops(self) -> float:
        """FLOPs of the action head after the decoder (untouched by caching)."""
        return 0.0

    def reset(self) -> None:
        """Forget per-episode state of the backbone itself (e.g. an action ensemble). Called by CachedVLA.reset()."""

    @property
    def action_chunk(self) -> int:
        """Actions per query (the chunk of `ActionOutput.actions`)."""
        return 1

    @property
    def uses_proprio(self) -> bool:
        """Whether `Observation.proprio` feeds the model (servers ask their clients for the robot state then)."""
        return False

    def episode_state(self) -> Any:
        """The backbone's own per-episode state (None when it keeps none), for `CachedVLA.save_episode`."""
        return None

    def load_episode_state(self, state: Any) -> None:
        """Continue the episode `episode_state()` returned; None starts a new one (`reset()`)."""
        self.reset()

    def reset_rows(self, rows: list[int]) -> None:
        """Forget the per-episode state of some batch rows only (CachedVLA.reset(rows)); a backbone whose own
        state is shared by the whole batch raises InputError."""

    def keep_rows(self, rows: list[int]) -> None:
        """The batch goes on with these rows only (CachedVLA.keep_rows); same contract as reset_rows."""

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The modules `vlacache train` optimises (a backbone that can be trained overrides this and bc_loss)."""
        raise InputError(f"{type(self).__name__} does not support vlacache train (no behaviour-cloning objective)")

    def bc_loss(self, obs: Observation, actions: np.ndarray) -> torch.Tensor:
        """The behaviour-cloning loss of a batch of observations and the demonstrated actions [B, chunk, dim]."""
        raise InputError(f"{type(self).__name__} does not support vlacache train (no behaviour-cloning objective)")

    def decode_passes(self) -> int:
        """Decoder forward passes after the prefill (for FLOPs, and the length of a compiled step's static cache)."""
        return 0

    def max_positions(self) -> int | None:
        """How many positions the decoder has (its config's max_position_embeddings; None: no limit known)."""
        return getattr(getattr(self.decoder, "config", None), "max_position_embeddings", None)

    def causal_lm(self) -> nn.Module | None:
        """The causal LM (decoder + LM head) the decode passes call; None for a backbone without decode passes."""
        return None

    def vision_towers(self) -> list[nn.Module]:
        """The image encoders `embed` runs, which a compiled step compiles (fixed input shapes); none by default."""
        return []

    def cache_readers(self) -> list[nn.Module]:
        """Other decoders (with `.layers`) whose layer i attends to the prompt cache's layer i after the prefill
        (π0's action expert), so the engine keeps dropped tokens' keys out of their queries too; none by default."""
        return []

    #: Set by `CachedVLA(compile=True)`: runs one decode pass as (embeds [B, 1, D], position_ids [B, 1],
    #: cache_position [1], cache) -> logits [B, 1, V]; None: the eager causal LM.
    decode_pass: Any = None

    def new_cache(self) -> DynamicCache:
        try:
            return DynamicCache(config=self.decoder.config)
        except TypeError:
            return DynamicCache()


def _as_uint8_images(name: str, image: Any) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(image))
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
    else:
        raise InputError(f"camera '{name}': expected a numpy array or torch tensor, got {type(image).__name__}")
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 4:
        raise InputError(f"camera '{name}': expected an image [H, W, 3] or a batch [B, H, W, 3], got shape {tuple(tensor.shape)}")
    if tensor.shape[-1] != 3:
        hint = " (it looks channels-first: transpose to [H, W, 3])" if tensor.shape[1] == 3 else ""
        raise InputError(f"camera '{name}': expected 3 colour channels last, got shape {tuple(tensor.shape)}{hint}")
    if tensor.shape[1] < 2 or tensor.shape[2] < 2:
        raise InputError(f"camera '{name}': image of size {tuple(tensor.shape[1:3])} is too small")
    if tensor.dtype == torch.uint8:
        return tensor
    if not tensor.is_floating_point():
        raise InputError(f"camera '{name}': dtype {tensor.dtype} is not supported; pass uint8 [0, 255] or float [0, 1]")
    if not bool(torch.isfinite(tensor).all()):
        raise InputError(f"camera '{name}': image contains NaN or inf pixels")
    if float(tensor.min()) < 0.0 or float(tensor.max()) > 1.0:
        raise InputError(
            f"camera '{name}': float images must lie in [0, 1] (got [{float(tensor.min()):.3g}, {float(tensor.max()):.3g}]); "
            "pass uint8 for [0, 255] data"
        )
    return (tensor * 255.0).round().to(torch.uint8)


def validate_observation(obs: Observation, cameras: Sequence[str]) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Check an observation against the cameras a backbone needs; return uint8 images [B, H, W, 3] and instructions."""
    if not isinstance(obs, Observation):
        raise InputError(f"expected a vlacache Observation, got {type(obs).__name__}")
    if not isinstance(obs.images, Mapping):
        raise InputError(
            f"Observation.images must map camera names to images, got {type(obs.images).__name__}; "
            f"pass e.g. images={{'{cameras[0]}': frame}} (this backbone reads {list(cameras)})"
        )
    if obs.instruction is None:
        raise InputError("Observation.instruction is None; pass the task in words, e.g. 'pick up the black bowl'")
    missing = [c for c in cameras if c not in obs.images]
    if missing:
        raise InputError(
            f"observation lacks camera(s) {missing}; this backbone needs {list(cameras)}, got {sorted(obs.images)}"
        )
    images = {c: _as_uint8_images(c, obs.images[c]) for c in cameras}
    batch = {c: int(i.shape[0]) for c, i in images.items()}
    if len(set(batch.values())) != 1:
        raise InputError(f"cameras have different batch sizes: {batch}")
    size = next(iter(batch.values()))
    if size == 0:
        raise InputError("the observation's batch is empty (0 images); pass at least one image per camera")
    instruction = obs.instruction
    if not isinstance(instruction, (str, list, tuple)):
        raise InputError(f"instruction must be a string or a list of strings, got {type(instruction).__name__}")
    instructions = (instruction,) * size if isinstance(instruction, str) else tuple(instruction)
    if not all(isinstance(i, str) for i in instructions):
        raise InputError("instruction must be a string or a list of strings")
    if len(instructions) != size:
        raise InputError(f"{len(instructions)} instructions for a batch of {size} images; pass one per image or a single string")
    if any(not i.strip() for i in instructions):
        raise InputError("instruction is empty; pass the task in words, e.g. 'pick up the black bowl'")
    return images, instructions
