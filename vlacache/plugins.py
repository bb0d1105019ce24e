"""Strategies, backbones and envs from outside the package. A module that registers components
(`@register_strategy`, `@register_backbone`, `@register_env`) becomes usable by name once imported, in one of
two ways:

- `imports: [my_pkg.my_strategy]` in an experiment, bench or serve config (or `imports=[...]` on the command
  line): imported when the config is loaded, in every process of a sharded run;
- an entry point in the group `vlacache.plugins` of an installed distribution (pyproject.toml:
  `[project.entry-points."vlacache.plugins"] my_pkg = "my_pkg.my_strategy"`): imported on `import vlacache`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import traceback

from .config import ConfigError
from .messages import warn

GROUP = "vlacache.plugins"
HOW_TO_REGISTER = (f"a component defined in your own module is found once that module is imported: add "
                   f"`imports: [your_module]` to the config (or imports=[your_module] on the command line), or "
                   f"declare it as an entry point in the group '{GROUP}'")
#: entry points that failed to load: name -> the error, named again when a lookup fails
failed_entry_points: dict[str, str] = {}


def import_plugins(modules: list[str] | tuple[str, ...]) -> None:
    """Import each module of a config's `imports:`; one that cannot be imported is a ConfigError naming it."""
    if isinstance(modules, str):
        raise ConfigError(f"imports must be a list of module names, got the string {modules!r}; write imports: [{modules}]")
    for name in modules:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"imports: each entry must be a module name like my_pkg.my_strategy, got {name!r}")
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ConfigError(f"imports: cannot import '{name}' ({type(error).__name__}: {error}); install its "
                              "package (pip install -e <its folder>) or put its folder on PYTHONPATH") from None


def load_entry_points() -> None:
    """Import every module declared in the `vlacache.plugins` entry-point group. A plugin that fails to import
    does not stop vlacache: a warning names it and the error, and so does any lookup of a missing name."""
    for entry in importlib.metadata.entry_points(group=GROUP):
        try:
            entry.load()
        except Exception as error:  # a third party's bug: reported, never silent
            failed_entry_points[entry.name] = f"{type(error).__name__}: {error}"
            warn(f"the plugin '{entry.name}' ({entry.value}, entry point group {GROUP}) failed to load: "
                 f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=3)}")


def lookup_hint() -> str:
    """What an unknown-name error adds: how to register an external module, and any plugin that failed."""
    hint = f" If it is yours, {HOW_TO_REGISTER}."
    if failed_entry_points:
        hint += " Plugins that failed to load: " + "; ".join(f"{k} ({v})" for k, v in failed_entry_points.items())
    return hint
