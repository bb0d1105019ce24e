"""Typed configuration: omegaconf YAML over dataclasses, with errors that list the valid keys."""

from __future__ import annotations

import dataclasses
import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from .errors import VlacacheError


class ConfigError(VlacacheError, ValueError):
    """A config that cannot be used; the message names the bad key or value and the valid ones."""


def to_plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def check_keys(given: Mapping[str, Any], valid: list[str], where: str) -> None:
    for key in given:
        if key not in valid:
            near = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(f"unknown key '{key}' in {where}{hint}. Valid keys: {', '.join(valid) or '(none)'}")


def nested_fields(schema: type) -> set[str]:
    """The fields of `schema` that are dataclasses themselves (their settings merge; components replace)."""
    return {f.name for f in dataclasses.fields(schema)
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory())}


def typed(schema: type, values: Mapping[str, Any] | None, where: str):
    """Build dataclass `schema` from `values`, failing loudly on unknown keys or wrong types."""
    values = dict(to_plain(values) or {})
    fields = [f.name for f in dataclasses.fields(schema)]
    check_keys(values, fields, where)
    try:
        merged = OmegaConf.structured(schema)
        nested = nested_fields(schema)
        for key, value in values.items():  # a given component dict replaces the default's, nested dataclasses merge
            OmegaConf.update(merged, key, value, merge=key in nested)
        return OmegaConf.to_object(merged)
    except MissingMandatoryValue as error:
        key = getattr(error, "full_key", "") or "?"
        raise ConfigError(f"{where}: '{key}' is required; set it in the YAML or on the command line ({key}=...)") from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"bad value in {where}: {error.msg if hasattr(error, 'msg') else error}") from None


def resolve_component(registry, spec: Mapping[str, Any] | str, kind: str) -> tuple[type, Any]:
    """{name: <registry key>, **params} (or just the name) -> (the registered class, its typed Config)."""
    spec = {"name": spec} if isinstance(spec, str) else dict(to_plain(spec))
    if "name" not in spec:
        raise ConfigError(f"the {kind} config needs a 'name'. Registered: {', '.join(registry.names())}")
    name = spec.pop("name")
    cls = registry.get(name)
    return cls, typed(cls.Config, spec, f"{kind} '{name}'")


def packaged_configs() -> Path:
    """The folder holding the shipped YAML configs (the repo's configs/)."""
    return Path(str(resources.files("vlacache.configs")))


def resolve_config_path(name_or_path: str | Path, group: str) -> Path:
    """A YAML path as given, or the name of a shipped config in `group` (e.g. 'vla_cache' in policy/)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            shipped = packaged_configs() / path
            if shipped.exists():
                return shipped
            raise ConfigError(f"config file not found: {path}")
        return path
    shipped = packaged_configs() / group / f"{name_or_path}.yaml"
    if not shipped.exists():
        names = sorted(p.stem for p in (packaged_configs() / group).glob("*.yaml"))
        raise ConfigError(f"no shipped {group} config named '{name_or_path}'. Available: {', '.join(names)}")
    return shipped


def load_yaml(path: Path) -> DictConfig:
    try:
        config = OmegaConf.load(path)
    except Exception as error:  # yaml errors come in many types
        raise ConfigError(f"cannot parse {path}: {error}") from None
    if not isinstance(config, DictConfig):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return config


def apply_overrides(config: DictConfig, overrides: list[str],
                    expand: Callable[[str, str], Any] | None = None) -> DictConfig:
    """Apply command-line `key.sub=value` overrides in the order given; a key that does not exist is an error.

    A component node (one with a `name`) is replaced, not merged, when an override names another component:
    `env={name: replay, path: rec.npz}`, `env.name=replay`, or a plain name (`backbone=micro_openvla_libero_spatial`).
    A later override of a key inside a node that is still a plain name first expands it with `expand(key, name)`
    (e.g. a shipped backbone config's name into its mapping), so `backbone=NAME backbone.device=cpu` keeps both."""
    for item in overrides:
        key, value = parse_override(item, config)
        try:
            apply_override(config, key, value, expand)
        except (ValueError, OmegaConfBaseException) as error:
            raise ConfigError(f"cannot apply override '{item}': {error}") from None
    return config


def parse_override(item: str, config: DictConfig) -> tuple[str, Any]:
    """(key, value) of one `key=value` override, its value parsed as YAML; unknown top-level keys are refused."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. backbone.device=cpu)")
    key, value = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override '{item}' has no key; write key=value (e.g. max_steps=4)")
    head = key.split(".")[0]
    if head not in config:
        check_keys({head: None}, list(config.keys()), "the config's top level")
    try:
        yaml.safe_load(value)
        parsed = OmegaConf.select(OmegaConf.from_dotlist([item]), key.strip())
    except (yaml.YAMLError, OmegaConfBaseException) as error:
        problem = getattr(error, "problem", None) or str(error).strip().splitlines()[-1]
        raise ConfigError(
            f"override '{item}': the value does not parse as YAML ({problem}); fix it (e.g. {key}=[1, 2] for a "
            f"list) or quote it as a string ({key}='\"{value}\"')") from None
    return key.strip(), to_plain(parsed)


def apply_override(config: DictConfig, key: str, value: Any, expand: Callable[[str, str], Any] | None) -> None:
    parts = key.split(".")
    for i in range(1, len(parts)):  # a key inside a node given as a plain name: expand the name first
        prefix = ".".join(parts[:i])
        node = OmegaConf.select(config, prefix, default=None)
        if isinstance(node, str) and expand is not None:
            OmegaConf.update(config, prefix, expand(prefix, node), merge=False)
    if len(parts) > 1 and parts[-1] == "name":
        parent = ".".join(parts[:-1])
        node = OmegaConf.select(config, parent, default=None)
        if isinstance(node, DictConfig) and node.get("name") not in (None, value):
            OmegaConf.update(config, parent, {"name": value}, merge=False)  # another component: its own defaults
            return
    node = OmegaConf.select(config, key, default=None)
    replace = isinstance(node, DictConfig) and "name" in node and (
        isinstance(value, str) or (isinstance(value, Mapping) and value.get("name", node.name) != node.name))
    OmegaConf.update(config, key, value, merge=not replace)
