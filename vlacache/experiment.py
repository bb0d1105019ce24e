"""Experiment and benchmark configs, and building their components from registry names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from .backbone import Backbone
from .config import apply_overrides, check_keys, load_yaml, resolve_component, resolve_config_path, to_plain, typed
from .env import Env
from .policy import CachePolicy
from .registry import BACKBONES, ENVS, PERTURBATIONS


@dataclass
class LauncherConfig:
    """Scale-out through Lightning Fabric: episodes are sharded over devices x num_nodes processes."""

    devices: int = 1
    num_nodes: int = 1
    accelerator: str = "auto"


@dataclass
class ExperimentConfig:
    """`vlacache run`: one backbone, several cache policies, one env; every episode of the env per policy."""

    name: str = "default"
    backbone: dict = field(default_factory=lambda: {"name": "openvla", "preset": "tiny"})
    env: dict = field(default_factory=lambda: {"name": "replay"})
    perturbation: dict | None = None
    policies: list = field(default_factory=lambda: ["no_cache", "vla_cache"])
    episodes: int | None = None
    max_steps: int | None = None
    execute_chunk: int | None = None
    videos: bool = False
    output_dir: str = "runs/${name}"
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


@dataclass
class BenchConfig:
    """`vlacache bench`: baseline vs one cache policy over a frame sequence, with correctness self-checks."""

    name: str = "bench"
    backbone: dict = field(default_factory=lambda: {"name": "openvla", "preset": "tiny"})
    env: dict = field(default_factory=lambda: {"name": "replay"})
    policy: Any = "vla_cache"
    max_steps: int | None = None
    warmup: int = 1
    repeats: int = 3


def load_config(schema: type, source: str | Path | None, group: str, overrides: list[str] | None = None):
    """Read YAML (a path or a shipped name in configs/<group>/), apply key=value overrides, type-check."""
    base = OmegaConf.structured(schema)
    if source is not None:
        raw = load_yaml(resolve_config_path(source, group))
        check_keys(raw, list(schema.__dataclass_fields__), str(source))
        for key in raw:  # a YAML component (backbone, env, ...) replaces the default one, never merges into it
            OmegaConf.update(base, key, raw[key], merge=False)
    base = apply_overrides(base, overrides or [])
    return typed(schema, OmegaConf.to_container(base, resolve=True), f"the {group} config")


def build_backbone(spec: Mapping[str, Any] | str) -> Backbone:
    cls, config = resolve_component(BACKBONES, spec, "backbone")
    return cls.from_config(config)


def build_env(spec: Mapping[str, Any] | str, perturbation: Mapping[str, Any] | None = None) -> Env:
    """An env from its registry spec, wrapped in a perturbation when one is given."""
    cls, config = resolve_component(ENVS, spec, "env")
    env = cls(config)
    if perturbation:
        from vlacache.envs.perturb import PerturbedEnv

        kind, params = resolve_component(PERTURBATIONS, perturbation, "perturbation")
        env = PerturbedEnv(env, kind(params))
    return env


def build_policy(spec: Any) -> CachePolicy:
    return CachePolicy.from_config(spec if not isinstance(spec, DictConfig) else to_plain(spec))
