"""What decides an episode's outcome, as a JSON-able fingerprint per policy (stored in `run.json`).

Counted: the backbone's resolved typed config (device as its kind: cpu / cuda) and the checkpoint's identity
(for a directory: every file's relative name, size and content hash, or mtime above 64 MiB so that a released
7B checkpoint costs a listing),
the policy's full resolved parameters (every strategy's typed Config, so the same label with new parameters is
a change; the per-camera scales; a trained strategy's checkpoint identity, e.g. the learned selector's weights), the env and perturbation typed configs (plus `data_identity(config)` when the env class defines it:
the replay env's recording hash),
max_steps, execute_chunk, episodes, the fast path (reuse buckets change what is reused), batch_envs (a batched step
rounds differently), and the code version (vlacache.__version__ and a hash of its Python
sources). Not counted, because they do not change an outcome: the experiment name,
output_dir, videos, launcher (devices, nodes, accelerator), retry settings, progress bars.

`check_fingerprints` compares them with those `run.json` recorded for the results in the directory: resuming
with a different one is refused, naming the dotted keys that changed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

from ..backbone import resolve_checkpoint
from ..config import ConfigError, resolve_component
from ..experiment import ExperimentConfig, resolve_policy_config
from ..registry import BACKBONES, ENVS, PERTURBATIONS, STRATEGIES
from .results import MANIFEST_NAME, ResultsConflict, write_atomic

MAX_CHECKPOINT_FILES = 10_000
HASHED_FILE_BYTES = 64 << 20


def plain(value: Any) -> Any:
    """JSON-able: dataclasses -> dicts, tuples -> lists, paths -> strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def component(registry, spec: Mapping[str, Any] | str, kind: str) -> tuple[type, dict]:
    """{name, every field of the registered class's typed Config}: defaults filled in, so a default that
    changes between versions, or a parameter left out in one config and set in the other, shows."""
    cls, config = resolve_component(registry, spec, kind)
    name = spec if isinstance(spec, str) else dict(spec)["name"]
    return cls, {"name": name, **plain(config)}


def device_kind(device: str) -> str:
    """'auto' -> what it resolves to on this machine; 'cuda:3' -> 'cuda' (ranks of one run differ only there)."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device).split(":", 1)[0]


def file_identity(path: Path, stat: os.stat_result) -> list:
    """[size, sha256] for a file up to HASHED_FILE_BYTES (so a fresh clone of shipped weights is the same
    checkpoint), [size, mtime_ns] above (a 15 GB checkpoint costs a directory listing, no reading)."""
    if stat.st_size > HASHED_FILE_BYTES:
        return [stat.st_size, stat.st_mtime_ns]
    return [stat.st_size, hashlib.sha256(path.read_bytes()).hexdigest()]


def checkpoint_identity(checkpoint: str | Path) -> dict[str, Any]:
    """Every file under a checkpoint directory (or the file itself): relative name -> `file_identity`."""
    root = Path(checkpoint).expanduser()
    if not root.exists():
        return {"missing": str(root)}
    if root.is_file():
        stat = root.stat()
        return {"files": {root.name: file_identity(root, stat)}}
    files: dict[str, list[int]] = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or len(files) >= MAX_CHECKPOINT_FILES:
                continue
            path = Path(folder) / name
            try:
                stat = path.stat()
            except OSError:
                continue
            files[path.relative_to(root).as_posix()] = file_identity(path, stat)
    return {"files": files}


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """vlacache.__version__ and a sha256 of the Python sources of the package and its plug-in rooms (vlacache,
    strategies, backbones, envs): any code change counts, a commit that only touches docs or tests does not,
    and it works the same for a git checkout and an installed wheel."""
    import vlacache
    from vlacache import backbones, envs, strategies

    digest = hashlib.sha256()
    for package in (vlacache, strategies, backbones, envs):
        root = Path(package.__path__[0])
        for path in sorted(root.rglob("*.py")):
            if package is vlacache and path.relative_to(root).parts[0] in ("strategies", "backbones", "envs"):
                continue  # an installed wheel nests the plug-in rooms: hash each once
            digest.update(f"{package.__name__}/{path.relative_to(root).as_posix()}\n".encode())
            digest.update(path.read_bytes())
    return {"vlacache": vlacache.__version__, "source_sha256": digest.hexdigest()}


def policy_fingerprint(spec: Any) -> dict[str, Any]:
    config = resolve_policy_config(spec)
    out: dict[str, Any] = {"label": config.label, "reuse_order": config.reuse_order, "cameras": config.cameras}
    for kind in ("selector", "relevance", "scheduler", "gate", "pruner"):
        cls, out[kind] = component(STRATEGIES[kind], getattr(config, kind), kind)
        folder = getattr(cls, "checkpoint_folder", None)
        if folder is not None:  # trained parameters (the learned selector): the same name with new weights is a change
            out[kind]["checkpoint_identity"] = checkpoint_identity(folder(out[kind]["checkpoint"]))
    return out


def experiment_fingerprints(config: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """policy label -> fingerprint of everything that decides that policy's episodes. Resolves every config
    (a bad one fails here, before anything is written) but builds nothing."""
    _, backbone = component(BACKBONES, config.backbone, "backbone")
    backbone["device"] = device_kind(backbone.get("device", "auto"))
    env_cls, env = component(ENVS, config.env, "env")
    data_identity = getattr(env_cls, "data_identity", None)
    if data_identity is not None:
        env["data"] = data_identity(resolve_component(ENVS, config.env, "env")[1])
    common = {
        "backbone": backbone,
        "checkpoint": checkpoint_identity(resolve_checkpoint(backbone["checkpoint"])) if backbone.get("checkpoint") else None,
        "env": env,
        "perturbation": component(PERTURBATIONS, config.perturbation, "perturbation")[1] if config.perturbation else None,
        "max_steps": config.max_steps,
        "execute_chunk": config.execute_chunk,
        "episodes": config.episodes,
        "fast_path": dataclasses.asdict(config.fast_path),
        "batch_envs": config.batch_envs,
        "code": code_version(),
    }
    fingerprints: dict[str, dict[str, Any]] = {}
    for spec in config.policies:
        policy = policy_fingerprint(spec)
        if policy["label"] in fingerprints:
            labels = [policy_fingerprint(s)["label"] for s in config.policies]
            raise ConfigError(f"policy labels must be unique, got {labels}; set `label:` in the policy configs")
        fingerprints[policy["label"]] = {"policy": policy, **common}
    return fingerprints


# -- fingerprints ---------------------------------------------------------------------------------------------

def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and scalars are leaves."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def changed_keys(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """The dotted keys whose values differ, with (old, new); a key only on one side counts as changed."""
    missing = object()
    a, b = flatten(old), flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, missing), b.get(key, missing)
        if x != y:
            out.append((key, None if x is missing else x, None if y is missing else y))
    return out


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def describe_changes(changes: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    parts = [f"{key} ({_short(a)} -> {_short(b)})" for key, a, b in changes[:limit]]
    if len(changes) > limit:
        parts.append(f"and {len(changes) - limit} more")
    return ", ".join(parts)


def load_manifest(out: Path) -> dict:
    path = out / MANIFEST_NAME
    if not path.exists():
        return {"format": 1, "policies": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("policies"), dict):
            raise ValueError("no 'policies' mapping")
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ResultsConflict(
            f"{path} is not a readable vlacache run file ({error}); pass a new output_dir=..., or add --restart "
            f"to move the previous results aside") from None
    return manifest


def check_fingerprints(out: Path, fingerprints: dict[str, dict], recorded: set[str], write: bool) -> None:
    """Refuse when a policy that already has results in `out` had them made under a different fingerprint (or
    under none: results older than fingerprints); with `write`, record the fingerprints of this run's policies.
    A policy new to the directory, or one with no results yet, is (re)recorded freely."""
    manifest = load_manifest(out)
    problems = []
    for label, fingerprint in fingerprints.items():
        if label not in recorded:
            continue
        entry = manifest["policies"].get(label)
        if entry is None:
            problems.append(f"policy '{label}' has results but no fingerprint in {MANIFEST_NAME}")
            continue
        changes = changed_keys(entry.get("fingerprint", {}), json.loads(json.dumps(fingerprint)))
        if changes:
            problems.append(f"policy '{label}' changed {describe_changes(changes)}")
    if problems:
        raise ResultsConflict(
            f"{out} holds results of a different run ({'; '.join(problems)}); to keep them, pass a new "
            f"output_dir=...; to start over here, add --restart (the old results move to {out}/restarted-<time>/)")
    if not write:
        return
    changed = False
    for label, fingerprint in fingerprints.items():
        plain = json.loads(json.dumps(fingerprint))
        entry = manifest["policies"].get(label)
        if entry is None or entry.get("fingerprint") != plain:
            manifest["policies"][label] = {"fingerprint": plain, "recorded": time.strftime("%Y-%m-%d %H:%M:%S")}
            changed = True
    if changed or not (out / MANIFEST_NAME).exists():
        write_atomic(out / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())
