"""`vlacache bench` (vlacache.eval.bench): baseline vs one or more cache policies over recorded episodes (a replay
recording, or a folder of them such as the demonstrations), measured in the same run with the variants
interleaved: per policy row the reuse, FLOPs, latency and |a_cached - a_nocache| per action dimension."""

from __future__ import annotations

import dataclasses

import platform
import statistics
import time
from typing import Any

import numpy as np
import torch
import transformers
from tqdm import tqdm

from ..config import ConfigError
from ..experiment import BenchConfig, build_backbone, build_env, build_policy
from ..runtime import LATENCY_PARTS, CachedVLA, StepResult
from ..threads import torch_threads
from ..types import Observation, ReusePlan

PARTS = LATENCY_PARTS + ("total",)
BASELINE, COMPILED = "baseline", "+compiled"


def collect_episodes(env, episodes: int | None, max_steps: int | None) -> list[list[Observation]]:
    """The observation sequences of the env's first `episodes` episodes (None: all), replayed with no actions."""
    listed = env.episodes()[: episodes or None]
    out = []
    for episode in listed:
        frames = [env.reset(episode)]
        while max_steps is None or len(frames) < max_steps:
            obs, _, done, _ = env.step(None)
            if done:
                break
            frames.append(obs)
        out.append(frames)
    return out


def _max_diff(a: StepResult, b: StepResult) -> float:
    logits = (a.logits - b.logits).abs().max().item()
    actions = float(abs(a.actions - b.actions).max())
    return max(logits, actions)


def _first_call(vla: CachedVLA, obs: Observation, plan: ReusePlan | None = None) -> StepResult:
    """predict() as the first call of an episode for the backbone's own state (e.g. CogACT's noise generator),
    so two variants compared call by call see the same randomness; the engine's cache is left as it is."""
    vla.backbone.reset()
    return vla.predict(obs, plan=plan)


def self_checks(backbone, frames: list[Observation]) -> dict[str, float]:
    """Exactness on this model: zero reuse vs no cache, and identical frames with everything reused."""
    layers = len(backbone.decoder.layers)
    baseline = CachedVLA(backbone, None)
    probe = CachedVLA(backbone, None)
    probe.engine.attach()
    try:
        zero = 0.0
        for obs in frames[:2]:
            pair = _first_call(baseline, obs), _first_call(probe, obs, ReusePlan.empty(1, layers))
            zero = max(zero, _max_diff(*pair))
        probe.reset()
        first = frames[0]
        probe.predict(first)
        layout = backbone.prepare(first).layout
        everything = torch.cat([span.positions() for span in layout.vision.values()])[None]
        reused = _first_call(probe, first, ReusePlan([everything] * layers))
        identical = _max_diff(_first_call(baseline, first), reused)
    finally:
        probe.detach()
    return {"zero_reuse_max_abs_diff": zero, "identical_frame_max_abs_diff": identical}


def action_deviation(baseline: list[np.ndarray], cached: list[np.ndarray]) -> dict[str, list[float]]:
    """|a_cached - a_nocache| per action dimension over every step and chunk entry: mean, p50, p95, max (the
    distribution that says what a cache policy does to the actions, without a simulator)."""
    diff = np.concatenate([np.abs(c - b).reshape(-1, b.shape[-1]) for b, c in zip(baseline, cached)])
    return {"mean": diff.mean(0).tolist(), "p50": np.percentile(diff, 50, axis=0).tolist(),
            "p95": np.percentile(diff, 95, axis=0).tolist(), "max": diff.max(0).tolist()}


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _policy_specs(spec: Any) -> list[Any]:
    return list(spec) if isinstance(spec, (list, tuple)) else [spec]


def run_bench(config: BenchConfig, progress: bool = True, backbone=None) -> dict[str, Any]:
    """Every step of the chosen episodes through the baseline and each cache policy, interleaved per episode and
    repeat; per policy a row with per-step numbers and their summary. Runs with `config.threads` torch threads.
    `backbone`: one already built (e.g. held in bfloat16 by a real-size benchmark) instead of `config.backbone`."""
    config.check()
    with torch_threads(config.threads) as threads:
        print(f"vlacache bench {config.name}: {threads}", flush=True)
        return measure(config, progress, backbone)


def measure(config: BenchConfig, progress: bool, backbone=None) -> dict[str, Any]:
    backbone = build_backbone(config.backbone) if backbone is None else backbone
    policies = [build_policy(spec) for spec in _policy_specs(config.policy)]
    labels = [p.label for p in policies]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"bench policy labels must be unique, got {labels}; set `label:` in the policy configs")
    env = build_env(config.env)
    try:
        episodes = collect_episodes(env, config.episodes, config.max_steps)
    finally:
        env.close()
    checks = self_checks(backbone, episodes[0]) if config.self_checks else \
        {"zero_reuse_max_abs_diff": None, "identical_frame_max_abs_diff": None}
    fast = config.fast_path
    eager = {**fast.options(), "compile": False, "compile_mode": None}
    runners = {"baseline": CachedVLA(backbone, None)} | {p.label: CachedVLA(backbone, p, **eager) for p in policies}
    if fast.compile:  # the same rows compiled, interleaved with the eager ones
        runners[BASELINE + COMPILED] = CachedVLA(backbone, None, **fast.options())
        runners |= {p.label + COMPILED: CachedVLA(backbone, p, **fast.options()) for p in policies}
    results = {name: [[[] for _ in frames] for frames in episodes] for name in runners}
    total = (config.warmup + config.repeats) * len(runners) * sum(len(f) for f in episodes)
    bar = tqdm(total=total, desc="bench", disable=not progress, unit="step")
    for repeat in range(config.warmup + config.repeats):
        for e, frames in enumerate(episodes):
            for name, runner in runners.items():
                runner.reset()
                for t, obs in enumerate(frames):
                    result = runner.predict(obs)
                    if repeat >= config.warmup:
                        results[name][e][t].append(result)
                    bar.update()
    bar.close()
    for runner in runners.values():
        runner.detach()
    base = results[BASELINE]
    rows = [bench_row(p.label, repr(p), base, results[p.label]) for p in policies]
    for row, p in zip(rows, policies):  # a guarded row: the cost model its decisions came from
        guard = runners[p.label].guard
        if guard is not None:
            row["cost_model"] = guard.model.to_json() if guard.model is not None else None
            row["summary"]["guard_declined_steps"] = sum(
                "guard" in r.plan.info for episode in results[p.label] for step in episode for r in step)
    compile_checks = None
    if fast.compile:
        rows.append(bench_row(BASELINE + COMPILED, "no cache, compiled", base, results[BASELINE + COMPILED]))
        for p in policies:
            row = bench_row(p.label + COMPILED, repr(p) + ", compiled", base, results[p.label + COMPILED])
            against = latency_summary(results[BASELINE + COMPILED], results[p.label + COMPILED])
            row["summary"]["vs_compiled_baseline"] = {k: v for k, v in against.items() if k.endswith("_speedup")}
            rows.append(row)
        compile_checks = {label: agreement(results[label], results[label + COMPILED])
                          for label in [BASELINE] + [p.label for p in policies]}
    batch = batch_throughput(backbone, policies, episodes, config) if config.batch > 1 else None
    return {
        "config": dataclasses.asdict(config),
        "machine": machine_info(backbone.device),
        "episodes": len(episodes),
        "steps_per_episode": [len(f) for f in episodes],
        "zero_reuse_max_abs_diff": checks["zero_reuse_max_abs_diff"],
        "identical_frame_max_abs_diff": checks["identical_frame_max_abs_diff"],
        "rows": rows,
        "compile_checks": compile_checks,
        "batch": batch,
    }


def agreement(eager: list[list[list[StepResult]]], compiled: list[list[list[StepResult]]]) -> dict[str, Any]:
    """The exactness certificate of a compiled row against the same row eager, over every step and repeat: the
    largest |logit| and |action| differences, the share of steps with identical action tokens, and the share with
    the same reuse plan (a cached step's plan reads last step's attention, so float noise may change it)."""
    pairs = [(e, c) for ee, ce in zip(eager, compiled) for es, cs in zip(ee, ce) for e, c in zip(es, cs)]
    tokens = [torch.equal(e.tokens, c.tokens) for e, c in pairs if e.tokens is not None]
    return {
        "steps": len(pairs),
        "max_abs_logit_diff": max(float((e.logits - c.logits).abs().max()) for e, c in pairs),
        "max_abs_action_diff": max(float(abs(e.actions - c.actions).max()) for e, c in pairs),
        "identical_tokens": statistics.mean(tokens) if tokens else None,
        "same_plan": statistics.mean(e.plan.counts == c.plan.counts and all(
            torch.equal(a, b) for a, b in zip(e.plan.reused, c.plan.reused)) for e, c in pairs),
    }


def batch_throughput(backbone, policies, episodes: list[list[Observation]], config: BenchConfig) -> dict[str, Any]:
    """Actions per second of `config.batch` episodes stepped together (one batch of episodes) against the same
    episodes one after another, per row, interleaved per repeat; plus the largest difference between a batched
    row's actions and its episode run alone (a batch must equal separate runs)."""
    group = [episodes[i % len(episodes)] for i in range(config.batch)]
    steps = min(len(frames) for frames in group)
    batched = [Observation.stack([frames[t] for frames in group]) for t in range(steps)]
    rows = {}
    for label, policy in [("baseline", None)] + [(p.label, p) for p in policies]:
        single, together, diff = [], [], 0.0
        for repeat in range(config.warmup + config.repeats):
            alone = []
            with CachedVLA(backbone, policy, **config.fast_path.options()) as vla:
                start = time.perf_counter()
                for frames in group:
                    vla.reset()
                    alone.append([vla.predict(obs).actions[0] for obs in frames[:steps]])
                elapsed_single = time.perf_counter() - start
            with CachedVLA(backbone, policy, **config.fast_path.options()) as vla:
                start = time.perf_counter()
                results = [vla.predict(obs).actions for obs in batched]
                elapsed_batch = time.perf_counter() - start
            diff = max(diff, max(float(abs(r[b] - alone[b][t]).max()) for t, r in enumerate(results) for b in range(len(group))))
            if repeat >= config.warmup:
                single.append(elapsed_single)
                together.append(elapsed_batch)
        actions = len(group) * steps
        rows[label] = {
            "actions_per_s_one_at_a_time": actions / _median(single),
            "actions_per_s_batched": actions / _median(together),
            "speedup": _median(single) / _median(together),
            "batched_vs_alone_max_abs_diff": diff,
        }
    return {"size": len(group), "steps": steps, "rows": rows}


def latency_summary(baseline: list[list[list[StepResult]]], cached: list[list[list[StepResult]]]) -> dict[str, float]:
    """Per latency part: the median over steps (of each step's median over repeats), baseline and cached, and
    their ratio; over the steps where the cached row reused something (all steps when it never did)."""
    pairs = [(base, mine) for base_episode, cached_episode in zip(baseline, cached)
             for base, mine in zip(base_episode, cached_episode)]
    pairs = [(base, mine) for base, mine in pairs if mine[-1].stats.reuse_ratio > 0] or pairs
    summary = {}
    for part in PARTS:
        b = _median([_median([r.stats.latency_ms[part] for r in base]) for base, _ in pairs])
        c = _median([_median([r.stats.latency_ms[part] for r in mine]) for _, mine in pairs])
        summary[f"{part}_ms_baseline"], summary[f"{part}_ms_cached"] = b, c
        summary[f"{part}_speedup"] = b / c if c > 0 else float("nan")
    return summary


def bench_row(label: str, description: str, baseline: list[list[list[StepResult]]],
              cached: list[list[list[StepResult]]]) -> dict[str, Any]:
    """One row's per-step numbers (every episode's steps in order) and their summary against the baseline."""
    steps = []
    for e, (base_episode, cached_episode) in enumerate(zip(baseline, cached)):
        for t, (base, mine) in enumerate(zip(base_episode, cached_episode)):
            stats = mine[-1].stats
            steps.append({
                "episode": e,
                "step": t,
                "tokens_per_layer": stats.tokens_per_layer,
                "reused_per_layer": stats.reused_per_layer,
                "dropped_per_layer": stats.dropped_per_layer,
                "reuse_ratio": stats.reuse_ratio,
                "num_visual": stats.num_visual,
                "flops_baseline": base[-1].stats.flops,
                "flops_cached": stats.flops,
                "latency_baseline_ms": {p: _median([r.stats.latency_ms[p] for r in base]) for p in PARTS},
                "latency_cached_ms": {p: _median([r.stats.latency_ms[p] for r in mine]) for p in PARTS},
                "device_ms_baseline": (_median([r.stats.device_ms for r in base])
                                       if base[-1].stats.device_ms is not None else None),
                "device_ms_cached": _median([r.stats.device_ms for r in mine]) if stats.device_ms is not None else None,
                "action_max_abs_diff": float(abs(base[-1].actions - mine[-1].actions).max()),
                "staleness": stats.staleness,
            })
    summary = {"reuse_steps": len([s for s in steps if s["reuse_ratio"] > 0]),
               "mean_reuse_ratio": statistics.mean(s["reuse_ratio"] for s in steps)}
    summary.update(latency_summary(baseline, cached))
    # a token-decoding backbone's actions are bin centres: the share of queries whose action did not change at all
    summary["identical_action_steps"] = statistics.mean(s["action_max_abs_diff"] == 0 for s in steps)
    summary["action_abs_diff"] = action_deviation(
        [step[-1].actions for episode in baseline for step in episode],
        [step[-1].actions for episode in cached for step in episode])
    fb = statistics.mean(s["flops_baseline"]["total"] for s in steps)
    fc = statistics.mean(s["flops_cached"]["total"] for s in steps)
    summary.update(flops_baseline=fb, flops_cached=fc, flops_ratio=fc / fb)
    stale = [s["staleness"] for s in steps if s["staleness"]]
    summary["staleness"] = {  # of the reused tokens: steps since their K/V were computed, pixel drift since
        "reused_age_mean": statistics.mean(x["reused_age_mean"] for x in stale),
        "reused_age_max": max(x["reused_age_max"] for x in stale),
        "reused_drift_mean": statistics.mean(x["reused_drift_mean"] for x in stale),
        "reused_drift_max": max(x["reused_drift_max"] for x in stale),
    } if stale else None
    layers = len(steps[0]["tokens_per_layer"])
    summary["mean_reused_per_layer"] = [statistics.mean(s["reused_per_layer"][i] for s in steps) for i in range(layers)] \
        if steps[0]["reused_per_layer"] else []
    pruned = any(s["dropped_per_layer"] for s in steps)  # (a step the cost guard ran untouched dropped nothing)
    summary["mean_dropped_per_layer"] = [statistics.mean((s["dropped_per_layer"] or [0] * layers)[i] for s in steps)
                                         for i in range(layers)] if pruned else None
    return {"label": label, "policy": description, "summary": summary, "steps": steps}


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "device": str(device),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
