"""The `vlacache` console script, run for real in subprocesses."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


# the console script installed with this interpreter (a venv's), not whichever is first on PATH
SCRIPT = Path(sys.executable).parent / "vlacache"
SCRIPT = str(SCRIPT) if SCRIPT.exists() else shutil.which("vlacache")


def vlacache(*args, cwd=None, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def vlacache_in_process(capsys, *args, cwd=None):
    """`vlacache.cli.main(args)` in this process, answered like `vlacache(...)`: the same code path without the
    seconds each console-script start spends importing torch. This file's subprocess tests cover the script."""
    from vlacache.cli import main

    capsys.readouterr()
    before = os.getcwd()
    os.chdir(cwd or before)
    try:
        code = main([str(a) for a in args])
    finally:
        os.chdir(before)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["vlacache", *args], code, out.out, out.err)


def test_list_shows_every_registry():
    out = vlacache("list")
    assert out.returncode == 0, out.stderr
    for name in ("openvla", "openvla-oft", "cogact", "libero", "simpler", "dynamic-background", "moving-distractor",
                 "pixel-cosine", "attention", "entropy-adaptive", "entropy-minmax", "constant",
                 "always", "full-first-step", "replay"):
        assert name in out.stdout
    assert "strategies (selector)" in out.stdout and "strategies (gate)" in out.stdout
    assert "shipped policies" in out.stdout and "micro_oft_libero_spatial" in out.stdout
    filtered = vlacache("list", "entropy*").stdout
    assert "entropy-adaptive" in filtered and "pixel-cosine" not in filtered
    assert "backbones:" not in filtered and "envs:" not in filtered  # no empty headings under a filter
    # descriptions end at a sentence, not at the docstring's line break ("... i.e." was cut there)
    gate = next(line for line in out.stdout.splitlines() if line.strip().startswith("logit-margin"))
    assert gate.rstrip().endswith("`min_margin`.")
    assert all(line.rstrip()[-1] in ".)`'\"" for line in out.stdout.splitlines() if line.startswith("  ") and
               not line.strip().startswith("micro_"))
    none = vlacache("list", "zzz*")
    assert none.returncode == 0 and none.stdout.startswith("nothing matches 'zzz*'")


def test_run_prints_summary_and_writes_results(tmp_path):
    out = vlacache("run", "tiny_replay", "--quiet", f"output_dir={tmp_path}/out", "max_steps=4", cwd=tmp_path)
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
    assert report["episodes"] == 1 and len(report["rows"]) == 1
    row = report["rows"][0]
    assert row["label"] == "static-reuse" and row["summary"]["flops_cached"] < row["summary"]["flops_baseline"]
    step = row["steps"][1]
    for key in ("tokens_per_layer", "reuse_ratio", "flops_baseline", "flops_cached", "latency_baseline_ms", "latency_cached_ms"):
        assert key in step
    assert set(step["latency_cached_ms"]) == {"prepare", "vision", "select", "prefill", "decode", "total"}
    assert step["reuse_ratio"] > 0 and min(step["tokens_per_layer"]) < max(row["steps"][0]["tokens_per_layer"])
    assert report["machine"]["torch"]
    deviation = row["summary"]["action_abs_diff"]  # |a_cached - a_nocache| per action dimension
    assert set(deviation) == {"mean", "p50", "p95", "max"} and all(len(v) == 7 for v in deviation.values())
    worst = max(s["action_max_abs_diff"] for s in row["steps"])
    assert max(deviation["max"]) == pytest.approx(worst) and min(deviation["p50"]) >= 0
    assert "static-reuse: mean reuse" in out.stdout


@pytest.mark.parametrize("args,message", [
    (("run", "tiny_replay", "--quiet", "policies=[vla_cahce]"), "no shipped policy config named 'vla_cahce'"),
    (("bench", "tiny", "--out", "x.json", "policy.selector.name=pixel"), "unknown selector strategy 'pixel'"),
])
def test_bad_inputs_exit_2_with_one_line(tmp_path, args, message):
    """The console script itself: exit status 2 and one line, no traceback (the other bad values below run the
    same `main` in-process)."""
    write_bad_recordings(tmp_path)
    out = vlacache(*args, f"output_dir={tmp_path}/out", cwd=tmp_path) if args[0] == "run" else vlacache(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    errors = [x for x in out.stderr.splitlines() if x.startswith("vlacache: error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr
    assert "Traceback" not in out.stderr


def write_bad_recordings(folder):
    import numpy as np

    (folder / "notes.txt").write_text("not a recording")
    np.savez(folder / "arrays.npz", x=np.zeros(3))
    np.save(folder / "frames.npy", np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(folder / "gray.npz", image__primary=np.zeros((2, 8, 8), np.uint8), instruction=np.asarray("go"))
    (folder / "empty").mkdir(exist_ok=True)


@pytest.mark.parametrize("args,message", [
    (("run", "tiny_replay", "--quiet", "backbone.presett=tiny"), "unknown key 'presett'"),
    (("run", "missing.yaml"), "config file not found"),
    (("run", "tiny_replay", "--quiet", "max_steps=[1"), "override 'max_steps=[1': the value does not parse as YAML"),
    (("run", "tiny_replay", "--quiet", "max_steps=0"), "max_steps must be a positive integer (or null), got 0; e.g. max_steps="),
    (("run", "tiny_replay", "--quiet", "episodes=-1"), "episodes must be a positive integer (or null), got -1"),
    (("run", "tiny_replay", "--quiet", "execute_chunk=-2"), "execute_chunk must be a positive integer (or null), got -2"),
    (("run", "tiny_replay", "--quiet", "env={name: replay, path: notes.txt}"),
     "notes.txt is not a vlacache recording: it is not an .npz (zip) archive; record one with `vlacache record"),
    (("run", "tiny_replay", "--quiet", "env={name: replay, path: arrays.npz}"),
     "arrays.npz is not a vlacache recording: it lacks 'image__<camera>' frame arrays and 'instruction' (it holds: x)"),
    (("run", "tiny_replay", "--quiet", "max_steps=-5"), "max_steps must be a positive integer"),
    (("run", "tiny_replay", "--quiet", "max_retries=-1"), "max_retries must be a non-negative integer, got -1"),
    (("run", "tiny_replay", "--quiet", "launcher.devices=0"), "launcher.devices must be a positive integer"),
    (("bench", "tiny", "--out", "x.json", "repeats=0"), "repeats must be a positive integer"),
    (("bench", "tiny", "--out", "x.json", "env.path=frames.npy"), "frames.npy is not a vlacache recording: it holds a single"),
    (("run", "tiny_replay", "--quiet", "env.path=gray.npz"),
     "'image__primary' must be uint8 frames [T>0, H, W, 3], got uint8 [2, 8, 8]"),
    (("run", "tiny_replay", "--quiet", "env.path=empty"),
     "empty holds no recording (.npz) matching '*.npz'; record demonstrations"),
    (("bench", "tiny", "--out", "."), "cannot write the bench report . (Is a directory"),
    (("record", "tiny_replay", "--out", "x.npz", "--steps", "0"), "--steps must be a positive number of env steps"),
    (("record", "tiny_replay", "--out", "x.npz", "--steps", "-1"), "--steps must be a positive number of env steps"),
    (("record", "tiny_replay", "--out", "x.npz", "--episode", "99"), "--episode 99 is out of range: the env lists 1"),
    (("record", "tiny_replay", "--out", "x.txt"), "--out x.txt: a recording is an .npz file"),
    (("demos", "libero_spatial", "workers=0"), "workers must be >= 1, got 0"),
    (("demos", "libero_spatial", "episodes_per_task=0"), "episodes_per_task must be >= 1, got 0"),
    (("demos", "libero_spatial", "env.name=replay"), "demonstrations are recorded in the LIBERO env (name: libero)"),
    (("demos", "libero_spatial", "noise.burst_prob=2"), "noise.burst_prob is a probability in [0, 1], got 2.0"),
    (("demos", "libero_spatial", "noise.sigma=0.5", "output_dir=recorded"),
     "recorded holds demos recorded with other settings (noise.sigma); record into another output_dir"),
    (("serve", "micro_oft_libero", "--max-batch-size", "2"), "the openpi server answers one client's query at a time"),
    (("serve", "micro_oft_libero", "--protocol", "vla-eval", "--max-batch-size", "0"),
     "--max-batch-size must be a positive integer, got 0"),
])
def test_more_bad_inputs_in_process(tmp_path, capsys, args, message):
    """The same one-line exit 2 for further bad values (in-process: each console-script start costs seconds)."""
    write_bad_recordings(tmp_path)
    (tmp_path / "recorded").mkdir()  # a demos folder recorded with the shipped settings
    shutil.copy(Path(__file__).parents[1] / "results" / "demos" / "libero_spatial" / "settings.json", tmp_path / "recorded")
    out = vlacache_in_process(capsys, *args, *([f"output_dir={tmp_path}/out"] if args[0] == "run" else []), cwd=tmp_path)
    assert out.returncode == 2
    err = out.stderr
    assert err.count("\n") == 1 and err.startswith("vlacache: error: ") and message in err, err


@pytest.mark.parametrize("error", ["checkpoint", "registry", "assets", "input"])
def test_every_input_error_class_is_one_line_and_exit_2(monkeypatch, capsys, error):
    """What backbones and envs raise for bad checkpoints, devices, names and assets is caught as bad input."""
    import vlacache.eval.runner as runner
    from vlacache import InputError
    from vlacache.backbones.common.checkpoint import CheckpointError
    from vlacache.cli import main
    from vlacache.envs.simpler import MissingAssetsError
    from vlacache.registry import RegistryError

    raised = {"checkpoint": CheckpointError("/ckpt/x: missing key 'a'\nin model.safetensors; fix the checkpoint"),
              "registry": RegistryError("unknown backbone 'x'; registered: openvla"),
              "assets": MissingAssetsError("bridge assets missing; fetch them"),
              "input": InputError("device cuda:3 does not exist; use backbone.device=cpu")}[error]

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(runner, "launch", fail)
    assert main(["run", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vlacache: error: ") and "Traceback" not in err
    assert str(raised).split("\n")[0] in err


def test_only_user_errors_are_one_line_a_bug_keeps_its_traceback(tmp_path, capsys):
    """Every error a user can fix derives from vlacache.VlacacheError and ends in one line and exit 2; anything
    else (here a KeyError inside an env, i.e. a bug) is not swallowed into that line."""
    from vlacache import ConfigError, InputError, VlacacheError, register_env
    from vlacache.backbones.common.checkpoint import CheckpointError
    from vlacache.cli import main
    from vlacache.env import Env
    from vlacache.envs.simpler import MissingAssetsError
    from vlacache.eval.results import ResultsConflict
    from vlacache.registry import RegistryError
    from vlacache.types import NonFiniteOutputError

    for error in (ConfigError, InputError, CheckpointError, MissingAssetsError, ResultsConflict, RegistryError,
                  NonFiniteOutputError):
        assert issubclass(error, VlacacheError), error

    @register_env("test-buggy")
    class BuggyEnv(Env):
        @dataclass
        class Config:
            pass

        def __init__(self, config=None):
            raise KeyError("an internal lookup that should not fail")

        def reset(self, episode=None):
            raise NotImplementedError

        def step(self, action):
            raise NotImplementedError

    with pytest.raises(KeyError, match="internal lookup"):
        main(["run", "tiny_replay", "env={name: test-buggy}", f"output_dir={tmp_path}", "--quiet"])
    user = vlacache_in_process(capsys, "run", "tiny_replay", "env={name: no-such-env}", f"output_dir={tmp_path / 'u'}")
    assert user.returncode == 2 and "unknown env 'no-such-env'" in user.stderr and "Traceback" not in user.stderr


def test_the_readme_replay_example_replaces_the_env_and_a_named_backbone_takes_its_later_keys(tmp_path, capsys):
    recorded = vlacache_in_process(capsys, "record", "tiny_replay", "--out", "rec.npz", "--steps", "2", cwd=tmp_path)
    assert recorded.returncode == 0, recorded.stderr
    # the LIBERO smoke config on a recording: the override names another env, so LIBERO's keys (suite, ...) go
    replayed = vlacache_in_process(capsys, "run", "tiny_libero_smoke", "env={name: replay, path: rec.npz}", "--quiet",
                                   "policies=[no_cache]", f"output_dir={tmp_path / 'replayed'}", cwd=tmp_path)
    assert replayed.returncode == 0, replayed.stderr
    records = [json.loads(x) for x in (tmp_path / "replayed" / "episodes.jsonl").read_text().splitlines()]
    assert [r["queries"] for r in records] == [2]
    # `backbone=NAME backbone.KEY=...`: both apply, in order (the name was dropped before)
    named = vlacache_in_process(capsys, "run", "tiny_replay", "backbone=micro_openvla_libero_spatial", "backbone.device=cpu",
                                "policies=[no_cache]", "max_steps=1", "--quiet", f"output_dir={tmp_path / 'named'}")
    assert named.returncode == 0, named.stderr
    run = json.loads((tmp_path / "named" / "run.json").read_text())
    backbone = run["policies"]["no-cache"]["fingerprint"]["backbone"]
    assert backbone["checkpoint"] == "micro_openvla_libero_spatial" and backbone["preset"] is None


def test_threads_are_set_per_process_printed_in_the_header_and_restored(tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    out = vlacache_in_process(capsys, "run", "tiny_replay", "threads=1", "policies=[no_cache]", "max_steps=1", "--quiet",
                              f"output_dir={tmp_path / 'one'}")
    assert out.returncode == 0, out.stderr
    assert "1 process, 1 torch thread per process (threads=1; set threads=N)" in out.stdout
    record = json.loads((tmp_path / "one" / "episodes.jsonl").read_text().splitlines()[0])
    assert record["torch_threads"] == 1 and torch.get_num_threads() == before  # a notebook keeps its own setting
    bench = vlacache_in_process(capsys, "bench", "tiny", "threads=1", "max_steps=1", "repeats=1", "--quiet",
                                "--out", str(tmp_path / "b.json"))
    assert bench.returncode == 0, bench.stderr
    assert json.loads((tmp_path / "b.json").read_text())["machine"]["threads"] == 1 and torch.get_num_threads() == before
    refused = vlacache_in_process(capsys, "run", "tiny_replay", "threads=0", f"output_dir={tmp_path / 'zero'}")
    assert refused.returncode == 2 and "threads must be a positive integer" in refused.stderr


def test_serve_refuses_a_busy_or_impossible_port_and_an_unwritable_log_before_loading(capsys):
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy = listener.getsockname()[1]
        for protocol in ("openpi", "vla-eval"):
            out = vlacache_in_process(capsys, "serve", "micro_oft_libero", "--protocol", protocol, "--port", busy)
            assert out.returncode == 2 and f"cannot serve on 127.0.0.1:{busy}" in out.stderr, out.stderr
            assert "pass another --port" in out.stderr and out.stderr.count("\n") == 1
    far = vlacache_in_process(capsys, "serve", "micro_oft_libero", "--port", "70000")
    assert far.returncode == 2 and "--port must be in 0..65535 (0: any free port), got 70000" in far.stderr
    log = vlacache_in_process(capsys, "serve", "micro_oft_libero", "--port", "0", "log=/proc/vlacache/q.jsonl")
    assert log.returncode == 2 and "cannot write the query log /proc/vlacache/q.jsonl" in log.stderr, log.stderr
