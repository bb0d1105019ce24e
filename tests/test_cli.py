"""The `vlacache` console script, run for real in subprocesses (issue 3, item 6)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


# the console script installed with this interpreter (a venv's), not whichever is first on PATH
SCRIPT = Path(sys.executable).parent / "vlacache"
SCRIPT = str(SCRIPT) if SCRIPT.exists() else shutil.which("vlacache")


def vlacache(*args, cwd=None, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def test_list_shows_every_registry():
    out = vlacache("list")
    assert out.returncode == 0, out.stderr
    for name in ("openvla", "openvla-oft", "cogact", "libero", "simpler", "dynamic-background", "moving-distractor",
                 "pixel-cosine", "attention", "entropy-adaptive", "entropy-minmax", "constant",
                 "always", "full-first-step", "replay"):
        assert name in out.stdout
    assert "strategies (selector)" in out.stdout and "strategies (gate)" in out.stdout
    filtered = vlacache("list", "entropy*").stdout
    assert "entropy-adaptive" in filtered and "pixel-cosine" not in filtered


def test_run_default_prints_summary_and_writes_results(tmp_path):
    out = vlacache("run", "--quiet", f"output_dir={tmp_path}/out", "max_steps=4", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for label in ("no-cache", "static-reuse", "vla-cache", "prefill ms", "reuse", "query Hz"):
        assert label in out.stdout
    records = [json.loads(x) for x in (tmp_path / "out" / "episodes.jsonl").read_text().splitlines()]
    assert [r["policy"] for r in records] == ["no-cache", "static-reuse", "static+filter", "vla-cache"]
    assert all(r["queries"] == 4 and r["error"] is None for r in records)
    assert records[1]["reuse_ratio"] > 0 and records[0]["reuse_ratio"] == 0
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert summary.startswith("| policy") and "| static+filter |" in summary
    assert (tmp_path / "out" / "summary.png").exists() and (tmp_path / "out" / "summary.csv").exists()


def test_bench_writes_the_promised_json(tmp_path):
    out = vlacache("bench", "tiny", "--out", str(tmp_path / "b.json"), "--quiet", "policy=static_reuse")
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["zero_reuse_max_abs_diff"] == 0.0
    assert report["identical_frame_max_abs_diff"] < 1e-5
    assert report["flops_cached"] < report["flops_baseline"]
    step = report["steps"][1]
    for key in ("tokens_per_layer", "reuse_ratio", "flops_baseline", "flops_cached", "latency_baseline_ms", "latency_cached_ms"):
        assert key in step
    assert set(step["latency_cached_ms"]) == {"prepare", "vision", "select", "prefill", "decode", "total"}
    assert step["reuse_ratio"] > 0 and min(step["tokens_per_layer"]) < max(report["steps"][0]["tokens_per_layer"])
    assert report["machine"]["torch"]


@pytest.mark.parametrize("args,message", [
    (("run", "--quiet", "policies=[vla_cahce]"), "no shipped policy config named 'vla_cahce'"),
    (("run", "--quiet", "backbone.presett=tiny"), "unknown key 'presett'"),
    (("run", "missing.yaml"), "config file not found"),
    (("bench", "tiny", "--out", "x.json", "policy.selector.name=pixel"), "unknown selector strategy 'pixel'"),
])
def test_bad_configs_exit_2_with_a_message(tmp_path, args, message):
    out = vlacache(*args, cwd=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
