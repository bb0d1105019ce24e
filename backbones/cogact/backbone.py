"""CogACT as a vlacache backbone: Prismatic VLM prefill -> cognition feature -> DiT diffusion action head.

How CogACT gets its cognition feature (`predict_action` in CogACT's `vla/cogactvla.py`): the prompt
"In: What action should the robot take to {instruction.lower()}?\\nOut:" is tokenized (with BOS) and the ids of
"▁" (29871 in Llama-2) and EOS (2) are appended unconditionally; the sequence is BOS, the 256 projected patch
tokens, then the rest of the ids, under the causal mask. It then calls `generate(max_new_tokens=1,
output_hidden_states=True)` and takes `output.hidden_states[0][-1][:, -1, :]`: step 0 of generation (the
prefill), the last layer's output after the final RMSNorm, at the last prompt position (the appended EOS).
The generated token itself is never used and no decoder pass follows the prefill. So here: one prefill over
the prompt, feature = final normed hidden state of its last position (`decode_passes() == 0`). The prefill
returns that position's LM logits too (the runtime reports them; the token CogACT would generate).

Action head: DDIM (10 steps, eta 0) over 16 x 7 normalised actions with classifier-free guidance 1.5, then
CogACT's post-processing: clip to [-1, 1], gripper (dimension 6) binarised (< 0.5 -> 0, else 1), un-normalised
with BOUNDS_Q99 (0.5 (x + 1)(q99 - q01) + q01 where the mask is true). Randomness (`noise`): "episode" (default,
as CogACT's SIMPLER policy, which draws fresh noise at every call) draws each call's initial noise from a CPU
torch.Generator seeded with `seed` at episode start (`reset()`, or a new instruction / batch / image size), so
call t of an episode gets the t-th draw on any device, and a cached and an uncached run of one episode see the
same noise sequence; "fixed" re-seeds at every call, so a prediction depends only on its inputs (for exact
comparisons of single calls). The action head runs in float32 whatever `dtype` says; VLA-Cache accelerates
the VLM prefill only.

Adaptive action ensemble (CogACT's SIMPLER evaluation), `action_ensemble: true`: decode() returns the
ensembled action for the current step, [B, 1, 7], instead of the chunk [B, 16, 7]. The ensembler is reset by
`reset()` and automatically when the episode key (instruction, batch size, image sizes) changes.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from vlacache.backbone import ActionOutput, LoadConfig, PrefillOutput, PreparedInputs
from vlacache.backbones.common.checkpoint import (
    CheckpointError, ensure_fits, load_state_dict_strict, read_json, verify_manifest,
)
from vlacache.backbones.common.prismatic import PrismaticBackbone
from vlacache.backbones.common.statistics import (STATS_FILE, load_norm_stats, normalize_q99, resolve_unnorm_key,
                                                  unnormalize)
from vlacache.backbones.common.tokenizer import copy_tokenizer_files, load_tokenizer
from vlacache.backbones.common.vlm import PrismaticVLM
from vlacache.flops import attention_flops, linear_flops
from vlacache.registry import register_backbone
from vlacache.types import InputError, Observation

from .action_model import ActionModel, DDIMSampler, cosine_betas, sample_actions
from .checkpoint import (
    CHECKPOINT_DIR, CONFIG_FILE, LAYOUT_HINT, find_checkpoint, map_to_model, materialize, read_checkpoint,
    to_sections,
)
from .config import CogACTConfig, action_fields_from_weights
from .ensemble import AdaptiveEnsembler
from .model import build_action_model, build_vlm, place

GRIPPER_DIM = 6
NOISE_MODES = ("episode", "fixed")
DIFFUSION_STEPS = 100
TRAIN_REPEATS = 4  # CogACT's repeated_diffusion_steps: each training sample at 4 diffusion steps
CONDITION_DROPOUT = 0.1  # CogACT's class_dropout_prob: the condition replaced by `uncondition` in training


@register_backbone("cogact")
class CogACTBackbone(PrismaticBackbone):
    """CogACT (Prismatic DINOv2+SigLIP + Llama-2, DiT action head) on stock transformers; one 'primary' camera."""

    cameras = ("primary",)

    @dataclass
    class Config(LoadConfig):
        cfg_scale: float = 1.5
        ddim_steps: int = 10
        action_ensemble: bool = False
        ensemble_horizon: int = 7
        ensemble_alpha: float = 0.1
        noise: str = "episode"  # or "fixed": the same initial noise at every call (see the module docstring)

    def __init__(
        self,
        vlm: PrismaticVLM,
        action_model: ActionModel,
        tokenizer,
        config: CogACTConfig,
        unnorm_key: str | None = None,
        seed: int = 0,
        cfg_scale: float = 1.5,
        ddim_steps: int = 10,
        action_ensemble: bool = False,
        ensemble_horizon: int = 7,
        ensemble_alpha: float = 0.1,
        noise: str = "episode",
    ) -> None:
        if noise not in NOISE_MODES:
            raise InputError(f"noise '{noise}' is not one of {list(NOISE_MODES)}")
        super().__init__(vlm, tokenizer, config, unnorm_key)
        self.action_model = action_model.eval()
        self.seed = seed
        self.noise = noise
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.cfg_scale = float(cfg_scale)
        self.sampler = DDIMSampler(DIFFUSION_STEPS, ddim_steps)
        self.train_alphas_cumprod = np.cumprod(1.0 - cosine_betas(DIFFUSION_STEPS))
        self.eos_token = tokenizer.eos_token_id
        if self.space_token is None or self.space_token == tokenizer.unk_token_id or self.eos_token is None:
            raise CheckpointError("the tokenizer lacks the '▁' piece or an EOS token; CogACT needs the Llama-2 tokenizer")
        self.ensembler = AdaptiveEnsembler(ensemble_horizon, ensemble_alpha) if action_ensemble else None
        if self.ensembler is not None and ensemble_horizon > config.chunk_size:
            raise InputError(f"ensemble_horizon {ensemble_horizon} exceeds the {config.chunk_size} predicted actions per step")
        self._episode_key: tuple | None = None
        self.last_cognition: torch.Tensor | None = None
        self.last_normalized: np.ndarray | None = None

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: "CogACTBackbone.Config") -> "CogACTBackbone":
        device, dtype = config.placement()
        options = dict(
            unnorm_key=config.unnorm_key, seed=config.seed, cfg_scale=config.cfg_scale, ddim_steps=config.ddim_steps,
            action_ensemble=config.action_ensemble, ensemble_horizon=config.ensemble_horizon,
            ensemble_alpha=config.ensemble_alpha, noise=config.noise,
        )
        if config.preset is not None:
            from .tiny import build_preset

            return build_preset(config.preset, device=device, dtype=dtype,
                                attn_implementation=config.attn_implementation, **options)
        return cls.from_pretrained(config.checkpoint_dir(), device=device, dtype=dtype,
                                   attn_implementation=config.attn_implementation, **options)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        **options,
    ) -> "CogACTBackbone":
        """Load a released CogACT folder (or its checkpoints/<name>.pt) unchanged; see checkpoint.py."""
        root, weights = find_checkpoint(path)
        verify_manifest(root)
        data = read_json(root / CONFIG_FILE)
        norm_stats = load_norm_stats(root, data.get("norm_stats") if isinstance(data, dict) else None, CONFIG_FILE)
        resolve_unnorm_key(norm_stats, options.get("unnorm_key"))  # a wrong key fails before any weights are read
        tokenizer = _load_tokenizer(root)
        sections = read_checkpoint(weights)
        config = CogACTConfig.from_dict(data, norm_stats, fallback=action_fields_from_weights(sections["action_model"]))
        _check_chunk_size(sections["action_model"], config, weights)
        embed = sections["llm_backbone"].get("llm.model.embed_tokens.weight")
        vocab = int(embed.shape[0]) if isinstance(embed, torch.Tensor) and embed.dim() == 2 else None
        with torch.device("meta"):
            vlm = build_vlm(config, attn_implementation, vocab_size=vocab)
            action_model = build_action_model(config, vlm.language_model.config.hidden_size)
        expected = {**vlm.state_dict(), **{f"action_model.{k}": v for k, v in action_model.state_dict().items()}}
        state = map_to_model(sections, expected, weights)
        del sections
        device = torch.device(device)
        head_dtype = lambda key: torch.float32 if key.startswith("action_model.") else dtype  # noqa: E731
        nbytes = sum(t.numel() * torch.empty((), dtype=head_dtype(k) if t.is_floating_point() else t.dtype).element_size()
                     for k, t in state.items())
        ensure_fits(weights, nbytes, device, dtype)
        state = materialize(state, device, head_dtype)
        load_state_dict_strict(vlm, {k: v for k, v in state.items() if not k.startswith("action_model.")}, assign=True)
        load_state_dict_strict(
            action_model, {k[len("action_model."):]: v for k, v in state.items() if k.startswith("action_model.")}, assign=True
        )
        vlm, action_model = place(vlm, action_model, torch.device(device), dtype)
        return cls(vlm, action_model, tokenizer, config, **options)

    def save_pretrained(self, path: str | Path, name: str | None = None) -> Path:
        """Write the released layout (config.json, dataset_statistics.json, checkpoints/<name>.pt in fp32, tokenizer);
        `name` defaults to the folder's name. Returns the .pt path."""
        path = Path(path)
        (path / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2))
        (path / STATS_FILE).write_text(json.dumps(self.config.norm_stats, indent=2))
        state = {**self.model.state_dict(), **{f"action_model.{k}": v for k, v in self.action_model.state_dict().items()}}
        sections = {s: {k: v.float() for k, v in d.items()} for s, d in to_sections(state).items()}
        weights = path / CHECKPOINT_DIR / f"{name or path.name}.pt"
        torch.save({"model": sections}, weights)
        copy_tokenizer_files(Path(self.tokenizer.name_or_path), path)
        return weights

    # -- the four stages ----------------------------------------------------------------------------------
    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    def prompt_ids(self, instruction: str) -> list[int]:
        """CogACT: the prompt's ids (with BOS), then "▁" and EOS appended unconditionally. Prismatic's prompt builder
        removes the literal text "<image>" from the message (and strips it, a no-op around "What ... ?")."""
        message = f"What action should the robot take to {instruction.lower()}?".replace("<image>", "").strip()
        ids = self.tokenizer(f"In: {message}\nOut:").input_ids
        return [*ids, self.space_token, self.eos_token]

    def prefill(self, embeds: torch.Tensor, inputs: PreparedInputs, cache: DynamicCache) -> PrefillOutput:
        """One decoder pass; `extra["cognition"]` is the last position's final (normed) hidden state [B, D]."""
        positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
        out = self.decoder(inputs_embeds=embeds, position_ids=positions, use_cache=True, **{self._cache_kw: cache})
        cognition = out.last_hidden_state[:, -1]
        logits = self.model.language_model.lm_head(cognition)
        return PrefillOutput(logits=logits.float(), extra={"cognition": cognition})

    def decode(self, prefill: PrefillOutput, inputs: PreparedInputs, cache: DynamicCache) -> ActionOutput:
        """No decoder pass: DDIM + CFG on the cognition feature, post-processing, optional ensembling."""
        cognition = prefill.extra["cognition"]
        self.last_cognition = cognition.detach()
        key = inputs.episode_key()
        if key != self._episode_key:
            self.reset()
            self._episode_key = key
        normalized = self.sample_normalized(cognition)
        self.last_normalized = normalized
        actions = self.postprocess(normalized)
        if self.ensembler is not None:
            actions = self.ensembler.ensemble_action(actions)[:, None].astype(np.float32)
        return ActionOutput(actions=actions)

    # -- training (`vlacache train`) ------------------------------------------------------------------------
    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model, "action_model": self.action_model}

    def bc_loss(self, obs: Observation, actions: np.ndarray) -> torch.Tensor:
        """CogACT's training objective: the cognition feature (the last position's final hidden state, as
        `prefill` reads it) conditions the DiT, which predicts the noise added to the demonstrated chunk
        (BOUNDS_Q99-normalised, gripper as is) at a random step of the 100-step cosine schedule; MSE to that
        noise. As CogACT trains: each sample repeated `TRAIN_REPEATS` times with its own step and noise, and
        the condition replaced by the learned `uncondition` with probability `CONDITION_DROPOUT` (what
        classifier-free guidance needs). actions: [B, >= chunk, 7] in the model's convention."""
        inputs = self.prepare(obs)
        embeds = self.embed(inputs)
        positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
        cognition = self.decoder(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state[:, -1]
        target = normalize_q99(actions[:, : self.chunk_size], self.config.norm_stats[self.unnorm_key]["action"], "action")
        net = self.action_model.net
        x0 = torch.from_numpy(target).to(self.device, net.x_embedder.linear.weight.dtype).repeat(TRAIN_REPEATS, 1, 1)
        z = cognition[:, None].to(x0.dtype).repeat(TRAIN_REPEATS, 1, 1)
        dropped = torch.rand(z.shape[0], device=z.device) < CONDITION_DROPOUT
        z = torch.where(dropped[:, None, None], net.z_embedder.uncondition[None].to(z.dtype), z)
        steps = torch.randint(0, DIFFUSION_STEPS, (x0.shape[0],), device=x0.device)
        abar = torch.as_tensor(self.train_alphas_cumprod, dtype=x0.dtype, device=x0.device)[steps][:, None, None]
        noise = torch.randn_like(x0)
        noisy = abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise
        return torch.nn.functional.mse_loss(net(noisy, steps, z), noise)

    def initial_noise(self, batch: int) -> torch.Tensor:
        """[B, 16, 7] standard normal noise: the episode generator's next draw ("episode"), or the first draw
        of a generator seeded with `seed` ("fixed")."""
        if self.noise == "fixed":
            self.generator.manual_seed(self.seed)
        return torch.randn(batch, self.chunk_size, self.config.action_dim, generator=self.generator)

    @torch.inference_mode()
    def sample_normalized(self, cognition: torch.Tensor, noise: torch.Tensor | None = None) -> np.ndarray:
        """Normalised action chunks [B, 16, 7] (before clipping) for cognition features [B, D]."""
        if noise is None:
            noise = self.initial_noise(cognition.shape[0])
        device = next(self.action_model.parameters()).device
        samples = sample_actions(self.action_model.net, cognition.to(device), noise.to(device), self.sampler, self.cfg_scale)
        return samples.float().cpu().numpy()

    def postprocess(self, normalized: np.ndarray) -> np.ndarray:
        """CogACT: clip to [-1, 1], binarise the gripper at 0.5, un-normalise (BOUNDS_Q99 with mask)."""
        x = np.clip(normalized.astype(np.float64), -1.0, 1.0)
        if x.shape[-1] > GRIPPER_DIM:
            x[..., GRIPPER_DIM] = np.where(x[..., GRIPPER_DIM] < 0.5, 0.0, 1.0)
        return unnormalize(x, self.config.norm_stats[self.unnorm_key]).astype(np.float32)

    def reset(self) -> None:
        """Start a new episode: re-seed the noise generator, forget the action-ensemble history."""
        self.generator.manual_seed(self.seed)
        if self.ensembler is not None:
            self.ensembler.reset()
        self._episode_key = None

    @property
    def action_chunk(self) -> int:
        return 1 if self.ensembler is not None else self.chunk_size

    def episode_state(self) -> Any:
        return (self.generator.get_state(), copy.deepcopy(self.ensembler), self._episode_key)

    def load_episode_state(self, state: Any) -> None:
        if state is None:
            self.reset()
            return
        generator, ensembler, self._episode_key = state
        self.generator.set_state(generator)
        self.ensembler = copy.deepcopy(ensembler)

    def reset_rows(self, rows: list[int]) -> None:
        raise InputError(
            "CogACT keeps one noise generator and one action ensemble for the whole batch, so its rows cannot start "
            "or end episodes separately; reset() all rows, or run one CachedVLA per episode (batch_envs: 1)"
        )

    keep_rows = reset_rows

    # -- accounting ---------------------------------------------------------------------------------------
    def head_flops(self) -> float:
        """The DiT over 1 condition + chunk action tokens, per DDIM step, doubled for classifier-free guidance."""
        net = self.action_model.net
        tokens = net.positional_embedding.shape[0]
        width = net.positional_embedding.shape[1]
        per_pass = linear_flops(net.blocks, tokens) + linear_flops(net.final_layer, tokens)
        per_pass += sum(attention_flops(tokens, tokens, width) for _ in net.blocks)
        per_pass += linear_flops(net.x_embedder, tokens - 1) + linear_flops(net.z_embedder, 1) + linear_flops(net.t_embedder, 1)
        passes = len(self.sampler.timesteps) * (2 if self.cfg_scale > 1.0 else 1)
        return per_pass * passes

    def decode_passes(self) -> int:
        return 0


def _check_chunk_size(action_state: dict[str, torch.Tensor], config: CogACTConfig, source: Path) -> None:
    positions = action_state.get("net.positional_embedding")
    need = config.chunk_size + 1 + config.past_action_window_size
    if isinstance(positions, torch.Tensor) and positions.shape[0] != need:
        raise CheckpointError(
            f"{source}: net.positional_embedding has {positions.shape[0]} rows, i.e. the action model predicts "
            f"{positions.shape[0] - 1} actions per step, but config.json says future_action_window_size="
            f"{config.future_action_window_size} ({config.chunk_size} actions, {need} rows); fix config.json"
        )


def _load_tokenizer(root: Path):
    if (not (root / "tokenizer_config.json").is_file()
            or not any((root / f).is_file() for f in ("tokenizer.model", "tokenizer.json"))):
        raise CheckpointError(
            f"missing tokenizer files in {root}: CogACT uses the Llama-2 tokenizer (meta-llama/Llama-2-7b-hf); copy its "
            f"tokenizer.json, tokenizer.model, tokenizer_config.json and special_tokens_map.json next to config.json. "
            f"{LAYOUT_HINT}"
        )
    return load_tokenizer(root)
