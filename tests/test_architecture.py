"""The import graph keeps the rooms along the data path: plug-ins depend on the core's types, never on the layers
that compose them; the engine knows no plug-in; a backbone family builds on `backbones/common/` and never on
another family's folder. Read from the sources' syntax trees, so a new module or family is checked too."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOMS = ("strategies", "backbones", "envs")
UPPER_LAYERS = ("runtime", "experiment", "eval", "train", "integrations", "cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts if parts[0] == "vlacache" else ["vlacache", *parts])


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, absolute, relative ones resolved (`from . import x` counts as `pkg.x`)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = node.module if node.level == 0 else ".".join(filter(None, [base, node.module]))
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def graph(*folders: str) -> dict[str, set[str]]:
    return {module_name(p): {m for m in imports_of(p) if m.startswith("vlacache")}
            for folder in folders for p in sorted((REPO / folder).rglob("*.py"))}


def test_the_reader_resolves_relative_and_absolute_imports():
    edges = graph("backbones/openvla")
    assert "vlacache.backbones.openvla.action_tokens" in edges["vlacache.backbones.openvla.backbone"]  # from .x
    assert "vlacache.backbones.common.prismatic" in edges["vlacache.backbones.openvla.backbone"]  # absolute
    assert "vlacache.backbones.openvla.backbone" in edges["vlacache.backbones.openvla"]  # from .backbone in __init__


def test_no_backbone_family_imports_another_familys_folder():
    families = sorted(p.name for p in (REPO / "backbones").iterdir() if (p / "__init__.py").is_file())
    assert {"common", "openvla", "openvla_oft", "cogact"} <= set(families)
    crossing = []
    for family in families:
        allowed = {f"vlacache.backbones.{family}", "vlacache.backbones.common"}
        for module, targets in graph(f"backbones/{family}").items():
            for target in targets:
                if target.startswith("vlacache.backbones.") and not target.startswith(tuple(allowed)):
                    crossing.append(f"{module} -> {target}")
    assert not crossing, crossing


def test_the_shared_library_imports_no_family():
    targets = set().union(*graph("backbones/common").values())
    assert not [t for t in targets if t.startswith("vlacache.backbones.") and not t.startswith("vlacache.backbones.common")]


def test_plug_ins_depend_on_core_types_not_on_the_layers_that_compose_them_nor_on_other_rooms():
    wrong = []
    for room in ROOMS:
        others = tuple(f"vlacache.{r}" for r in ROOMS if r != room)
        upper = tuple(f"vlacache.{layer}" for layer in UPPER_LAYERS)
        for module, targets in graph(room).items():
            wrong += [f"{module} -> {t}" for t in targets if t.startswith(others) or t.startswith(upper)]
    assert not wrong, wrong


def test_the_engine_knows_no_plug_in():
    rooms = tuple(f"vlacache.{room}" for room in ROOMS)
    wrong = [f"{m} -> {t}" for m, targets in graph("vlacache/engine").items() for t in targets if t.startswith(rooms)]
    assert not wrong, wrong
