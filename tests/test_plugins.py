"""Components from outside the package (vlacache/plugins.py): a user's module named in a config's `imports:`
or declared as a `vlacache.plugins` entry point registers its strategies before any lookup, in every process of
a run; a module that cannot be imported, or an unknown name, says how to fix it."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from test_cli import vlacache_in_process
from test_runner import lines

LAB_MODULE = '''
import torch
from dataclasses import dataclass
from vlacache import Candidates, TokenSelector, register_strategy


@register_strategy("selector", "my-lab-lower-half")
class LowerHalf(TokenSelector):
    """Every patch of the lower half of each camera is a candidate (a paper's own selector)."""

    @dataclass
    class Config:
        score: float = 1.0

    def select(self, ctx):
        out = {}
        for camera, span in ctx.layout.vision.items():
            mask = torch.zeros(ctx.batch_size, span.rows, span.cols, dtype=torch.bool)
            mask[:, span.rows // 2:] = True
            mask = mask.flatten(1)
            out[camera] = Candidates(mask=mask, score=mask.float() * self.config.score)
        return out
'''
POLICY = ("policies=[no_cache, {label: lab, selector: {name: my-lab-lower-half, score: 2.0}, relevance: {name: none}, "
          "scheduler: {name: constant, fraction: 1.0}}]")


@pytest.fixture
def lab(tmp_path):
    folder = tmp_path / "lab"
    folder.mkdir()
    (folder / "my_lab_selector.py").write_text(textwrap.dedent(LAB_MODULE))
    return folder


def cli(args, cwd, pythonpath):
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([sys.executable, "-m", "vlacache.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_a_config_imports_a_users_strategy_in_every_process_of_a_sharded_run(lab, tmp_path):
    out = tmp_path / "run"
    done = cli(["run", "tiny_replay", "imports=[my_lab_selector]", POLICY, "max_steps=3", "launcher.devices=2",
                f"output_dir={out}", "--quiet"], tmp_path, lab)
    assert done.returncode == 0, done.stderr
    # rank 1 has no episode of the one-recording replay env, yet it resolved the policy (its fingerprint) too:
    # without the import it would have failed the run
    records = [r for f in sorted(out.glob("episodes*.jsonl")) for r in lines(f) if r["policy"] == "lab"]
    assert records and all(r["error"] is None for r in records)
    for record in records:  # after the first (full) step every layer reuses exactly the lower half of the grid
        assert record["queries"] == 3
        assert record["reused_per_layer"] == [pytest.approx(2 / 3 * 0.5)] * len(record["reused_per_layer"])

def test_imports_that_cannot_work_are_refused_by_name(lab, tmp_path, capsys):
    missing = vlacache_in_process(capsys, "run", "tiny_replay", "imports=[no_such_lab_module]", f"output_dir={tmp_path / 'x'}")
    assert missing.returncode == 2
    assert "cannot import 'no_such_lab_module'" in missing.stderr and "PYTHONPATH" in missing.stderr
    string = vlacache_in_process(capsys, "run", "tiny_replay", "imports=my_lab_selector", f"output_dir={tmp_path / 'y'}")
    assert string.returncode == 2 and "full_key: imports" in string.stderr
    unknown = cli(["run", "tiny_replay", POLICY, f"output_dir={tmp_path / 'z'}"], tmp_path, lab)
    assert unknown.returncode == 2
    assert "unknown selector strategy 'my-lab-lower-half'" in unknown.stderr and "imports: [your_module]" in unknown.stderr


def test_a_serve_config_imports_too(lab, monkeypatch):
    from vlacache.integrations.service import load_serve_config
    from vlacache.registry import STRATEGIES

    monkeypatch.syspath_prepend(str(lab))
    config = load_serve_config({"imports": ["my_lab_selector"],
                                "policy": {"label": "lab", "selector": {"name": "my-lab-lower-half"}}})
    assert config.imports == ["my_lab_selector"] and "my-lab-lower-half" in STRATEGIES["selector"]
    sys.modules.pop("my_lab_selector", None)


def entry_point_distribution(folder, name, target):
    """An installed distribution as importlib.metadata finds it on sys.path: a dist-info with an entry point."""
    info = folder / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[vlacache.plugins]\n{name} = {target}\n")


def test_entry_points_register_on_import_and_a_broken_one_is_named(lab, tmp_path):
    entry_point_distribution(lab, "mylab", "my_lab_selector")
    probe = ("import json, vlacache; from vlacache.registry import STRATEGIES; "
             "print(json.dumps('my-lab-lower-half' in STRATEGIES['selector']))")
    env = {**os.environ, "PYTHONPATH": str(lab)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and json.loads(done.stdout) is True, done.stderr

    (lab / "broken_lab.py").write_text("raise RuntimeError('the lab module is broken')\n")
    entry_point_distribution(lab, "brokenlab", "broken_lab")
    done = subprocess.run([sys.executable, "-c", probe + "; STRATEGIES['selector'].get('nothing')"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert json.loads(done.stdout.splitlines()[0]) is True  # the working plugin still registered
    assert "plugin 'brokenlab' (broken_lab, entry point group vlacache.plugins) failed to load" in done.stderr
    assert "the lab module is broken" in done.stderr.splitlines()[-1]  # and the lookup error names it again
