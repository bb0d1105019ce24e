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
    for name in ("openvla", "pixel-cosine", "attention", "entropy-adaptive", "entropy-minmax", "constant",
                 "always", "full-first-step", "replay"):
        assert name in out.stdout
    assert "strategies (selector)" in out.stdout and "strategies (gate)" in out.stdout
    filtered = vlacache("list", "entropy*").stdout
    assert "entropy-adaptive" in filtered and "pixel-cosine" not in filtered


def test_run_default_prints_summary_and_writes_results(tmp_path):
    out = vlacache("run", "--quiet", f"output_dir={tmp_path}/out", "max_steps=4", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for label in ("no-cache", "static-reuse", "static+filter", "vla-cache", "prefill ms", "reuse"):
        assert label in out.stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [row["policy"] for row in results["summary"]] == ["no-cache", "static-reuse", "static+filter", "vla-cache"]
    assert all(row["steps"] == 4 for row in results["summary"])
    assert results["summary"][1]["reuse_ratio"] > 0
    assert (tmp_path / "out" / "summary.md").read_text().startswith("| policy")


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
    assert set(step["latency_cached_ms"]) == {"vision", "select", "prefill", "decode", "total"}
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
