"""LeRobot's π0 / π0.5 policy folders, read without LeRobot.

A saved LeRobot policy (`policy.save_pretrained`, LeRobot 0.6) holds:
- config.json with `"type": "pi0"` or `"pi05"` (no transformers `model_type`), the model variants, chunk and
  padding sizes, `input_features` / `output_features` (`observation.images.*`: the cameras, `observation.state`,
  `action`) and `normalization_mapping` (π0: MEAN_STD for state and action; π0.5: QUANTILES);
- model.safetensors with the policy's own key names (`model.paligemma_with_expert.paligemma...`), which
  transformers' own conversion for the pi0 model type renames onto `PI0ForConditionalGeneration` when the
  folder is loaded with a transformers config;
- policy_preprocessor.json / policy_postprocessor.json, whose normalizer steps name a safetensors file of flat
  `"{feature}.{stat}"` tensors (`state_file`; the step index differs between LeRobot versions, so the name is
  read from the JSON). Base checkpoints ship no statistics.
LeRobot loads the PaliGemma tokenizer from the Hub; nothing here downloads, so the folder must hold it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vlacache.errors import CheckpointError

LEROBOT_TYPES = ("pi0", "pi05")
VARIANTS = {"paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m"}  # transformers' default shape
STATE, ACTION = "observation.state", "action"
IMAGE_PREFIX = "observation.images."


def is_lerobot(fields: dict) -> bool:
    """A LeRobot policy config.json: a `type`, no transformers `model_type`."""
    return "type" in fields and "model_type" not in fields


def released_config(family: str):
    """transformers' default PI0Config / PI05Config: the released shape (PaliGemma 2B, SigLIP so400m at 224 px,
    the 300M expert), which LeRobot's `gemma_2b` / `gemma_300m` variants name."""
    import transformers

    return getattr(transformers, "PI05Config" if family == "pi05" else "PI0Config")()


def transformers_config(family: str, fields: dict, path: Path):
    """The transformers config of a LeRobot config.json (`released_config` with its chunk and padding sizes), after
    checking it is this family's and of the released shape."""
    kind = fields.get("type")
    if kind != family:
        other = f"backbone name '{kind}'" if kind in LEROBOT_TYPES else "the LeRobot policy it belongs to"
        raise CheckpointError(f"{path} is a LeRobot '{kind}' policy, not '{family}'; load it with {other}")
    for key, expected in VARIANTS.items():
        if fields.get(key, expected) != expected:
            raise CheckpointError(f"{path}: {key} is {fields[key]!r}; vlacache reads LeRobot's {family} in its released "
                                  f"shape only ({key} {expected!r})")
    if fields.get("use_relative_actions"):
        raise CheckpointError(f"{path} predicts actions relative to the state (use_relative_actions: true), which "
                              "vlacache does not add back; its actions would be offsets. Use a checkpoint trained on "
                              "absolute actions")
    config = released_config(family)
    for key in ("chunk_size", "max_action_dim", "num_inference_steps", *(("max_state_dim",) if family == "pi0" else ())):
        if key in fields:
            setattr(config, key, fields[key])
    return config


def cameras(fields: dict) -> list[str]:
    """The checkpoint's cameras, in its input order (`observation.images.<name>`)."""
    features = fields.get("input_features") or {}
    return [key[len(IMAGE_PREFIX):] for key, spec in features.items()
            if key.startswith(IMAGE_PREFIX) and (spec or {}).get("type") == "VISUAL"]


def action_dim(fields: dict) -> int | None:
    shape = ((fields.get("output_features") or {}).get(ACTION) or {}).get("shape")
    return int(shape[0]) if shape else None


def statistics(path: Path, fields: dict) -> dict | None:
    """{"lerobot": {"action": {...}, "proprio": {...}}} from the normalizer files, each entry with its
    "normalization" mode from `normalization_mapping`; None when the folder has none (a base checkpoint)."""
    stats: dict[str, np.ndarray] = {}
    for pipeline in ("policy_preprocessor.json", "policy_postprocessor.json"):
        spec = path / pipeline
        if not spec.is_file():
            continue
        try:
            steps = json.loads(spec.read_text()).get("steps", [])
        except (json.JSONDecodeError, AttributeError) as err:
            raise CheckpointError(f"{spec} is not a LeRobot processor pipeline ({err})") from None
        for step in steps:
            state_file = step.get("state_file") if isinstance(step, dict) else None
            if state_file and "normalizer" in str(step.get("registry_name", "")):
                stats.update(_read_tensors(path / state_file))
    mapping = fields.get("normalization_mapping") or {}
    out: dict[str, Any] = {}
    for name, feature, kind in (("action", ACTION, "ACTION"), ("proprio", STATE, "STATE")):
        entry = {key[len(feature) + 1:]: value.tolist() for key, value in stats.items() if key.startswith(feature + ".")}
        if not entry:
            continue
        mode = mapping.get(kind, "MEAN_STD" if fields.get("type") == "pi0" else "QUANTILES")
        if mode == "IDENTITY":
            continue
        out[name] = {**entry, "normalization": mode}
    if "action" not in out:
        return None
    return {"lerobot": out}


def _read_tensors(file: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not file.is_file():
        raise CheckpointError(f"{file} is missing; the processor pipeline names it as its normalizer's statistics")
    return {key: np.asarray(value, dtype=np.float64) for key, value in load_file(file).items()}
