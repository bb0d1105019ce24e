"""The experiment runner: JSONL per episode, resume after an interruption, errors recorded, counted and retried,
Fabric sharding, perturbations and recordings."""

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import pytest
from rich.console import Console
from test_cli import SCRIPT, vlacache

from vlacache import Observation, register_env
from vlacache.env import Env, EpisodeSpec
from vlacache.experiment import ExperimentConfig, build_env
from vlacache.eval.report import print_summary
from vlacache.eval.runner import run_experiment


@register_env("test-flaky")
class FlakyEnv(Env):
    """Three short episodes; the one with init_state 1 raises inside step()."""

    max_steps = 4

    @dataclass
    class Config:
        fail_on: int = 1

    def __init__(self, config=None):
        self.config = config or self.Config()
        self.image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)

    def episodes(self):
        return [EpisodeSpec("flaky/t0", init_state=i, seed=7) for i in range(3)]

    def reset(self, episode=None):
        self.episode, self.t = episode, 0
        return Observation({"primary": self.image}, "pick up the bowl")

    def step(self, action):
        self.t += 1
        if self.episode.init_state == self.config.fail_on and self.t == 2:
            raise RuntimeError("simulated simulator crash")
        return (Observation({"primary": self.image}, "pick up the bowl"), 0.0, self.t >= 3,
                {"success": self.episode.init_state == 0})


@register_env("test-fragile")
class FragileEnv(FlakyEnv):
    """Fails to build (`broken`) or kills its own process on the first step (a simulator segfault)."""

    @dataclass
    class Config:
        broken: bool = False

    def __init__(self, config=None):
        if config is not None and config.broken:
            raise RuntimeError("no simulator on this machine")
        super().__init__()

    def step(self, action):
        os._exit(3)


def test_env_workers_report_a_failed_build_and_a_dead_process():
    from vlacache.eval.env_workers import EnvWorkerError, WorkerEnv

    with pytest.raises(EnvWorkerError, match="(?s)raised while building the env.*no simulator on this machine"):
        WorkerEnv({"name": "test-fragile", "broken": True})
    env = WorkerEnv({"name": "test-fragile"})
    try:
        assert env.reset(env.episodes()[0]).instruction == "pick up the bowl" and env.max_steps == 4
        env.start_actions(np.zeros((2, 7)), 2)
        with pytest.raises(EnvWorkerError, match=r"died \(exit code 3\) while running actions"):
            env.finish_actions()
    finally:
        env.close()


def lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def test_batched_envs_give_the_records_of_one_at_a_time(tmp_path):
    """batch_envs: 3 steps the three episodes (one task) as one batch of episodes, the envs in worker processes
    (default) or in this one; an env that raises ends only its own episode, the others go on and are recorded as
    when run alone."""
    outcomes, errors = {}, {}
    for batch, workers in ((1, False), (3, True), (3, False)):
        config = ExperimentConfig(name="flaky", env={"name": "test-flaky"}, policies=["no_cache", "static_reuse"],
                                  output_dir=str(tmp_path / f"batch{batch}{workers}"), batch_envs=batch,
                                  env_workers=workers, retry_errors=False)
        run_experiment(config, progress=False)
        records = lines(tmp_path / f"batch{batch}{workers}" / "episodes.jsonl")
        outcomes[batch, workers] = {(r["policy"], r["init_state"]): (r["success"], r["error"] is not None, r["env_steps"],
                                                                     r["queries"], round(r["reuse_ratio"], 6)) for r in records}
        errors[batch, workers] = [r["error"] for r in records if r["error"]]
    assert len(outcomes[3, True]) == 6 and outcomes[3, True] == outcomes[3, False] == outcomes[1, False]
    assert outcomes[3, True][("static-reuse", 2)][4] > 0  # the batch reused tokens
    assert all("simulated simulator crash" in e and "worker process" in e for e in errors[3, True])
    with pytest.raises(Exception, match="batch_envs"):
        ExperimentConfig(batch_envs=0).check()


def test_errors_are_recorded_and_the_run_goes_on(tmp_path):
    config = ExperimentConfig(name="flaky", env={"name": "test-flaky"}, policies=["no_cache", "static_reuse"],
                              output_dir=str(tmp_path))
    rows = run_experiment(config, progress=False)
    records = lines(tmp_path / "episodes.jsonl")
    assert len(records) == 6
    failed = [r for r in records if r["error"]]
    assert {(r["policy"], r["init_state"]) for r in failed} == {("no-cache", 1), ("static-reuse", 1)}
    assert "simulated simulator crash" in failed[0]["error"]
    ok = [r for r in records if not r["error"]]
    assert all(r["queries"] == 3 and r["env_steps"] == 3 for r in ok)
    assert {r["init_state"]: r["success"] for r in ok if r["policy"] == "no-cache"} == {0: True, 2: False}
    for field in ("latency_ms", "flops_mean", "reuse_ratio", "seed", "task", "wall_s"):
        assert field in ok[0]
    assert set(ok[0]["latency_ms"]["prefill"]) == {"mean", "p50", "p95"}
    assert all(r["attempts"] == 1 for r in records)
    assert all(r["torch_threads"] == torch.get_num_threads() for r in records)  # what a bit-exact re-run needs
    by_policy = {r["policy"]: r for r in rows}
    # success over ALL attempted episodes: the errored one counts as a failure, never silently excluded
    assert by_policy["no-cache"]["errors"] == 1 and by_policy["no-cache"]["episodes"] == 3
    assert by_policy["no-cache"]["success/flaky"] == 1 / 3
    summary = (tmp_path / "summary.md").read_text()
    assert "SR flaky [95% CI]" in summary and "| no-cache | 33.3% [6, 79] |" in summary  # Wilson interval of 1/3
    assert by_policy["no-cache"]["ci95_low/flaky"] == pytest.approx(0.0615, abs=1e-4)
    assert "counts as a failure" in summary
    assert (tmp_path / "summary.csv").read_text().startswith("policy,success/flaky,ci95_low/flaky,ci95_high/flaky")
    assert (tmp_path / "summary.png").stat().st_size > 10_000
    console = Console(record=True, width=200)  # what `vlacache run` prints at the end
    print_summary(rows, console)
    assert "33.3% [6, 79]" in console.export_text()


def test_resume_after_an_interruption_loses_at_most_the_running_episode(tmp_path):
    out = tmp_path / "run"
    args = [SCRIPT, "run", "tiny_replay", "env.repeats=10", "policies=[no_cache]", f"output_dir={out}", "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    jsonl = out / "episodes.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (jsonl.exists() and len(lines(jsonl)) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err
    before = lines(jsonl)
    assert 2 <= len(before) < 10
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    after = lines(jsonl)
    assert after[: len(before)] == before  # finished episodes are kept, not re-run
    assert sorted(r["init_state"] for r in after) == list(range(10))


def test_sharded_over_two_processes_with_fabric(tmp_path):
    out = vlacache("run", "tiny_replay", "env.repeats=4", "policies=[no_cache,static_reuse]", "launcher.devices=2",
                   "launcher.accelerator=cpu", f"output_dir={tmp_path}", "--quiet")
    assert out.returncode == 0, out.stderr
    ranks = [lines(tmp_path / f"episodes.rank{r}.jsonl") for r in (0, 1)]
    assert len(ranks[0]) == 4 and len(ranks[1]) == 4
    # ranks split the episodes, not the rows: each runs both policies (a row added later keeps both busy)
    assert all({r["policy"] for r in rank} == {"no-cache", "static-reuse"} for rank in ranks)
    keys = {(r["policy"], r["init_state"]) for rank in ranks for r in rank}
    assert len(keys) == 8
    import csv

    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert {(r["policy"], r["episodes"]) for r in rows} == {("no-cache", "4"), ("static-reuse", "4")}
    # both ranks shared the one run's lock, released at the end; both policies' fingerprints are recorded
    assert not (tmp_path / "run.lock").exists()
    assert set(json.loads((tmp_path / "run.json").read_text())["policies"]) == {"no-cache", "static-reuse"}


def test_dynamic_background_changes_the_band_and_defeats_static_reuse():
    env = build_env({"name": "replay"}, {"name": "dynamic-background", "bottom": 0.5, "speed": 8})
    plain = build_env({"name": "replay"})
    a, b = env.reset(), plain.reset()
    band = slice(0, 128)
    assert not np.array_equal(a.images["primary"][band], b.images["primary"][band])
    assert np.array_equal(a.images["primary"][128:], b.images["primary"][128:])
    a2 = env.step(None)[0]
    assert not np.array_equal(a.images["primary"][band], a2.images["primary"][band])  # it moves

    import vlacache
    from vlacache.backbones.openvla import build_preset

    backbone = build_preset("tiny")
    with vlacache.attach(backbone, "static_reuse") as vla:
        vla.predict(a)
        step = vla.predict(a2)
    layout = backbone.prepare(a2).layout
    reused = layout.patch_grid("primary", step.plan.reused[-1])[0]
    assert reused.sum() > 0 and not reused[:7].any()  # nothing reused in the moving top half (rows 0-6 of 16)


def test_record_then_replay(tmp_path):
    out = tmp_path / "rec.npz"
    result = vlacache("record", "tiny_replay", "--out", str(out), "--steps", "4", "--quiet",
                      "env={name: replay, repeats: 1}", "perturbation={name: moving-distractor}")
    assert result.returncode == 0, result.stderr
    replay = build_env({"name": "replay", "path": str(out)})
    original = build_env({"name": "replay"}, {"name": "moving-distractor"})
    obs, ref = replay.reset(), original.reset()
    for _ in range(3):
        assert np.array_equal(obs.images["primary"], ref.images["primary"])
        assert obs.instruction == ref.instruction
        obs, ref = replay.step(None)[0], original.step(None)[0]
    assert replay.max_steps == 4


def test_record_runs_the_rollout_loop_and_honours_execute_chunk(tmp_path, demo_folder):
    """`vlacache record` drives the policy as `vlacache run` does: a chunked policy executing 4 of its 8 actions
    per query is recorded at every 4th frame, the observations (both cameras, proprio) it queried on."""
    from vlacache.envs.replay import load_recording

    demo = sorted(demo_folder.glob("*.npz"))[0]  # 10 frames, two cameras and proprio
    out = tmp_path / "chunked.npz"
    result = vlacache("record", "tiny_replay", "--out", str(out), "--steps", "9", "--quiet",
                      "backbone={name: openvla-oft, preset: tiny, device: cpu}", "execute_chunk=4",
                      f"env={{name: replay, path: {demo}}}")
    assert result.returncode == 0, result.stderr
    (frames, instruction, proprio), (source, source_instruction, source_proprio) = load_recording(out), load_recording(demo)
    assert instruction == source_instruction and set(frames) == {"primary", "wrist"}
    for camera in frames:  # queries at env steps 0, 4 and 8 of 9
        assert np.array_equal(frames[camera], source[camera][[0, 4, 8]])
    assert np.array_equal(proprio, source_proprio[[0, 4, 8]])


@register_env("test-flaky-while")
class FlakyWhileEnv(FlakyEnv):
    """FlakyEnv whose episode 1 raises while the file `marker` exists (same config, so resumes are allowed)."""

    @dataclass
    class Config:
        marker: str = ""
        fail_on: int = 1

    def step(self, action):
        if self.episode.init_state == self.config.fail_on and not Path(self.config.marker).exists():
            self.config.fail_on = -1  # the simulator works again
        return super().step(action)


def test_errored_episodes_are_retried_on_resume_up_to_max_retries(tmp_path):
    marker = tmp_path / "simulator_broken"
    marker.touch()
    config = dict(name="retry", env={"name": "test-flaky-while", "marker": str(marker)}, policies=["no_cache"],
                  output_dir=str(tmp_path / "out"), max_retries=2)

    def attempts_of(state):
        return [(r["attempts"], r["error"] is not None) for r in lines(tmp_path / "out" / "episodes.jsonl")
                if r["init_state"] == state]

    for _ in range(4):  # the first attempt, two retries, then the cap: no fourth attempt
        rows = run_experiment(ExperimentConfig(**config), progress=False)
    assert attempts_of(1) == [(1, True), (2, True), (3, True)]
    assert attempts_of(0) == [(1, False)] and attempts_of(2) == [(1, False)]  # finished episodes never re-run
    assert rows[0]["errors"] == 1 and rows[0]["episodes"] == 3

    marker.unlink()  # fixed; a higher cap is not part of the fingerprint
    rows = run_experiment(ExperimentConfig(**{**config, "max_retries": 3}), progress=False)
    assert attempts_of(1)[-1] == (4, False)
    assert rows[0]["errors"] == 0 and rows[0]["episodes"] == 3 and rows[0]["success/flaky"] == 1 / 3

    marker.touch()
    run_experiment(ExperimentConfig(**{**config, "retry_errors": False}), progress=False)
    assert len(attempts_of(1)) == 4  # nothing errored is left, nothing re-runs


@register_env("test-nan-success")
class NanSuccessEnv(FlakyEnv):
    """Episode 1 reports success=NaN, episode 2 success=None: env bugs, not verdicts."""

    @dataclass
    class Config:
        fail_on: int = -1

    def step(self, action):
        obs, reward, done, info = super().step(action)
        bad = {1: float("nan"), 2: None}
        if self.episode.init_state in bad:
            info = {**info, "success": bad[self.episode.init_state]}
        return obs, reward, done, info


def test_a_nan_or_none_success_is_an_error_record(tmp_path):
    config = ExperimentConfig(name="nan", env={"name": "test-nan-success"}, policies=["no_cache"],
                              output_dir=str(tmp_path), retry_errors=False)
    rows = run_experiment(config, progress=False)
    records = {r["init_state"]: r for r in lines(tmp_path / "episodes.jsonl")}
    assert records[0]["success"] is True and records[0]["error"] is None
    for state, text in ((1, "success=nan"), (2, "success=None")):
        assert records[state]["success"] is None and text in records[state]["error"]
    assert rows[0]["errors"] == 2 and rows[0]["success/flaky"] == 1 / 3
