"""Reading and writing HF-style checkpoint directories with the released (original) key names."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

__all__ = [
    "CheckpointError",
    "SAFETENSORS_FILE",
    "SAFETENSORS_INDEX_FILE",
    "read_json",
    "read_config",
    "load_safetensors_dir",
    "save_safetensors_dir",
    "load_state_dict_strict",
    "save_torch_checkpoint",
    "load_torch_file",
    "strip_prefix",
]

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
_LAYOUT_HINT = (
    "A released OpenVLA directory holds config.json, the weights as model.safetensors or "
    "model.safetensors.index.json + model-0000K-of-0000N.safetensors shards, and the tokenizer files "
    "(tokenizer.model, tokenizer_config.json, special_tokens_map.json, added_tokens.json)."
)
_MAX_LISTED = 20


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, malformed, or does not match the model."""


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file, raising ``CheckpointError`` naming the file if it is missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file {path}. {_LAYOUT_HINT}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); re-download or regenerate it") from err


def _require_dir(ckpt_dir: str | os.PathLike[str]) -> Path:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist. {_LAYOUT_HINT}")
    return ckpt_dir


def read_config(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the parsed ``config.json`` of a checkpoint directory."""
    config = read_json(_require_dir(ckpt_dir) / "config.json")
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{Path(ckpt_dir) / 'config.json'} must hold a JSON object, got {type(config).__name__}; "
            "restore the released config.json"
        )
    return config


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    # clone(): tensors read from a file can sit at unaligned addresses, which sends CPU matmuls down other
    # kernels and changes results in the last bit; a fresh allocation is aligned.
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return {key: handle.get_tensor(key).clone() for key in handle.keys()}


def load_safetensors_dir(ckpt_dir: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load all tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``."""
    ckpt_dir = _require_dir(ckpt_dir)
    index_path = ckpt_dir / SAFETENSORS_INDEX_FILE
    single_path = ckpt_dir / SAFETENSORS_FILE
    if not index_path.is_file():
        if single_path.is_file():
            return _read_safetensors(single_path)
        raise CheckpointError(
            f"no weights in {ckpt_dir}: neither {single_path.name} nor {index_path.name} exists. {_LAYOUT_HINT}"
        )
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path} has no 'weight_map' object; it is not a HF safetensors index")
    shards = list(dict.fromkeys(weight_map.values()))
    missing = [name for name in shards if not (ckpt_dir / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{index_path.name} lists shard(s) that are not in {ckpt_dir}: {', '.join(missing)}; "
            "the download is incomplete, fetch the missing shard file(s)"
        )
    state: dict[str, torch.Tensor] = {}
    for name in shards:
        state.update(_read_safetensors(ckpt_dir / name))
    absent = [key for key in weight_map if key not in state]
    if absent:
        raise CheckpointError(
            f"{index_path.name} maps {_listing(absent)} to shards that do not contain them; "
            "the index and shards come from different saves, re-download both"
        )
    return state


def _shard_plan(state: Mapping[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _storable(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"state_dict[{key!r}] is a {type(tensor).__name__}, not a tensor; drop it first")
        tensor = tensor.detach().to("cpu")
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor.contiguous()
    return out


def save_safetensors_dir(
    ckpt_dir: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    max_shard_bytes: int = 5 * 1024**3,
) -> list[Path]:
    """Write ``state_dict`` as ``model.safetensors`` or as HF shards + index; returns the files written."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = _storable(state_dict)
    plan = _shard_plan(state, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(plan) == 1:
        path = ckpt_dir / SAFETENSORS_FILE
        save_file(state, str(path), metadata=metadata)
        return [path]
    written: list[Path] = []
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(plan, start=1):
        name = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        save_file({key: state[key] for key in keys}, str(ckpt_dir / name), metadata=metadata)
        weight_map.update(dict.fromkeys(keys, name))
        written.append(ckpt_dir / name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    index_path = ckpt_dir / SAFETENSORS_INDEX_FILE
    index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*written, index_path]


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return f"{shown} ... and {more} more" if more > 0 else shown


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    ignore_prefixes: Iterable[str] = (),
    assign: bool = False,
) -> None:
    """Copy ``state_dict`` into ``module``, raising one ``CheckpointError`` listing every key problem.

    Keys starting with any of ``ignore_prefixes`` are dropped from both sides before comparing. With
    ``assign=True`` (a module built on the meta device) the checkpoint tensors are taken as they are, in their
    own dtype, instead of being copied into the module's.
    """
    prefixes = tuple(ignore_prefixes)
    own = module.state_dict()
    expected = {k: v for k, v in own.items() if not k.startswith(prefixes)}
    given = {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    problems = [
        f"{label} ({len(names)}): {_listing(names)}"
        for label, names in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if names
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint does not match {type(module).__name__}:\n  "
            + "\n  ".join(problems)
            + "\nHint: check that config.json (vision tower ids, text_config sizes) describes the weights, "
            "and strip wrapper prefixes such as 'module.' with strip_prefix()."
        )
    if assign:
        module.load_state_dict({**own, **given}, strict=True, assign=True)
        return
    cast = {k: given[k].to(dtype=v.dtype) if k in given else v for k, v in own.items()}
    module.load_state_dict(cast, strict=True)


def save_torch_checkpoint(path: str | os.PathLike[str], obj: Any) -> None:
    """``torch.save`` ``obj`` to ``path``, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)


def load_torch_file(path: str | os.PathLike[str]) -> Any:
    """``torch.load`` a tensor-only file (``weights_only=True``) onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"missing file {path}; OpenVLA-OFT ships its action head and proprio projector as separate "
            "'action_head--*_checkpoint.pt' / 'proprio_projector--*_checkpoint.pt' files next to the weights"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot load {path} as a tensor-only torch file: {err}") from err


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Return a copy of ``state_dict`` with ``prefix`` removed from every key that starts with it."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}
