"""`vlacache bench` over a folder of recorded episodes with several policy rows: the action agreement
(|a_cached - a_nocache| per step and action dimension) without a simulator."""

import numpy as np
import pytest

from vlacache.config import ConfigError
from vlacache.envs.replay import ReplayEnv, embedded_frames_path, load_recording, save_recording
from vlacache.eval.bench import run_bench
from vlacache.experiment import BenchConfig


@pytest.fixture(scope="module")
def episodes_folder(tmp_path_factory):
    """Two short episodes cut from the embedded LIBERO recording, as `vlacache demos` would store them."""
    folder = tmp_path_factory.mktemp("episodes")
    frames, instruction, proprio = load_recording(embedded_frames_path())
    for e, span in enumerate((slice(0, 5), slice(8, 12))):
        save_recording(folder / f"libero_spatial_task0_seed{100000 + e}.npz", {c: f[span] for c, f in frames.items()},
                       instruction, proprio[span], actions=np.zeros((span.stop - span.start, 7), np.float32))
    return folder


def test_replay_env_lists_a_folder_of_recordings(episodes_folder):
    env = ReplayEnv(ReplayEnv.Config(path=str(episodes_folder)))
    assert [e.task for e in env.episodes()] == ["libero_spatial_task0_seed100000", "libero_spatial_task0_seed100001"]
    env.reset(env.episodes()[1])
    assert env.max_steps == 4
    env.reset(env.episodes()[0])
    assert env.max_steps == 5
    first = ReplayEnv.data_identity(ReplayEnv.Config(path=str(episodes_folder)))
    assert first["size"] == sum(p.stat().st_size for p in episodes_folder.glob("*.npz"))
    one = ReplayEnv(ReplayEnv.Config(path=str(episodes_folder), pattern="*seed100001.npz"))
    assert [e.task for e in one.episodes()] == ["libero_spatial_task0_seed100001"]
    with pytest.raises(Exception, match="matching"):
        ReplayEnv(ReplayEnv.Config(path=str(episodes_folder), pattern="*task7*"))
    empty = episodes_folder.parent / "empty"
    empty.mkdir()
    with pytest.raises(Exception, match="holds no recording"):
        ReplayEnv(ReplayEnv.Config(path=str(empty)))


def test_replay_stride_plays_every_kth_frame():
    frames, _, proprio = load_recording(embedded_frames_path())
    env = ReplayEnv(ReplayEnv.Config(stride=4))
    seen = [env.reset()]
    done = False
    while not done:
        obs, _, done, _ = env.step(None)
        seen.append(obs)
    assert env.max_steps == 4  # 16 recorded frames, one query per 4
    for i, obs in enumerate(seen[:4]):
        assert np.array_equal(obs.images["wrist"], frames["wrist"][4 * i]) and np.array_equal(obs.proprio, proprio[4 * i])
    with pytest.raises(Exception, match="stride must be an integer >= 1"):
        ReplayEnv(ReplayEnv.Config(stride=0))


def test_bench_rows_over_recorded_episodes(episodes_folder):
    config = BenchConfig(backbone={"name": "openvla-oft", "preset": "tiny", "device": "cpu"},
                         env={"name": "replay", "path": str(episodes_folder)}, episodes=None,
                         policy=["no_cache", "static_reuse"], warmup=0, repeats=1)
    report = run_bench(config, progress=False)
    assert report["episodes"] == 2 and report["steps_per_episode"] == [5, 4]
    none, static = report["rows"]
    assert none["label"] == "no-cache" and static["label"] == "static-reuse"
    assert [(s["episode"], s["step"]) for s in static["steps"]] == [(0, t) for t in range(5)] + [(1, t) for t in range(4)]
    assert max(none["summary"]["action_abs_diff"]["max"]) == 0.0  # no reuse: the very same actions
    assert none["summary"]["mean_reuse_ratio"] == 0.0 and none["summary"]["identical_action_steps"] == 1.0
    assert static["summary"]["mean_reuse_ratio"] > 0
    assert static["steps"][0]["reuse_ratio"] == 0 and static["steps"][5]["reuse_ratio"] == 0  # a new episode: cache reset
    deviation = static["summary"]["action_abs_diff"]
    assert all(len(v) == 7 for v in deviation.values()) and max(deviation["max"]) > 0
    worst = max(s["action_max_abs_diff"] for s in static["steps"])
    assert max(deviation["max"]) == pytest.approx(worst)
    same = [s["action_max_abs_diff"] == 0 for s in static["steps"]]
    assert static["summary"]["identical_action_steps"] == pytest.approx(sum(same) / 9)
    assert 0 < sum(same) < 9  # the first step of each episode reuses nothing; reused steps move the actions
    with pytest.raises(ConfigError, match="unique"):
        run_bench(BenchConfig(backbone=config.backbone, env=config.env, policy=["no_cache", "no_cache"]), progress=False)


def test_bench_with_reuse_buckets_reuses_only_bucket_counts(episodes_folder):
    """fast_path.buckets from the config reaches every row: each layer's reused count is a bucket count."""
    from vlacache.engine import ReuseBuckets
    from vlacache.experiment import load_config

    overrides = [f"env.path={episodes_folder}", "episodes=1", "warmup=0", "repeats=1", "policy=static_reuse",
                 "backbone.name=openvla-oft", "backbone.preset=tiny", "backbone.device=cpu", "fast_path.buckets=4"]
    config = load_config(BenchConfig, None, "bench", overrides)
    (row,) = run_bench(config, progress=False)["rows"]
    allowed = ReuseBuckets.from_spec(4).counts(row["steps"][1]["num_visual"])
    assert any(sum(s["reused_per_layer"]) for s in row["steps"])
    assert all(c in allowed for s in row["steps"] for c in s["reused_per_layer"])
    with pytest.raises(ConfigError, match="buckets"):
        load_config(BenchConfig, None, "bench", overrides[:-1] + ["fast_path.buckets=0"])


def test_bench_batch_of_episodes_throughput_and_agreement(episodes_folder):
    """batch: 3 steps three episodes together (cyclic over the two recorded) against one at a time."""
    config = BenchConfig(backbone={"name": "openvla-oft", "preset": "tiny", "device": "cpu"},
                         env={"name": "replay", "path": str(episodes_folder)}, episodes=None,
                         policy=["static_reuse"], warmup=0, repeats=1, batch=3)
    batch = run_bench(config, progress=False)["batch"]
    assert batch["size"] == 3 and batch["steps"] == 4
    assert set(batch["rows"]) == {"baseline", "static-reuse"}
    for row in batch["rows"].values():
        assert row["actions_per_s_batched"] > 0 and row["actions_per_s_one_at_a_time"] > 0
        assert row["batched_vs_alone_max_abs_diff"] < 1e-4
    with pytest.raises(ConfigError, match="batch"):
        BenchConfig(batch=0).check()


def test_bench_compiled_rows_carry_their_exactness_certificate(episodes_folder):
    """fast_path.compile: every row also compiled, interleaved; compile_checks compares each with its eager twin."""
    from vlacache.experiment import load_config

    overrides = [f"env.path={episodes_folder}", "episodes=1", "warmup=1", "repeats=1", "policy=static_reuse",
                 "backbone.preset=tiny", "backbone.device=cpu", "fast_path.compile=true"]
    report = run_bench(load_config(BenchConfig, None, "bench", overrides), progress=False)
    labels = [row["label"] for row in report["rows"]]
    assert labels == ["static-reuse", "baseline+compiled", "static-reuse+compiled"]
    checks = report["compile_checks"]
    assert set(checks) == {"baseline", "static-reuse"}
    assert checks["baseline"]["steps"] == 5 and checks["baseline"]["identical_tokens"] == 1.0
    assert checks["baseline"]["max_abs_logit_diff"] < 1e-4 and checks["baseline"]["same_plan"] == 1.0
    assert checks["static-reuse"]["max_abs_logit_diff"] < 1e-3
    compiled = report["rows"][2]["summary"]
    assert compiled["mean_reuse_ratio"] > 0 and compiled["vs_compiled_baseline"]["total_speedup"] > 0
    with pytest.raises(ConfigError, match="warmup >= 1"):
        load_config(BenchConfig, None, "bench", overrides + ["warmup=0"])
    with pytest.raises(ConfigError, match="compile_mode is set"):
        load_config(BenchConfig, None, "bench", overrides[:-1] + ["fast_path.compile_mode=reduce-overhead"])
