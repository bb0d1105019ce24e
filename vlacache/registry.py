"""Name -> class registries for backbones, strategies and environments."""

from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Generic, Iterator, TypeVar

from .errors import VlacacheError

T = TypeVar("T")


class RegistryError(VlacacheError, KeyError):
    """An unknown or duplicate registry key; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class Registry(Generic[T]):
    """A small explicit registry: `@registry.register("name")` on a class, `registry.get("name")` to find it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries and not _same_definition(self._entries[name], obj):
                raise RegistryError(
                    f"{self.kind} '{name}' is already registered by {self._entries[name]!r}; "
                    f"pick another name for {obj!r}"
                )
            self._entries[name] = obj
            try:
                obj.registry_name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._entries:
            from .plugins import lookup_hint

            near = difflib.get_close_matches(name, self._entries, n=3)
            hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
            raise RegistryError(
                f"unknown {self.kind} '{name}'.{hint} Valid {self.kind} names: {', '.join(self.names()) or '(none)'}."
                + lookup_hint()
            )
        return self._entries[name]

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


def _same_definition(old: object, new: object) -> bool:
    """The same object, or the same class defined again (a re-run notebook cell or a reloaded module)."""
    return old is new or (
        getattr(old, "__module__", None) == getattr(new, "__module__", object())
        and getattr(old, "__qualname__", None) == getattr(new, "__qualname__", object())
    )


STRATEGY_KINDS = ("selector", "relevance", "scheduler", "gate", "pruner")
STRATEGIES: dict[str, Registry] = {kind: Registry(f"{kind} strategy") for kind in STRATEGY_KINDS}
BACKBONES: Registry = Registry("backbone")
ENVS: Registry = Registry("env")
PERTURBATIONS: Registry = Registry("perturbation")


def register_strategy(kind: str, name: str) -> Callable[[T], T]:
    """Register a strategy class under `kind` (selector / relevance / scheduler / gate / pruner) and `name`."""
    if kind not in STRATEGIES:
        raise RegistryError(f"unknown strategy kind '{kind}'. Valid kinds: {', '.join(STRATEGY_KINDS)}")
    return STRATEGIES[kind].register(name)


def register_backbone(name: str) -> Callable[[T], T]:
    """Register a backbone class (a `vlacache.backbone.Backbone` subclass)."""
    return BACKBONES.register(name)


def register_env(name: str) -> Callable[[T], T]:
    """Register an environment class (a `vlacache.env.Env` subclass)."""
    return ENVS.register(name)


def register_perturbation(name: str) -> Callable[[T], T]:
    """Register an observation perturbation (a `vlacache.envs.perturb.Perturbation` subclass)."""
    return PERTURBATIONS.register(name)
