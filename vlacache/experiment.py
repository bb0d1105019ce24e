"""Experiment and benchmark configs, and building their components from registry names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from omegaconf import OmegaConf

from .backbone import Backbone
from .config import (ConfigError, apply_overrides, check_keys, load_yaml, nested_fields, resolve_component,
                     resolve_config_path, to_plain, typed)
from .engine import ReuseBuckets
from .env import Env
from .plugins import import_plugins
from .policy import CachePolicy, PolicyConfig
from .registry import BACKBONES, ENVS, PERTURBATIONS


@dataclass
class LauncherConfig:
    """Scale-out through Lightning Fabric: episodes are sharded over devices x num_nodes processes."""

    devices: int = 1
    num_nodes: int = 1
    accelerator: str = "auto"


def _positive(value: int | None, key: str, example: str, allow_zero: bool = False, nullable: bool = True) -> None:
    """A count that must be > 0 (>= 0 with allow_zero); None allowed when nullable."""
    if value is None and nullable:
        return
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        what = "a non-negative integer" if allow_zero else "a positive integer"
        null = " (or null)" if nullable else ""
        raise ConfigError(f"{key} must be {what}{null}, got {value!r}; e.g. {key}={example}")


@dataclass
class FastPathConfig:
    """How each step executes (CachedVLA's options). buckets: null, n (reuse counts rounded down to multiples of
    1/n of the visual tokens) or a list of fractions: a few fixed shapes per layer, never more reuse. compile:
    torch.compile the decoder (`vlacache.engine.compiled`); compile_mode: torch.compile's mode (null: default;
    'reduce-overhead': CUDA graphs on a GPU)."""

    buckets: Any = None
    compile: bool = False
    compile_mode: str | None = None

    def check(self) -> "FastPathConfig":
        ReuseBuckets.from_spec(self.buckets)
        if not isinstance(self.compile, bool):
            raise ConfigError(f"fast_path.compile must be true or false, got {self.compile!r}")
        if self.compile_mode is not None and not self.compile:
            raise ConfigError("fast_path.compile_mode is set but fast_path.compile is false; add fast_path.compile=true")
        return self

    def options(self) -> dict[str, Any]:
        """The keyword arguments of CachedVLA."""
        return {"buckets": self.buckets, "compile": self.compile, "compile_mode": self.compile_mode}


@dataclass
class ExperimentConfig:
    """`vlacache run`: one backbone, several cache policies, one env; every episode of the env per policy."""

    name: str = "default"
    imports: list = field(default_factory=list)  # your modules that register components (vlacache/plugins.py)
    backbone: Any = field(default_factory=lambda: {"name": "openvla", "preset": "tiny"})
    env: dict = field(default_factory=lambda: {"name": "replay"})
    perturbation: dict | None = None
    policies: list = field(default_factory=lambda: ["no_cache", "vla_cache"])
    episodes: int | None = None
    max_steps: int | None = None
    execute_chunk: int | None = None
    batch_envs: int = 1  # > 1: this many envs per process, their episodes (one task) stepped as one batch
    env_workers: bool = True  # with batch_envs > 1: each env in its own worker process, all stepped at once
    videos: bool = False
    output_dir: str = "runs/${name}"
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    fast_path: FastPathConfig = field(default_factory=FastPathConfig)
    retry_errors: bool = True  # on resume, run again the episodes whose last attempt raised an error
    max_retries: int = 2  # ... at most this many times (the record's `attempts` counts them)
    threads: int | None = None  # torch threads per process; null: the cores shared among the processes (threads.py)

    def check(self) -> "ExperimentConfig":
        """Values that type-check but cannot run; raises ConfigError naming the key and a valid value."""
        _positive(self.max_steps, "max_steps", "50 (null: the env's own limit)")
        _positive(self.episodes, "episodes", "10 (null: every episode the env lists)")
        _positive(self.execute_chunk, "execute_chunk", "1 (null: the whole predicted chunk)")
        _positive(self.batch_envs, "batch_envs", "8 (1: one episode at a time)", nullable=False)
        _positive(self.max_retries, "max_retries", "2", allow_zero=True, nullable=False)
        _positive(self.launcher.devices, "launcher.devices", "1", nullable=False)
        _positive(self.launcher.num_nodes, "launcher.num_nodes", "1", nullable=False)
        _positive(self.threads, "threads", "1 (null: the cores shared among the processes)")
        if not self.policies:
            raise ConfigError("policies is empty; list at least one, e.g. policies=[no_cache,vla_cache]")
        if not str(self.output_dir).strip():
            raise ConfigError("output_dir is empty; e.g. output_dir=runs/my_experiment")
        self.fast_path.check()
        self.backbone = resolve_backbone_spec(self.backbone)
        return self


@dataclass
class BenchConfig:
    """`vlacache bench`: baseline vs cache policies over recorded episodes, with correctness self-checks.
    `policy`: one policy spec or a list of them (a report row each); `episodes`: how many of the env's episodes
    (null: all), `max_steps` frames of each."""

    name: str = "bench"
    imports: list = field(default_factory=list)  # your modules that register components (vlacache/plugins.py)
    backbone: Any = field(default_factory=lambda: {"name": "openvla", "preset": "tiny"})
    env: dict = field(default_factory=lambda: {"name": "replay"})
    policy: Any = "vla_cache"
    episodes: int | None = 1
    max_steps: int | None = None
    warmup: int = 1
    repeats: int = 3
    batch: int = 1  # > 1: also actions per second of this many episodes stepped together vs one at a time
    fast_path: FastPathConfig = field(default_factory=FastPathConfig)
    threads: int | None = None  # torch threads; null: torch's default
    self_checks: bool = True  # false: skip the exactness self-checks (7 extra queries; for the real-size benches)

    def check(self) -> "BenchConfig":
        self.fast_path.check()
        _positive(self.threads, "threads", "1 (null: torch's default)")
        _positive(self.batch, "batch", "8", nullable=False)
        _positive(self.max_steps, "max_steps", "8 (null: the whole recording)")
        _positive(self.episodes, "episodes", "4 (null: every episode the env lists)")
        _positive(self.warmup, "warmup", "1", allow_zero=True, nullable=False)
        if self.fast_path.compile and self.warmup < 1:
            raise ConfigError("fast_path.compile=true needs warmup >= 1 (the first pass compiles); e.g. warmup=1")
        _positive(self.repeats, "repeats", "3", nullable=False)
        self.backbone = resolve_backbone_spec(self.backbone)
        return self


def load_config(schema: type, source: str | Path | Mapping[str, Any] | None, group: str, overrides: list[str] | None = None):
    """Read YAML (a path or a shipped name in configs/<group>/; or a mapping), apply key=value overrides, type-check."""
    base = OmegaConf.structured(schema)
    if source is not None:
        raw = OmegaConf.create(dict(source)) if isinstance(source, Mapping) else load_yaml(resolve_config_path(source, group))
        check_keys(raw, list(schema.__dataclass_fields__), str(source))
        nested = nested_fields(schema)
        for key in raw:  # a YAML component (backbone, env, ...) replaces the default one; nested settings merge
            OmegaConf.update(base, key, raw[key], merge=key in nested)
    if "imports" in schema.__dataclass_fields__:  # the user's modules register their components before any lookup
        import_plugins(to_plain(apply_overrides(base.copy(), overrides or []).get("imports")) or [])
    base = apply_overrides(base, overrides or [], expand=expand_name)
    config = typed(schema, OmegaConf.to_container(base, resolve=True), f"the {group} config")
    return config.check() if hasattr(config, "check") else config


def expand_name(key: str, name: str) -> dict[str, Any]:
    """The mapping a plain name in a config stands for, so an override can set one of its keys: a shipped
    backbone config (or a registered backbone), a shipped policy config, else a registered component's name."""
    if key == "backbone":
        spec = resolve_backbone_spec(name)
        return dict(spec) if isinstance(spec, Mapping) else {"name": spec}
    if key.split(".")[-1] == "policy" or key.startswith("policies."):
        return to_plain(load_yaml(resolve_config_path(name, "policy")))
    return {"name": name}


def resolve_backbone_spec(spec: Mapping[str, Any] | str) -> Mapping[str, Any] | str:
    """A backbone spec as given, or, for the name of a shipped backbone config (configs/backbone/<name>.yaml,
    e.g. micro_oft_libero_spatial) rather than a registered backbone, that config's mapping."""
    if isinstance(spec, str) and spec not in BACKBONES.names():
        try:
            return to_plain(load_yaml(resolve_config_path(spec, "backbone")))
        except ConfigError as error:
            raise ConfigError(f"backbone '{spec}' is neither a registered backbone ({', '.join(BACKBONES.names())}) "
                              f"nor a shipped backbone config: {error}") from None
    return spec


def build_backbone(spec: Mapping[str, Any] | str) -> Backbone:
    cls, config = resolve_component(BACKBONES, resolve_backbone_spec(spec), "backbone")
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


def resolve_policy_config(spec: Any) -> PolicyConfig:
    """A policy spec (shipped name, YAML path, mapping or PolicyConfig) as its PolicyConfig, nothing built."""
    if isinstance(spec, PolicyConfig):
        return spec
    if isinstance(spec, (str, Path)):
        spec = load_yaml(resolve_config_path(spec, "policy"))
    spec = dict(to_plain(spec))
    check_keys(spec, list(PolicyConfig.__dataclass_fields__), "the policy config")
    return PolicyConfig(**spec)


def build_policy(spec: Any) -> CachePolicy:
    return CachePolicy.from_config(resolve_policy_config(spec))
