"""Which code a run's results were made with, in two parts.

- `component_code(cls)`: what decides an outcome. The module that defines a component (a strategy, the backbone,
  the env or perturbation) and every module of the same plug-in room (`vlacache.strategies`,
  `vlacache.backbones`, `vlacache.envs`) it imports, transitively (so OpenVLA-OFT counts the shared
  `backbones/common/` files it builds on). Each module counts by its syntax tree without docstrings, so a
  comment, docstring or formatting edit changes nothing. A room's package `__init__` (which only imports every
  family to register it) does not count. Part of the fingerprint: resuming under a change here is refused.
- `code_build()`: everything else, for the record: the version, a hash of all Python sources of the package and
  its rooms, and the git commit of the checkout (None for an installed wheel). A change here (the engine, the
  runner, the CLI, another family) resumes with a warning, and `run.json` keeps every build a row's results
  were made under.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import subprocess
from pathlib import Path
from typing import Any, Iterable

ROOMS = ("vlacache.strategies", "vlacache.backbones", "vlacache.envs")


def room_of(module: str) -> str | None:
    """The plug-in room a module belongs to (None: core code, or not vlacache's)."""
    return next((room for room in ROOMS if module == room or module.startswith(room + ".")), None)


def _origin(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    return Path(spec.origin) if spec is not None and spec.origin not in (None, "built-in", "frozen") else None


def _imported(module: str, path: Path) -> Iterable[str]:
    """Every module name `module`'s source imports (absolute or relative; `from x import y` also tries x.y)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level else node.module
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names if alias.name != "*")


def _submodule_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def room_closure(module: str, root: str | None = None) -> list[str]:
    """`module` and every module of its room (or of `root`, a package prefix) it imports, transitively, sorted;
    the room's own package `__init__` excluded."""
    room = root or room_of(module)
    if room is None:
        raise ValueError(f"{module} is not in a plug-in room {ROOMS}")
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or (name == room and name != module):
            continue
        path = _origin(name)
        if path is None or path.suffix != ".py":
            continue
        seen.add(name)
        for other in _imported(name, path):
            if other.startswith(room + ".") and other not in seen and _submodule_exists(other):
                todo.append(other)
    return sorted(seen)


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def module_digest(modules: Iterable[str]) -> str:
    """sha256 over the modules' names and syntax trees (comments, docstrings and formatting do not count)."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        tree = _without_docstrings(ast.parse(_origin(name).read_bytes()))
        digest.update(f"{name}\n".encode())
        digest.update(ast.dump(tree, include_attributes=False).encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def component_code(cls: type) -> str:
    """The outcome-deciding code of a registered component: its room closure's digest. A class defined outside
    the plug-in rooms (a user's own strategy module) counts by its own module's closure within its top package."""
    module = cls.__module__
    root = room_of(module) or module.split(".")[0]
    if module == "__main__" or _origin(module) is None:
        return "unhashable:" + module  # defined in a notebook or a script: nothing on disk to hash
    return module_digest(room_closure(module, root))


def _git(cwd: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_build() -> dict[str, Any]:
    """The build this process runs: vlacache's version, a sha256 of the Python sources of the package and its
    plug-in rooms, and the git commit of the checkout they come from (`dirty`: uncommitted changes to them)."""
    import vlacache
    from vlacache import backbones, envs, strategies

    digest = hashlib.sha256()
    roots = []
    for package in (vlacache, strategies, backbones, envs):
        root = Path(package.__path__[0])
        roots.append(root)
        for path in sorted(root.rglob("*.py")):
            if package is vlacache and path.relative_to(root).parts[0] in ("strategies", "backbones", "envs"):
                continue  # an installed wheel nests the plug-in rooms: hash each once
            digest.update(f"{package.__name__}/{path.relative_to(root).as_posix()}\n".encode())
            digest.update(path.read_bytes())
    tracked = _git(roots[0], "ls-files", "--error-unmatch", "__init__.py") is not None  # not a wheel in a repo's venv
    commit = _git(roots[0], "rev-parse", "HEAD") if tracked else None
    dirty = None
    if commit is not None:
        status = _git(roots[0], "status", "--porcelain", "--", *map(str, roots))
        dirty = bool(status) if status is not None else None
    return {"vlacache": vlacache.__version__, "source_sha256": digest.hexdigest(), "commit": commit, "dirty": dirty}
