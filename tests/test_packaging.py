"""The package as a user installs it: a wheel built from the repo holds every plug-in room, config, asset and
shipped policy, and runs from a fresh venv; a checkout run from its own root uses its own rooms."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOMS = ("strategies", "backbones", "envs", "configs")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The repo's files as a fresh clone has them (tracked, plus new files not ignored), in a temporary folder."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    root = tmp_path_factory.mktemp("clone")
    for name in filter(None, listed):
        path = REPO / name
        if path.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(path.read_bytes())
    return root


def expected_files(source: Path) -> set[str]:
    """What the wheel must hold: every module and package of the package and its rooms (as vlacache.<room>),
    every shipped config, asset and policy file."""
    out = {p.relative_to(source).as_posix() for p in (source / "vlacache").rglob("*.py")}
    out |= {p.relative_to(source).as_posix() for p in (source / "vlacache" / "data").rglob("*") if p.is_file()}
    for room in ROOMS:
        for path in (source / room).rglob("*"):
            if path.is_file() and (path.suffix in (".py", ".yaml") or "assets" in path.parts):
                out.add(f"vlacache/{path.relative_to(source).as_posix()}")
    return out


def test_the_wheel_holds_every_room_and_runs_from_a_fresh_venv(source, tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(source)], check=True, capture_output=True, timeout=300)
    wheel = next(dist.glob("vlacache-*.whl"))
    inside = set(zipfile.ZipFile(wheel).namelist())
    missing = expected_files(source) - inside
    assert not missing, f"the wheel leaves out {sorted(missing)[:10]}"
    assert "vlacache/backbones/openvla_oft/backbone.py" in inside and "vlacache/configs/experiment/default.yaml" in inside

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    where = subprocess.run(
        [str(python), "-c", "import json, vlacache, vlacache.backbones.openvla_oft as oft, vlacache.configs as c, "
                            "vlacache.envs as e, vlacache.strategies as s; "
                            "print(json.dumps([m.__file__ for m in (vlacache, oft, c, e, s)]))"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr
    site = str(venv)
    assert all(f.startswith(site) for f in json.loads(where.stdout)), where.stdout  # not the editable checkout
    listed = subprocess.run([str(venv / "bin" / "vlacache"), "list"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert "openvla-oft" in listed.stdout and "micro_oft_libero_spatial" in listed.stdout


def test_a_checkout_run_from_its_root_uses_its_own_rooms(source):
    """`python -c` at a checkout's root imports vlacache from that folder; its rooms must come from there too,
    not from another installed copy (this test runs next to the editable install of the repo itself)."""
    where = subprocess.run(
        [sys.executable, "-c", "import json, vlacache, vlacache.backbones.openvla as o, vlacache.configs as c; "
                               "from vlacache.config import packaged_configs; "
                               "print(json.dumps([vlacache.__file__, vlacache.strategies.__file__, o.__file__, "
                               "c.__file__, str(packaged_configs())]))"],
        cwd=source, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr
    files = json.loads(where.stdout)
    assert all(f.startswith(str(source)) for f in files), files
