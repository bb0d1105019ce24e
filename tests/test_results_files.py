"""Result files can never be mixed up or lost: fingerprints refuse a resume of a different run (`--restart`
moves the old results aside), torn lines are repaired and reported, one run per output dir (lock), unwritable
locations are refused before any compute."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import SCRIPT, vlacache_in_process
from test_runner import lines

import vlacache.eval.fingerprint as fingerprint
import vlacache.eval.runner as runner
from vlacache import InputError
from vlacache.eval.fingerprint import checkpoint_identity, experiment_fingerprints
from vlacache.runtime import LATENCY_PARTS
from vlacache.eval.lock import acquire_lock
from vlacache.eval.results import ResultsConflict, ResultStore, load_records, repair_jsonl
from vlacache.experiment import ExperimentConfig

QUICK = ["policies=[no_cache]", "max_steps=2", "--quiet"]


def quick_config(out, **overrides):
    values = dict(name="quick", env={"name": "test-flaky"}, policies=["no_cache"], output_dir=str(out))
    return ExperimentConfig(**{**values, **overrides})


def one_error_line(stderr):
    errors = [x for x in stderr.splitlines() if x.startswith("vlacache: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


# -- fingerprints ---------------------------------------------------------------------------------------------

def test_fingerprint_counts_what_decides_outcomes_and_nothing_else(tmp_path):
    base = quick_config(tmp_path, policies=["no_cache", "static_reuse"], max_steps=3)
    prints = experiment_fingerprints(base)
    assert set(prints) == {"no-cache", "static-reuse"}
    fp = prints["static-reuse"]
    assert fp["policy"]["selector"] == {"name": "pixel-cosine", "tau": 0.996, "top_k": 100, "cameras": None}
    assert fp["backbone"]["preset"] == "tiny" and fp["backbone"]["seed"] == 0 and fp["max_steps"] == 3
    assert fp["env"]["name"] == "test-flaky" and set(fp["code"]) == {"backbone", "env", "strategies"}
    assert set(fp) == {"policy", "backbone", "checkpoint", "env", "perturbation", "max_steps", "execute_chunk",
                       "episodes", "fast_path", "batch_envs", "code"}
    # not outcome-deciding: name, output_dir, videos, launcher, retries, the device index of a rank
    same = quick_config(tmp_path / "elsewhere", name="other", policies=["no_cache", "static_reuse"], max_steps=3,
                        videos=True, retry_errors=False, max_retries=5,
                        backbone={"name": "openvla", "preset": "tiny", "device": "cpu"})
    same.launcher.devices = 4
    assert experiment_fingerprints(same) == prints
    # the same label with new parameters is a change
    tweaked = {"label": "static-reuse", "selector": {"name": "pixel-cosine", "tau": 0.99, "top_k": 100},
               "scheduler": {"name": "constant", "fraction": 1.0}}
    assert experiment_fingerprints(quick_config(tmp_path, policies=[tweaked], max_steps=3))["static-reuse"] != fp
    # reuse buckets change what is reused
    bucketed = quick_config(tmp_path, policies=["no_cache", "static_reuse"], max_steps=3)
    bucketed.fast_path.buckets = 4
    assert (experiment_fingerprints(bucketed)["static-reuse"]["fast_path"]
            == {"buckets": 4, "compile": False, "compile_mode": None} != fp["fast_path"])


def test_fingerprint_counts_pruners_camera_scales_and_trained_strategy_weights(tmp_path):
    def policy_print(policy):
        return experiment_fingerprints(quick_config(tmp_path, policies=[policy], max_steps=3))[policy["label"]]["policy"]

    fastv = {"label": "p", "pruner": {"name": "fastv", "layer": 1, "ratio": 0.5}}
    assert policy_print(fastv)["pruner"] == {"name": "fastv", "layer": 1, "ratio": 0.5, "query": "last"}
    assert policy_print({**fastv, "pruner": {"name": "fastv", "layer": 1, "ratio": 0.3}}) != policy_print(fastv)
    assert policy_print({**fastv, "cameras": {"wrist": 0.5}}) != policy_print(fastv)
    # the learned selector: the same name and settings with re-trained weights is a change
    import shutil

    from vlacache.strategies.learned import classifier_folder

    folder = tmp_path / "selector"
    shutil.copytree(classifier_folder("micro_oft_libero_spatial"), folder)
    learned = {"label": "l", "selector": {"name": "learned", "checkpoint": str(folder)}}
    before = policy_print(learned)
    assert set(before["selector"]["checkpoint_identity"]["files"]) == {"model.safetensors", "selector.json"}
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    assert policy_print(learned) != before


def test_checkpoint_identity_is_names_sizes_and_content(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    (ckpt / "checkpoints").mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "checkpoints" / "step-1.pt").write_bytes(b"x" * 10)
    identity = checkpoint_identity(ckpt)
    assert set(identity["files"]) == {"config.json", "checkpoints/step-1.pt"}
    assert identity["files"]["checkpoints/step-1.pt"][0] == 10
    os.utime(ckpt / "config.json", ns=(1, 1))  # a fresh clone of the same files: the same checkpoint
    assert checkpoint_identity(ckpt) == identity
    (ckpt / "checkpoints" / "step-1.pt").write_bytes(b"y" * 10)  # re-trained, same size
    assert checkpoint_identity(ckpt) != identity
    monkeypatch.setattr(fingerprint, "HASHED_FILE_BYTES", 4)  # a large file: size and mtime, nothing read
    large = checkpoint_identity(ckpt)
    os.utime(ckpt / "checkpoints" / "step-1.pt", ns=(1, 1))
    assert checkpoint_identity(ckpt) != large
    assert checkpoint_identity(tmp_path / "nope") == {"missing": str(tmp_path / "nope")}


def test_resume_with_a_changed_config_is_refused_naming_what_changed(tmp_path, capsys):
    out = tmp_path / "run"
    first = vlacache_in_process(capsys, "run", "tiny_replay", *QUICK, f"output_dir={out}")
    assert first.returncode == 0, first.stderr
    before = lines(out / "episodes.jsonl")

    changed = vlacache_in_process(capsys, "run", "tiny_replay", "policies=[no_cache]", "max_steps=3", "backbone.seed=1",
                                  "--quiet", f"output_dir={out}")
    assert changed.returncode == 2
    line = one_error_line(changed.stderr)
    assert "policy 'no-cache' changed" in line and "backbone.seed (0 -> 1)" in line and "max_steps (2 -> 3)" in line
    assert "output_dir=" in line and "--restart" in line
    assert lines(out / "episodes.jsonl") == before  # nothing touched

    policy = "policies=[{label: no-cache, selector: {name: none}, scheduler: {name: constant, fraction: 0.5}}]"
    relabelled = vlacache_in_process(capsys, "run", "tiny_replay", policy, "max_steps=2", "--quiet", f"output_dir={out}")
    assert relabelled.returncode == 2 and "policy.scheduler.fraction (1.0 -> 0.5)" in one_error_line(relabelled.stderr)

    # adding a policy is allowed, and a field that decides nothing (name) is not a change
    added = vlacache_in_process(capsys, "run", "tiny_replay", "policies=[no_cache,static_reuse]", "max_steps=2",
                                "name=renamed", "--quiet", f"output_dir={out}")
    assert added.returncode == 0, added.stderr
    after = lines(out / "episodes.jsonl")
    assert after[:1] == before and [r["policy"] for r in after] == ["no-cache", "static-reuse"]

    restarted = vlacache_in_process(capsys, "run", "tiny_replay", "policies=[no_cache]", "max_steps=3", "--quiet", "--restart",
                         f"output_dir={out}")
    assert restarted.returncode == 0, restarted.stderr
    aside = [p for p in out.iterdir() if p.name.startswith("restarted-")]
    assert len(aside) == 1 and "moved the previous results" in restarted.stderr and str(aside[0]) in restarted.stderr
    assert lines(aside[0] / "episodes.jsonl") == after  # never deleted
    assert (aside[0] / "run.json").exists() and (aside[0] / "summary.md").exists()
    assert [(r["policy"], r["queries"]) for r in lines(out / "episodes.jsonl")] == [("no-cache", 3)]
    assert set(json.loads((out / "run.json").read_text())["policies"]) == {"no-cache"}


def test_results_without_a_fingerprint_are_not_resumed(tmp_path, monkeypatch):
    legacy = {"policy": "no-cache", "task": "flaky/t0", "init_state": 0, "seed": 7, "success": True, "error": None}
    (tmp_path / "episodes.jsonl").write_text(json.dumps(legacy) + "\n")
    monkeypatch.setattr(runner, "build_backbone", lambda spec: pytest.fail("built the backbone"))
    with pytest.raises(ResultsConflict, match="'no-cache' has results but no fingerprint.*--restart"):
        runner.run_experiment(quick_config(tmp_path), progress=False)


# -- torn lines -----------------------------------------------------------------------------------------------

def test_a_torn_last_line_is_moved_aside_and_reported_never_lost(tmp_path, capsys):
    runner.run_experiment(quick_config(tmp_path, retry_errors=False), progress=False)
    path = tmp_path / "episodes.jsonl"
    data = path.read_bytes()
    assert len(lines(path)) == 3
    cut = data.rindex(b"\n", 0, len(data) - 1) + 40
    path.write_bytes(data[:cut])  # killed while writing the last record
    capsys.readouterr()

    runner.run_experiment(quick_config(tmp_path, retry_errors=False), progress=False)
    err = capsys.readouterr().err
    torn = tmp_path / "episodes.jsonl.torn"
    assert "vlacache: warning:" in err and str(path) in err and str(torn) in err
    assert torn.read_bytes() == data[data.rindex(b"\n", 0, len(data) - 1) + 1: cut] + b"\n"
    records = lines(path)  # every line parses: the re-run record was not glued onto the torn one
    assert sorted(r["init_state"] for r in records) == [0, 1, 2]


def test_result_store_repairs_before_appending(tmp_path, capsys):
    store = ResultStore(tmp_path / "episodes.jsonl")
    record = {"policy": "p", "task": "t", "init_state": 0, "seed": 0, "error": None}
    store.append(record)
    with open(store.path, "a") as handle:
        handle.write('{"policy": "p", "task": "t", "init_st')
    assert len(load_records([store.path], quiet=True)) == 1
    fresh = ResultStore(store.path)
    fresh.append({**record, "init_state": 1})
    assert [r["init_state"] for r in lines(store.path)] == [0, 1]
    assert (tmp_path / "episodes.jsonl.torn").read_text() == '{"policy": "p", "task": "t", "init_st\n'
    assert "torn line" in capsys.readouterr().err
    assert repair_jsonl(store.path) is None  # nothing left to repair


# -- one run per directory ------------------------------------------------------------------------------------

def test_a_second_run_on_the_same_dir_is_refused_naming_the_first(tmp_path, capsys):
    out = tmp_path / "run"
    args = [SCRIPT, "run", "tiny_replay", "env.repeats=500", "policies=[no_cache]", "max_steps=2", f"output_dir={out}",
            "--quiet"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "run.lock").exists():
            time.sleep(0.1)
        second = vlacache_in_process(capsys, "run", "tiny_replay", "env.repeats=500", *QUICK, f"output_dir={out}")
        assert second.returncode == 2
        line = one_error_line(second.stderr)
        assert f"pid {first.pid} on host {socket.gethostname()}" in line and "in use by another vlacache run" in line
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert not (out / "run.lock").exists()  # released on Ctrl-C


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"pid": dead.pid, "host": socket.gethostname(), "started": "2020-01-01 00:00:00", "token": "old"}
    (tmp_path / "run.lock").write_text(json.dumps(stale))
    runner.run_experiment(quick_config(tmp_path), progress=False)
    err = capsys.readouterr().err
    assert "took over the stale lock" in err and f"pid {dead.pid}" in err
    assert len(lines(tmp_path / "episodes.jsonl")) == 3 and not (tmp_path / "run.lock").exists()


def race_for_the_lock(out, token, barrier, results):
    barrier.wait()
    try:
        lock = acquire_lock(out, token)
        results.put("owner" if lock.owner else "joined")
        time.sleep(0.5)  # hold it while the others look
    except ResultsConflict:
        results.put("refused")


def test_processes_racing_on_a_stale_lock_take_it_over_exactly_once(tmp_path):
    """4 processes released together on a stale lock, 10 times: exactly one takes it over, the rest are refused
    (the takeover was a plain overwrite: two of them could both read their own token back)."""
    import multiprocessing

    fork = multiprocessing.get_context("fork")  # the children share this process's imports: they start at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for trial in range(10):
        out = tmp_path / f"trial{trial}"
        out.mkdir()
        (out / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                  "started": "2020-01-01 00:00:00", "token": "old"}))
        barrier, results = fork.Barrier(4), fork.Queue()
        racers = [fork.Process(target=race_for_the_lock, args=(out, f"run{i}", barrier, results)) for i in range(4)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(timeout=60)
        outcomes = sorted(results.get(timeout=10) for _ in racers)
        assert outcomes == ["owner", "refused", "refused", "refused"], (trial, outcomes)


def test_a_lock_of_another_host_is_never_taken_over(tmp_path):
    other = {"pid": 1, "host": "some-other-node", "started": "2020-01-01 00:00:00", "token": "theirs"}
    (tmp_path / "run.lock").write_text(json.dumps(other))
    with pytest.raises(ResultsConflict, match="pid 1 on host some-other-node"):
        acquire_lock(tmp_path, "mine")
    joined = acquire_lock(tmp_path, "theirs")  # a rank of that same run joins it, and leaves it in place
    assert not joined.owner
    joined.release()
    assert (tmp_path / "run.lock").exists()


# -- unwritable locations -------------------------------------------------------------------------------------

def unwritable(tmp_path):
    """Locations no process can write, root included: below a regular file, and in /proc."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    return [blocker / "out", Path("/proc/vlacache-out")]


def test_an_unwritable_output_dir_is_refused_before_building_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "build_backbone", lambda spec: pytest.fail("built the backbone"))
    for out in unwritable(tmp_path):
        with pytest.raises(InputError, match=f"cannot write to output_dir {out}.*writable output_dir="):
            runner.run_experiment(quick_config(out), progress=False)
    if os.geteuid() != 0:  # permissions bind everyone but root
        locked = tmp_path / "read_only"
        locked.mkdir()
        locked.chmod(0o555)
        with pytest.raises(InputError, match="cannot write to output_dir"):
            runner.run_experiment(quick_config(locked), progress=False)


def test_cli_refuses_unwritable_outputs(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    run = vlacache_in_process(capsys, "run", "tiny_replay", *QUICK, f"output_dir={blocker}/out")
    assert run.returncode == 2 and f"cannot write to output_dir {blocker}/out" in one_error_line(run.stderr)
    bench = vlacache_in_process(capsys, "bench", "tiny", "--out", str(blocker / "b.json"), "--quiet")
    assert bench.returncode == 2 and f"cannot write the bench report {blocker}/b.json" in one_error_line(bench.stderr)
    record = vlacache_in_process(capsys, "record", "tiny_replay", "--out", str(blocker / "r.npz"), "--steps", "2", "--quiet")
    assert record.returncode == 2 and "cannot write the recording" in one_error_line(record.stderr)


# -- one table over several runs ------------------------------------------------------------------------------

def test_every_success_count_gets_a_sound_interval_and_plots(tmp_path):
    """Wilson bounds are exactly 0 / 1 at 0 / n successes (rounding once left 0.9999999999999999 at 4 of 4, and the
    summary plot refused the negative error bar it made, failing the default run)."""
    from vlacache.eval.report import wilson_interval, write_plots

    for n in range(1, 101):
        for k in range(n + 1):
            low, high = wilson_interval(k, n)
            assert 0.0 <= low <= k / n <= high <= 1.0
        assert wilson_interval(n, n)[1] == 1.0 and wilson_interval(0, n)[0] == 0.0
    rows = []
    for label, k in (("all", 4), ("none", 0), ("some", 3)):
        low, high = wilson_interval(k, 4)
        rows.append({"policy": label, "reuse_ratio": 0.1, "success/mean": k / 4, "ci95_low/s": low, "ci95_high/s": high,
                     "reused_per_layer": [0.1, 0.2], **{f"{p}_ms": 1.0 for p in LATENCY_PARTS}})
    assert write_plots(tmp_path, rows)[0].stat().st_size > 10_000


def test_the_interval_of_a_difference_of_success_rates():
    from vlacache.eval.report import difference_interval

    # Newcombe (1998), Statistics in Medicine 17:873, Table II, method 10: 56/70 - 48/80
    low, high = difference_interval(56, 70, 48, 80)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)
    low, high = difference_interval(64, 100, 64, 100)
    assert low == pytest.approx(-high) and 0.12 < high < 0.14  # equal rates: symmetric about 0
    assert difference_interval(0, 0, 1, 2) is None


def test_flops_are_shown_in_the_unit_that_reads_as_a_number():
    from vlacache.eval.report import flops_column, format_cell

    for flops, unit, shown in ((5.808e8, "MFLOPs/query", "580.8"), (4.2e12, "TFLOPs/query", "4.200"),
                               (2.35e10, "GFLOPs/query", "23.50"), (0.0, "MFLOPs/query", "0.000")):
        key, title, kind = flops_column([{"flops": flops}, {"flops": None}])
        assert (key, title, format_cell(flops, kind)) == ("flops", unit, shown)


def test_report_puts_several_runs_in_one_table(tmp_path, capsys):
    runner.run_experiment(quick_config(tmp_path / "a", policies=["no_cache", "static_reuse"]), progress=False)
    runner.run_experiment(quick_config(tmp_path / "b"), progress=False)
    shown = vlacache_in_process(capsys, "report", tmp_path / "a", tmp_path / "b")
    assert shown.returncode == 0, shown.stderr
    rows = [line.split(" | ") for line in shown.stdout.splitlines()[2:]]
    # each run's rows in its config's order, named with their directory; flaky env: init 0 succeeds, 1 errors, 2 fails
    assert [(r[0], r[1]) for r in rows] == [("| no-cache", "a"), ("| static-reuse", "a"), ("| no-cache", "b")]
    assert all(r[2].startswith("33.3% [") and r[-2:] == ["3", "1 |"] for r in rows)
    assert rows[0][3] == "0.0%" and rows[1][3] != "0.0%"  # reuse: static reuse reused, no cache did not
    header = shown.stdout.splitlines()[0].split(" | ")
    unit = header[4]  # FLOPs in a unit where the tiny model's numbers read as numbers, not 0.000xyz
    assert unit in ("MFLOPs/query", "GFLOPs/query") and all(1 <= float(r[4]) < 1000 for r in rows)
    records = lines(tmp_path / "a" / "episodes.jsonl")
    scale = 1e6 if unit.startswith("M") else 1e9
    assert float(rows[0][4]) == pytest.approx(records[0]["flops_mean"] / scale, rel=1e-3)
    written = vlacache_in_process(capsys, "report", tmp_path / "b", "--out", tmp_path / "table.md")
    assert written.returncode == 0 and (tmp_path / "table.md").read_text().splitlines()[2].startswith("| no-cache | b |")

    twice = vlacache_in_process(capsys, "report", tmp_path / "b", tmp_path / "b" / ".." / "b")
    assert len(twice.stdout.splitlines()) == 3 and "is given twice: its rows are shown once" in twice.stderr
    record = lines(tmp_path / "b" / "episodes.jsonl")[0]
    with (tmp_path / "b" / "episodes.jsonl").open("a") as f:  # a hand-edited record: "yes" is not a success value
        f.write(json.dumps({**record, "init_state": 9, "success": "yes"}) + "\n")
    odd = vlacache_in_process(capsys, "report", tmp_path / "b")
    assert "success values that are not true / false / null ('yes'): they count as failures" in odd.stderr

    (tmp_path / "empty").mkdir()
    empty = vlacache_in_process(capsys, "report", tmp_path / "a", tmp_path / "empty")
    assert empty.returncode == 2 and "empty holds no episode records" in one_error_line(empty.stderr)
    missing = vlacache_in_process(capsys, "report", tmp_path / "nowhere")
    assert missing.returncode == 2 and "no such result directory" in one_error_line(missing.stderr)


def test_a_results_file_that_stops_accepting_records_ends_the_run_in_one_line(tmp_path, capsys):
    """Mid-run (the file replaced by a folder after a first record: root ignores permission bits, not this) the
    next append fails naming the file and keeping what was written; at the start, the same file fails the run
    before any episode."""
    from vlacache.eval.results import ResultsUnwritable

    store = ResultStore(tmp_path / "out" / "episodes.jsonl", fields=("policy",))
    store.append({"policy": "a"})
    kept = tmp_path / "kept.jsonl"
    store.path.rename(kept)
    store.path.mkdir()
    with pytest.raises(ResultsUnwritable, match=r"cannot write results to .*episodes.jsonl \(Is a directory.*re-run the same"):
        store.append({"policy": "b"})
    assert kept.read_text().count("\n") == 1
    out = vlacache_in_process(capsys, "run", "tiny_replay", "max_steps=1", "policies=[no_cache]", "--quiet",
                              f"output_dir={tmp_path / 'out'}")
    assert out.returncode == 2 and "cannot read the results file" in one_error_line(out.stderr)
