"""The released CogACT checkpoint layout, read and written unchanged.

    <root>/config.json                  model ids and action-model settings (see config.py)
    <root>/dataset_statistics.json      {dataset: {"action": {"q01", "q99", "mask", ...}, ...}}
    <root>/checkpoints/<name>.pt        {"model": {"vision_backbone": {...}, "projector": {...},
                                                   "llm_backbone": {...}, "action_model": {...}}}, fp32
    <root>/tokenizer.json, tokenizer.model, tokenizer_config.json, ...   the Llama-2 tokenizer (CogACT itself loads it from
                                        meta-llama/Llama-2-7b-hf; copy those files here)

The .pt uses the older Prismatic naming; the model here uses OpenVLA's (shared modules):

    vision_backbone: dino_featurizer.*   <-> vision_backbone.featurizer.*        (timm names, LayerScale
                     siglip_featurizer.* <-> vision_backbone.fused_featurizer.*   `gamma` <-> `scale_factor`)
    projector:       projector.{0,2,4}.* <-> projector.{fc1,fc2,fc3}.*
    llm_backbone:    llm.*               <-> language_model.*  (llm.model.layers..., llm.lm_head.weight)
    action_model:    net.*               <-> net.*  (see action_model.py)

Top-level entries other than "model" and sections other than these four (e.g. "ema_diffusion") are ignored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from vlacache.backbones.common.checkpoint import CheckpointError

SECTIONS = ("vision_backbone", "projector", "llm_backbone", "action_model")
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
LAYOUT_HINT = (
    "A CogACT checkpoint folder holds config.json, dataset_statistics.json, checkpoints/<name>.pt and the "
    "Llama-2 tokenizer files (tokenizer.json, tokenizer.model, tokenizer_config.json, special_tokens_map.json)."
)
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # persisted by some old transformers versions
_TOWERS = {"featurizer": "dino_featurizer", "fused_featurizer": "siglip_featurizer"}
_PROJECTOR = {"fc1": "0", "fc2": "2", "fc3": "4"}
_MAX_LISTED = 12


def to_released(key: str) -> tuple[str, str]:
    """A key of the model here (OpenVLA names for the VLM, `net.*` for the action head) -> (section, released key)."""
    head, _, rest = key.partition(".")
    if head == "vision_backbone":
        tower, _, rest = rest.partition(".")
        rest = re.sub(r"(^|\.)(ls[12])\.scale_factor$", r"\1\2.gamma", rest)
        return "vision_backbone", f"{_TOWERS[tower]}.{rest}"
    if head == "projector":
        layer, _, param = rest.partition(".")
        return "projector", f"projector.{_PROJECTOR[layer]}.{param}"
    if head == "language_model":
        return "llm_backbone", f"llm.{rest}"
    if head == "action_model":
        return "action_model", rest
    raise KeyError(f"no released name for {key!r}")


def from_released(section: str, key: str) -> str | None:
    """Inverse of `to_released`; None for a key that has no place in the model."""
    if section == "vision_backbone":
        tower, _, rest = key.partition(".")
        inverse = {v: k for k, v in _TOWERS.items()}
        if tower not in inverse or not rest:
            return None
        rest = re.sub(r"(^|\.)(ls[12])\.gamma$", r"\1\2.scale_factor", rest)
        return f"vision_backbone.{inverse[tower]}.{rest}"
    if section == "projector":
        match = re.fullmatch(r"projector\.(\d+)\.(weight|bias)", key)
        inverse = {v: k for k, v in _PROJECTOR.items()}
        if not match or match.group(1) not in inverse:
            return None
        return f"projector.{inverse[match.group(1)]}.{match.group(2)}"
    if section == "llm_backbone":
        return f"language_model.{key[4:]}" if key.startswith("llm.") else None
    if section == "action_model":
        return f"action_model.{key}"
    return None


def find_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(root folder, .pt file) for a root folder holding checkpoints/<name>.pt, or for the .pt file itself."""
    path = Path(path)
    if path.is_file():
        root = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
        return root, path
    if not path.is_dir():
        raise CheckpointError(f"CogACT checkpoint {path} does not exist. {LAYOUT_HINT}")
    found = sorted((path / CHECKPOINT_DIR).glob("*.pt"))
    if not found:
        raise CheckpointError(f"missing file {path / CHECKPOINT_DIR / '<name>.pt'}: no .pt weights in "
                              f"{path / CHECKPOINT_DIR}. {LAYOUT_HINT}")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise CheckpointError(f"{path / CHECKPOINT_DIR} holds several checkpoints ({names}); pass the .pt file to load")
    return path, found[0]


def read_checkpoint(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The four state-dict sections of a released .pt: a tensor-only load, memory-mapped, so nothing is read
    until `materialize` copies each tensor into the dtype and device the model runs in."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(f"cannot load {path} as a tensor-only torch checkpoint: {err}") from err
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path} has no 'model' dict (found {found}); expected {{'model': {{{', '.join(SECTIONS)}}}}}")
    missing = [s for s in SECTIONS if not isinstance(model.get(s), dict)]
    if missing:
        raise CheckpointError(f"{path}: 'model' lacks the section(s) {missing}; found {sorted(model)}, expected {list(SECTIONS)}")
    return {s: model[s] for s in SECTIONS}


def _listing(names: list[str]) -> str:
    more = len(names) - _MAX_LISTED
    return ", ".join(names[:_MAX_LISTED]) + (f" ... and {more} more" if more > 0 else "")


def map_to_model(
    sections: Mapping[str, Mapping[str, torch.Tensor]], expected: Mapping[str, torch.Tensor], source: Path | str
) -> dict[str, torch.Tensor]:
    """Released sections -> a state dict in the model's names; one CheckpointError lists every problem,
    per section, in the released names: expected but not found, found but not expected, shape mismatches."""
    want: dict[tuple[str, str], tuple[int, ...]] = {to_released(k): tuple(v.shape) for k, v in expected.items()}
    state: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for section in SECTIONS:
        given = {k: v for k, v in sections[section].items() if not _IGNORED.search(k)}
        expected_keys = [key for (s, key) in want if s == section]
        missing = [k for k in expected_keys if k not in given]
        unexpected = [k for k in given if (section, k) not in want]
        shapes = [
            f"{k}: file {tuple(given[k].shape)} vs model {want[(section, k)]}"
            for k in expected_keys
            if k in given and tuple(given[k].shape) != want[(section, k)]
        ]
        for label, names in (("expected but not found", missing), ("found but not expected", unexpected),
                             ("shape mismatch", shapes)):
            if names:
                problems.append(f"[{section}] {label} ({len(names)}): {_listing(names)}")
        for key, tensor in given.items():
            if (section, key) in want:
                state[from_released(section, key)] = tensor
    if problems:
        raise CheckpointError(
            f"{source} does not match the model described by config.json:\n  " + "\n  ".join(problems)
            + "\nHint: check vision_backbone_id / llm_backbone_id / action_model_type / action_dim in config.json."
        )
    return state


def materialize(state: dict[str, torch.Tensor], device: torch.device, dtype_of) -> dict[str, torch.Tensor]:
    """Copy each (memory-mapped) tensor into ``dtype_of(key)`` on ``device``, one at a time, dropping the mapping as
    it goes, so the checkpoint's dtype and the model's never both hold the whole model."""
    for key in list(state):
        tensor = state[key]
        target = dtype_of(key) if tensor.is_floating_point() else tensor.dtype
        state[key] = tensor.to(device=device, dtype=target, copy=True)
        del tensor
    return state


def to_sections(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A state dict in the model's names -> the released {section: {released key: tensor}} (CPU, contiguous)."""
    sections: dict[str, dict[str, torch.Tensor]] = {s: {} for s in SECTIONS}
    for key, tensor in state.items():
        section, name = to_released(key)
        sections[section][name] = tensor.detach().to("cpu").contiguous().clone()
    return sections
