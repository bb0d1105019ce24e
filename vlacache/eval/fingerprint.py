"""What decides an episode's outcome, as a JSON-able fingerprint per policy (stored in `run.json`).

Counted: the backbone's resolved typed config (device as its kind: cpu / cuda) and the checkpoint's identity
(for a directory: every file's relative name, size and content hash, or mtime above 64 MiB so that a released
7B checkpoint costs a listing),
the policy's full resolved parameters (every strategy's typed Config, so the same label with new parameters is
a change; the per-camera scales; a trained strategy's checkpoint identity, e.g. the learned
selector's weights), the env and perturbation typed configs (plus `data_identity(config)` when the env class defines it:
the replay env's recording hash),
max_steps, execute_chunk, episodes, the fast path (reuse buckets change what is reused), batch_envs (a batched step
rounds differently), and the code of the strategies, backbone and env in use (`code_identity.component_code`).
Not counted, because they do not change an outcome: the experiment name,
output_dir, videos, launcher (devices, nodes, accelerator), retry settings, progress bars. Other code (the
engine, the runner, other families) is recorded per policy as the builds its results were made under, not
compared: the engine's exactness is what the test suite proves on every run.

`check_fingerprints` compares them with those `run.json` recorded for the results in the directory: resuming
with a different one is refused, naming the dotted keys that changed; resuming under other code outside them
warns and appends the build (version, source hash, git commit) to the policy's `builds`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from ..backbone import resolve_checkpoint
from ..manifest import MANIFEST_FILE
from ..config import ConfigError, resolve_component
from ..experiment import ExperimentConfig, resolve_policy_config
from ..guard import GuardConfig
from ..registry import BACKBONES, ENVS, PERTURBATIONS, STRATEGIES
from .code_identity import code_build, component_code
from .results import MANIFEST_NAME, ResultsConflict, note, warn, write_atomic

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
    config = config.resolved() if hasattr(config, "resolved") else config
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
            # the checkpoint's own list of hashes is derived from its other files: not counted again
            if name.startswith(".") or name == MANIFEST_FILE or len(files) >= MAX_CHECKPOINT_FILES:
                continue
            path = Path(folder) / name
            try:
                stat = path.stat()
            except OSError:
                continue
            files[path.relative_to(root).as_posix()] = file_identity(path, stat)
    return {"files": files}


def policy_fingerprint(spec: Any) -> tuple[dict[str, Any], str]:
    """The policy's resolved parameters, and the digest of its strategies' code (`component_code`)."""
    config = resolve_policy_config(spec)
    out: dict[str, Any] = {"label": config.label, "reuse_order": config.reuse_order, "cameras": config.cameras}
    guard = GuardConfig.from_spec(config.guard)
    if guard.enabled:  # (absent when off, so results made before the guard existed keep their fingerprints)
        out["guard"] = plain(guard.__dict__)
    code: list[str] = []
    for kind in ("selector", "relevance", "scheduler", "gate", "pruner"):
        cls, out[kind] = component(STRATEGIES[kind], getattr(config, kind), kind)
        code.append(component_code(cls))
        folder = getattr(cls, "checkpoint_folder", None)
        if folder is not None:  # trained parameters (the learned selector): the same name with new weights is a change
            out[kind]["checkpoint_identity"] = checkpoint_identity(folder(out[kind]["checkpoint"]))
    return out, hashlib.sha256("\n".join(code).encode()).hexdigest()


def experiment_fingerprints(config: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """policy label -> fingerprint of everything that decides that policy's episodes. Resolves every config
    (a bad one fails here, before anything is written) but builds nothing."""
    backbone_cls, backbone = component(BACKBONES, config.backbone, "backbone")
    backbone["device"] = device_kind(backbone.get("device", "auto"))
    env_cls, env = component(ENVS, config.env, "env")
    data_identity = getattr(env_cls, "data_identity", None)
    if data_identity is not None:
        env["data"] = data_identity(resolve_component(ENVS, config.env, "env")[1])
    env_code = [component_code(env_cls)]
    perturbation = None
    if config.perturbation:
        perturbation_cls, perturbation = component(PERTURBATIONS, config.perturbation, "perturbation")
        env_code.append(component_code(perturbation_cls))
    common = {
        "backbone": backbone,
        "checkpoint": checkpoint_identity(resolve_checkpoint(backbone["checkpoint"])) if backbone.get("checkpoint") else None,
        "env": env,
        "perturbation": perturbation,
        "max_steps": config.max_steps,
        "execute_chunk": config.execute_chunk,
        "episodes": config.episodes,
        "fast_path": dataclasses.asdict(config.fast_path),
        "batch_envs": config.batch_envs,
    }
    code = {"backbone": component_code(backbone_cls), "env": hashlib.sha256("\n".join(env_code).encode()).hexdigest()}
    fingerprints: dict[str, dict[str, Any]] = {}
    for spec in config.policies:
        policy, strategies_code = policy_fingerprint(spec)
        if policy["label"] in fingerprints:
            labels = [policy_fingerprint(s)[0]["label"] for s in config.policies]
            raise ConfigError(f"policy labels must be unique, got {labels}; set `label:` in the policy configs")
        fingerprints[policy["label"]] = {"policy": policy, **common, "code": {**code, "strategies": strategies_code}}
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


def _legacy_code(entry: dict) -> str | None:
    """The whole-source hash of a fingerprint written before the code was split (None: a current one)."""
    code = entry.get("fingerprint", {}).get("code", {})
    return code.get("source_sha256") if isinstance(code, dict) and "source_sha256" in code else None


def _compare(label: str, entry: dict, fingerprint: dict, build: dict) -> tuple[str | None, bool]:
    """Why `label`'s recorded results cannot be resumed under `fingerprint` (None: they can), and whether only
    the code of its components changed (what `--verify-code-change` can settle)."""
    recorded = entry.get("fingerprint", {})
    legacy = _legacy_code(entry)
    if legacy is not None:  # compare all but the code; the code only as a whole, as it was recorded
        recorded = {k: v for k, v in recorded.items() if k != "code"}
        fingerprint = {k: v for k, v in fingerprint.items() if k != "code"}
    changes = changed_keys(recorded, fingerprint)
    if changes:
        code_only = all(key.startswith("code.") for key, _, _ in changes)
        return f"policy '{label}' changed {describe_changes(changes)}", code_only
    if legacy is not None and legacy != build["source_sha256"]:
        return (f"policy '{label}' has results recorded under other vlacache code, fingerprinted as a whole (before "
                f"the code of strategies, backbone and env was told apart), so whether what decides its outcomes "
                f"changed is unknown"), True
    return None, False


def _builds(entry: dict | None) -> list[dict]:
    builds = list((entry or {}).get("builds") or [])
    legacy = _legacy_code(entry or {})
    if not builds and legacy is not None:
        builds = [{"vlacache": entry["fingerprint"]["code"].get("vlacache"), "source_sha256": legacy, "commit": None}]
    return builds


def check_fingerprints(out: Path, fingerprints: dict[str, dict], recorded: set[str], write: bool,
                       verify: Callable[[str], dict] | None = None) -> None:
    """Refuse when a policy that already has results in `out` had them made under a different fingerprint (or
    under none: results older than fingerprints); with `write`, record the fingerprints of this run's policies.
    A policy new to the directory, or one with no results yet, is (re)recorded freely. Code outside what the
    fingerprint counts (`code_identity`) may differ: the run resumes with a warning, and each policy's entry
    lists every build (version, source hash, git commit) its results were made under (`builds`). `verify`
    (`--verify-code-change`, `verify.reproduce`): for a policy whose only change is the code of its components,
    re-run one recorded episode; if it comes out the same, resume, and keep that evidence with the build."""
    manifest = load_manifest(out)
    build = code_build()
    problems, rebuilt, verified = [], [], {}
    for label, fingerprint in fingerprints.items():
        if label not in recorded:
            continue
        entry = manifest["policies"].get(label)
        if entry is None:
            problems.append(f"policy '{label}' has results but no fingerprint in {MANIFEST_NAME}")
            continue
        problem, code_only = _compare(label, entry, json.loads(json.dumps(fingerprint)), build)
        if problem is not None and code_only and verify is not None:
            evidence = verify(label)
            if not evidence["differ"] and evidence["error"] is None:
                verified[label] = evidence
                continue
            problem += (f"; its episode {evidence['episode']} run again under this code gave other "
                        f"{', '.join(evidence['differ']) or 'an error'}")
        builds = _builds(entry)
        if problem is not None:
            problems.append(problem)
        elif builds and builds[-1].get("source_sha256") != build["source_sha256"]:
            rebuilt.append((label, builds[-1]))
    if problems:
        hint = "" if verify is not None else (
            "; if only code changed (e.g. a refactor), --verify-code-change re-runs one recorded episode per policy "
            "and resumes when they come out the same")
        raise ResultsConflict(
            f"{out} holds results of a different run ({'; '.join(problems)}); to keep them, pass a new "
            f"output_dir=...; to start over here, add --restart (the old results move to {out}/restarted-<time>/)"
            + hint)
    for label, evidence in verified.items():
        note(f"policy '{label}': the code of its components changed, and its episode {evidence['episode']} run again "
             f"under this code ({evidence['torch_threads']} torch threads) reproduced its record exactly; resuming")
    if rebuilt and write:
        def commit(b: dict) -> str:
            return (b.get("commit") or "no git commit")[:12] + (" + uncommitted changes" if b.get("dirty") else "")

        warn(f"resuming {out} under other vlacache code than its results so far ({', '.join(label for label, _ in rebuilt)}: "
             f"{commit(rebuilt[0][1])} -> {commit(build)}); the code of the strategies, backbone and env in use is "
             f"unchanged, so the results continue; {MANIFEST_NAME} records both builds")
    if not write:
        return
    changed = False
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    for label, fingerprint in fingerprints.items():
        plain = json.loads(json.dumps(fingerprint))
        entry = manifest["policies"].get(label)
        keep = entry is not None and label in recorded  # its results stay: so does the history of its builds
        builds = _builds(entry) if keep else []
        if not builds or builds[-1].get("source_sha256") != build["source_sha256"] or label in verified:
            builds.append({**build, "since": now, **({"verified": verified[label]} if label in verified else {})})
        new = {"fingerprint": plain, "recorded": entry.get("recorded", now) if keep else now, "builds": builds}
        if entry != new:
            manifest["policies"][label] = new
            changed = True
    if changed or not (out / MANIFEST_NAME).exists():
        write_atomic(out / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())
