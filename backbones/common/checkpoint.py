"""Reading and writing HF-style checkpoint directories with the released (original) key names."""

from __future__ import annotations

import json
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from vlacache.errors import CheckpointError
from vlacache.manifest import MANIFEST_FILE, verify_manifest, write_manifest

__all__ = [
    "CheckpointError",
    "SAFETENSORS_FILE",
    "SAFETENSORS_INDEX_FILE",
    "read_json",
    "check_field_types",
    "read_config",
    "load_safetensors_dir",
    "weight_files",
    "loaded_nbytes",
    "available_memory",
    "ensure_fits",
    "save_safetensors_dir",
    "load_state_dict_strict",
    "save_torch_checkpoint",
    "load_torch_file",
    "strip_prefix",
    "MANIFEST_FILE",
    "write_manifest",
    "verify_manifest",
]

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
_LAYOUT_HINT = (
    "A released OpenVLA directory holds config.json, the weights as model.safetensors or "
    "model.safetensors.index.json + model-0000K-of-0000N.safetensors shards, and the tokenizer files "
    "(tokenizer.json, tokenizer.model, tokenizer_config.json, special_tokens_map.json, added_tokens.json)."
)
_MAX_LISTED = 20


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file, raising ``CheckpointError`` naming the file if it is missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file {path}. {_LAYOUT_HINT}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); re-download or regenerate it") from err


def check_field_types(schema: type, values: Mapping[str, Any], source: str) -> None:
    """Raise a ``CheckpointError`` naming the first field of ``values`` whose JSON value does not have the type the
    dataclass ``schema`` declares for it (str, bool, int, float, list[...], dict[...], Any, ``X | None``)."""
    hints = typing.get_type_hints(schema)
    for name, value in values.items():
        if name in hints and not _matches(value, hints[name]):
            shown = json.dumps(value)[:60]
            raise CheckpointError(
                f"{source}: field '{name}' is {shown} ({type(value).__name__}), expected {_describe(hints[name])}; "
                "restore the value from the released config.json"
            )


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "") if typing.get_origin(hint) else getattr(hint, "__name__", str(hint))


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


def _read_safetensors(path: Path, dtype: torch.dtype | None, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of one file, each cast to ``dtype`` (floating tensors) and placed on ``device`` as it is read,
    so a wider dtype never coexists with a full copy in the file's. Same dtype on the CPU: clone(), because tensors
    read from a file can sit at unaligned addresses, which sends CPU matmuls down other kernels and changes
    results in the last bit; a fresh allocation is aligned."""
    state = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                if target == tensor.dtype and device.type == "cpu":
                    state[key] = tensor.clone()
                else:
                    state[key] = tensor.to(device=device, dtype=target)
                del tensor
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(
            f"cannot read {path}: {err}. The file is truncated or corrupted; re-download it"
        ) from err
    return state


def weight_files(ckpt_dir: str | os.PathLike[str]) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint dir (``model.safetensors``, or the shards its index lists) and the
    index's weight map (None for a single file); checks that every listed shard exists."""
    ckpt_dir = _require_dir(ckpt_dir)
    index_path = ckpt_dir / SAFETENSORS_INDEX_FILE
    single_path = ckpt_dir / SAFETENSORS_FILE
    if not index_path.is_file():
        if single_path.is_file():
            return [single_path], None
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
    return [ckpt_dir / name for name in shards], weight_map


def loaded_nbytes(files: Iterable[Path], dtype: torch.dtype | None) -> int:
    """Bytes the tensors of these safetensors files take once loaded in ``dtype``, read from their headers only."""
    total = 0
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    stored = _SAFETENSORS_DTYPES.get(piece.get_dtype(), torch.float32)
                    target = dtype if dtype is not None and stored.is_floating_point else stored
                    total += math.prod(piece.get_shape()) * torch.empty((), dtype=target).element_size()
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read {path}: {err}. The file is truncated or corrupted; re-download it") from err
    return total


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device``: CUDA's free memory, or the OS's MemAvailable for the CPU (None if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def ensure_fits(source: Path, nbytes: int, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse before reading any weights when the model cannot fit in the memory ``device`` has free."""
    free = available_memory(device)
    if free is None or nbytes <= free:
        return
    gib = 2**30
    hint = f"load in bfloat16 (backbone.dtype=bfloat16, about {nbytes / 2 / gib:.1f} GiB), " if dtype == torch.float32 else ""
    raise CheckpointError(
        f"loading {source} in {str(dtype).removeprefix('torch.')} needs {nbytes / gib:.1f} GiB on {device}, but only "
        f"{free / gib:.1f} GiB is free; {hint}free memory, or use a machine with more"
    )


def load_safetensors_dir(
    ckpt_dir: str | os.PathLike[str], dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Load all tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``,
    floating tensors cast to ``dtype`` (None: as stored) and placed on ``device`` one tensor at a time."""
    files, weight_map = weight_files(ckpt_dir)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(_read_safetensors(path, dtype, torch.device(device)))
    absent = [key for key in weight_map or {} if key not in state]
    if absent:
        raise CheckpointError(
            f"{SAFETENSORS_INDEX_FILE} maps {_listing(absent)} to shards that do not contain them; "
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
