"""Where the plug-in rooms are. The repo keeps `strategies/ backbones/ envs/ configs/` beside the `vlacache/`
package (the design card); they install as `vlacache.<room>` (setup.py finds every package under them). When
`vlacache` is imported from a checkout's own folder (a script or `python -c` run at the repo root, without that
checkout installed), the rooms beside it are bound as `vlacache.<room>`, so the package and its rooms always come
from the same tree, never the rooms of another installed copy."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOMS = ("strategies", "backbones", "envs", "configs")


def bind_checkout_rooms() -> None:
    """For each room not inside the package folder but beside it (a checkout), import it as vlacache.<room>."""
    package = Path(__file__).resolve().parent
    for room in ROOMS:
        name = f"vlacache.{room}"
        beside = package.parent / room / "__init__.py"
        if name in sys.modules or (package / room).is_dir() or not beside.is_file():
            continue
        spec = importlib.util.spec_from_file_location(name, beside, submodule_search_locations=[str(beside.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        setattr(sys.modules["vlacache"], room, module)
