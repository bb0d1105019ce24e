"""`vlacache run` (vlacache.eval.runner): every policy of an experiment over the env's episodes, resumable,
sharded, reported.

Before any compute, the output directory is claimed (`results.py`): it must be writable, `run.lock` refuses a
second run on it, torn lines left by a crash are moved aside, and each policy's fingerprint (`fingerprint.py`)
must match the one its earlier results were made under (`--restart` moves them aside instead). Then each
finished episode is appended at once to a JSONL file; a re-run of the same command skips what is there and
retries episodes whose last attempt raised (`retry_errors`, up to `max_retries` more attempts); Ctrl-C loses at
most the running episode; an exception inside one episode is recorded as that episode's error and the run goes
on. With `launcher.devices` x `launcher.num_nodes` > 1, Lightning Fabric starts one process per device, each
takes every n-th episode and writes its own JSONL; rank 0 merges them and writes the report.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import traceback
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import groupby
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from ..env import Env, EpisodeSpec
from ..experiment import ExperimentConfig, build_backbone, build_env, build_policy
from ..policy import CachePolicy
from ..runtime import CachedVLA
from ..types import Observation, StepStats
from .env_workers import WorkerEnv, start_workers
from .fingerprint import check_fingerprints, experiment_fingerprints
from .lock import OutputLock, acquire_lock, run_token
from .report import LATENCY_PARTS, summarize, write_plots, write_tables
from ..threads import torch_threads, use_threads
from .verify import first_episode, reproduce
from .results import (ResultStore, attempts, check_writable_dir, load_records, move_aside, note, record_key,
                      repair_jsonl, result_files)


def episode_record(policy: str, episode: EpisodeSpec, steps: list[StepStats], **extra: Any) -> dict[str, Any]:
    """One JSONL line: the episode, its outcome and its per-query statistics (means, p50, p95)."""
    latency = {}
    for part in LATENCY_PARTS + ("total",):
        values = np.array([s.latency_ms[part] for s in steps]) if steps else np.array([np.nan])
        latency[part] = {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
                         "p95": float(np.percentile(values, 95))}
    visual = steps[0].num_visual if steps else 0
    per_layer = [float(np.mean(x)) / visual for x in zip(*(s.reused_per_layer for s in steps))] if steps and visual else []
    return {
        "policy": policy,
        "task": episode.task,
        "init_state": episode.init_state,
        "seed": episode.seed,
        "queries": len(steps),
        "latency_ms": latency,
        "flops_mean": float(np.mean([s.flops["total"] for s in steps])) if steps else None,
        "reuse_ratio": float(np.mean([s.reuse_ratio for s in steps])) if steps else None,
        "reused_per_layer": per_layer,
        "reused_age": reused_age(steps),
        # float reductions, and so reuse decisions and trajectories, depend on it bit for bit (not in distribution):
        # an episode re-run with this many threads gives this very record
        "torch_threads": torch.get_num_threads(),
        **extra,
    }


def reused_age(steps: list[StepStats]) -> dict[str, float] | None:
    """How old the reused K/V were, over the queries that reused any: in queries and in env steps since they were
    computed (the mean of the per-query means, and the max). None: nothing was reused."""
    stale = [s.staleness for s in steps if s.staleness]
    if not stale:
        return None
    out = {}
    for unit, key in (("queries", "reused_age"), ("env_steps", "reused_age_env_steps")):
        out[f"{unit}_mean"] = float(np.mean([x[f"{key}_mean"] for x in stale]))
        out[f"{unit}_max"] = float(max(x[f"{key}_max"] for x in stale))
    return out


def verdict(info: dict[str, Any]) -> bool | None:
    """The env's success verdict: None when it reports none (the replay env); a reported None / NaN is an
    error (raised, so the episode's record carries it), never a success and never skipped."""
    if "success" not in info:
        return None
    value = info["success"]
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        raise ValueError(f"the env reported success={value!r}, neither true nor false")
    return bool(value)


def run_episode(vla: CachedVLA, env: Env, episode: EpisodeSpec, config: ExperimentConfig, video_dir: Path | None,
                attempt: int = 1) -> dict:
    """Roll one episode out: the one-row case of `run_batch`. Any exception becomes the record's `error`
    (KeyboardInterrupt propagates). `attempt`: how many times this episode has now been run."""
    return next(run_batch(vla, [env], [(episode, attempt)], config, video_dir))


@dataclass
class _Slot:
    """One env's episode inside a batch of episodes."""

    env: Env
    episode: EpisodeSpec
    attempt: int
    obs: Any = None
    steps: list = field(default_factory=list)
    frames: list = field(default_factory=list)
    env_steps: int = 0
    limit: int = 0
    done: bool = False
    info: dict = field(default_factory=dict)
    error: str | None = None
    start: float = field(default_factory=time.perf_counter)


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_exc(limit=6))


def run_batch(vla: CachedVLA, envs: list[Env], work: list[tuple[EpisodeSpec, int]], config: ExperimentConfig,
              video_dir: Path | None, on_query: Callable[[EpisodeSpec, Observation], None] | None = None) -> Iterator[dict]:
    """Roll len(work) <= len(envs) episodes out together, one batch row each, and yield each episode's record
    as soon as it ends: the one rollout loop of vlacache (`run_episode` is its one-row case, `vlacache record`
    records through it). Each query's chunk is executed for `execute_chunk` actions. A row whose episode ended
    leaves the batch (`keep_rows`); the others keep their caches. An exception in one env is that episode's
    error; one in the model is the error of every running episode. `on_query(episode, obs)`: called with every
    observation a query is made from."""
    slots = []
    for env, (episode, attempt) in zip(envs, work):
        slot = _Slot(env, episode, attempt)
        try:
            slot.obs = env.reset(episode)
            slot.limit = config.max_steps or env.max_steps
        except Exception as exc:  # recorded, never silent
            slot.error = _error_text(exc)
        slots.append(slot)
    vla.reset()
    active = [s for s in slots if s.error is None]
    for slot in slots:
        if slot.error is not None:
            yield _slot_record(vla, slot, video_dir)
    while active:
        for slot in active:
            if video_dir is not None:
                slot.frames.append(np.asarray(slot.obs.images["primary"]))
            if on_query is not None:
                on_query(slot.episode, slot.obs)
        try:
            result = vla.predict(Observation.stack([s.obs for s in active]))
        except Exception as exc:
            text = _error_text(exc)
            for slot in active:
                slot.error = text
                yield _slot_record(vla, slot, video_dir)
            return
        rows = result.plan.counts_per_row(len(active))
        for row, slot in enumerate(active):  # every env starts its chunk before any is waited for
            slot.steps.append(row_stats(result.stats, rows[row]))
            chunk = result.actions[row]
            slot.env.start_actions(chunk[: config.execute_chunk or len(chunk)], slot.limit - slot.env_steps)
        ended = []
        for row, slot in enumerate(active):
            try:
                slot.obs, slot.done, slot.info, taken = slot.env.finish_actions()
                slot.env_steps += taken
            except Exception as exc:
                slot.error = _error_text(exc)
            if slot.error is not None or slot.done or slot.env_steps >= slot.limit:
                ended.append(row)
        for row in ended:
            yield _slot_record(vla, active[row], video_dir)
        if ended:
            keep = [row for row in range(len(active)) if row not in ended]
            active = [active[row] for row in keep]
            if active:
                vla.keep_rows(keep)


def row_stats(stats: StepStats, reused: list[int]) -> StepStats:
    """A batch row's share of a batched step: its own reused tokens per layer (latency and FLOPs are the batch's)."""
    ratio = sum(reused) / (len(reused) * stats.num_visual) if stats.num_visual and reused else 0.0
    return dataclasses.replace(stats, reused_per_layer=list(reused), reuse_ratio=ratio)


def _slot_record(vla: CachedVLA, slot: _Slot, video_dir: Path | None) -> dict:
    success = None
    if slot.error is None:
        try:
            success = verdict(slot.info)
        except Exception as exc:
            slot.error = _error_text(exc)
    if video_dir is not None and slot.frames:
        save_gif(_video_path(video_dir, vla, slot.episode), slot.frames)
    return episode_record(
        vla.policy.label, slot.episode, slot.steps, success=success, env_steps=slot.env_steps, error=slot.error,
        wall_s=time.perf_counter() - slot.start, attempts=slot.attempt, finished_at=time.time(),
    )


def _video_path(video_dir: Path, vla: CachedVLA, episode: EpisodeSpec) -> Path:
    return video_dir / f"{vla.policy.label}__{episode.key.replace('|', '_').replace('/', '-')}.gif"


def save_gif(path: Path, frames: list[np.ndarray]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)


@contextmanager
def claim_output(config: ExperimentConfig, restart: bool = False, world: int = 1,
                 verify_code_change: bool = False) -> Iterator[OutputLock]:
    """Everything that can refuse a run, before any compute: the configs resolve (fingerprints), the output dir
    is writable, no other run holds it, torn lines are moved aside, and each policy's earlier results were made
    under the same fingerprint (`restart`: move them aside instead; `verify_code_change`: a policy whose only
    change is its components' code resumes if one of its recorded episodes, run again, comes out the same:
    `verify.py`). Yields the lock; the process that took it releases it on exit, the other ranks join it."""
    config.check()
    fingerprints = experiment_fingerprints(config)
    out = Path(config.output_dir)
    check_writable_dir(out)
    lock = acquire_lock(out, run_token(world))
    try:
        if lock.owner:
            if restart:
                moved = move_aside(out)
                if moved is not None:
                    note(f"--restart: moved the previous results of {out} to {moved}")
            for path in result_files(out):
                repair_jsonl(path)
        if lock.owner or not restart:  # under --restart the owner has moved the old results aside
            records = load_records(result_files(out), quiet=not lock.owner)
            verify = partial(reproduce_first, config, records) if verify_code_change and lock.owner else None
            check_fingerprints(out, fingerprints, {r["policy"] for r in records}, write=lock.owner, verify=verify)
        yield lock
    finally:
        lock.release()


def reproduce_first(config: ExperimentConfig, records: list[dict], label: str) -> dict:
    """`verify.reproduce` on the policy's first recorded episode."""
    record = first_episode(records, label)
    if record is None:
        return {"episode": "(none finished)", "torch_threads": None, "differ": {"a finished episode": None}, "error": None}
    return reproduce(config, label, record)


def run_experiment(config: ExperimentConfig, progress: bool = True, restart: bool = False,
                   verify_code_change: bool = False) -> list[dict]:
    """Run (or resume) the whole experiment in this process; return the summary rows."""
    with claim_output(config, restart, verify_code_change=verify_code_change), torch_threads(config.threads) as threads:
        announce(config, threads, 1)
        return run_shard(config, progress, policies=[build_policy(spec) for spec in config.policies])


def announce(config: ExperimentConfig, threads: str, processes: int) -> None:
    """The run's header line (stdout; stderr keeps progress and errors): what runs where, with how many threads."""
    processes_text = f"{processes} process{'es' if processes > 1 else ''}"
    print(f"vlacache run {config.name}: {len(config.policies)} policies, {processes_text}, {threads}; "
          f"results in {config.output_dir}", flush=True)


def pending(config: ExperimentConfig, work: list[tuple[Any, EpisodeSpec]], out: Path) -> list[tuple[Any, EpisodeSpec, int]]:
    """(policy, episode, attempt) still to run: never recorded, or errored with retries left."""
    latest = {record_key(r): r for r in load_records(result_files(out), quiet=True)}
    todo = []
    for policy, episode in work:
        record = latest.get(f"{policy.label}::{episode.key}")
        if record is None:
            todo.append((policy, episode, 1))
        elif record.get("error") is not None and config.retry_errors and attempts(record) <= config.max_retries:
            todo.append((policy, episode, attempts(record) + 1))
    return todo


def run_shard(config: ExperimentConfig, progress: bool = True, rank: int = 0, world: int = 1,
              policies: list[CachePolicy] | None = None) -> list[dict]:
    """This rank's share of the episodes (the output dir already claimed); summary rows on rank 0 (world 1).
    `policies`: the config's, built once by the caller."""
    out = Path(config.output_dir)
    store = ResultStore(out / ("episodes.jsonl" if world == 1 else f"episodes.rank{rank}.jsonl"))
    policies = policies if policies is not None else [build_policy(spec) for spec in config.policies]
    workers = config.batch_envs > 1 and config.env_workers
    env = WorkerEnv(config.env, config.perturbation) if workers else build_env(config.env, config.perturbation)
    envs: list[Env] = []  # with batch_envs > 1: the other envs of a batch of episodes
    try:
        episodes = env.episodes()[: config.episodes]
        # episode-major: every policy row grows at the same pace, so a sweep stopped early compares like with like.
        # Ranks take whole episodes (every policy's run of it), so a row added to a finished one, or an even number
        # of rows, still keeps every rank busy.
        if config.batch_envs == 1:
            work = [(p, e) for e in episodes[rank::world] for p in policies]
        else:  # a batch of episodes of one task at a time, each policy in turn; ranks take whole batches
            batches = task_batches(episodes, config.batch_envs)[rank::world]
            work = [(p, e) for batch in batches for p in policies for e in batch]
        todo = pending(config, work, out)
        if todo:
            others = config.batch_envs - 1
            envs = start_workers(others, config.env, config.perturbation) if workers else \
                [build_env(config.env, config.perturbation) for _ in range(others)]
            backbone = build_backbone(config.backbone)
            video_dir = out / "videos" if config.videos else None
            bar = tqdm(total=len(todo), desc=f"{config.name}" + (f" [rank {rank}]" if world > 1 else ""),
                       disable=not progress, unit="episode")
            wins = finished = errors = 0
            try:
                for policy, group in groupby(todo, key=lambda item: item[0]):
                    with CachedVLA(backbone, policy, **config.fast_path.options(),
                                   env_steps_per_query=env_steps_per_query(config, backbone)) as vla:
                        for record in _records(vla, envs, env, [(e, a) for _, e, a in group], config, video_dir):
                            store.append(record)
                            finished += 1
                            wins += record["success"] is True
                            errors += record["error"] is not None
                            bar.set_postfix(policy=policy.label, success=f"{wins}/{finished}", errors=errors)
                            bar.update()
            finally:
                bar.close()
    finally:
        for one in [env, *envs]:
            one.close()
    if world != 1:
        return []  # launch() reports once every rank is done
    return report(out, policies)


def env_steps_per_query(config: ExperimentConfig, backbone) -> int:
    """The cadence: env steps between two queries, the executed part of each predicted chunk."""
    return min(config.execute_chunk or backbone.action_chunk, backbone.action_chunk)


def task_batches(episodes: list[EpisodeSpec], size: int) -> list[list[EpisodeSpec]]:
    """The episodes in batches of at most `size` of one task each (a batch shares one instruction)."""
    by_task: dict[str, list[EpisodeSpec]] = {}
    for episode in episodes:
        by_task.setdefault(episode.task, []).append(episode)
    return [same[i : i + size] for same in by_task.values() for i in range(0, len(same), size)]


def _records(vla: CachedVLA, envs: list[Env], env: Env, work: list[tuple[EpisodeSpec, int]], config: ExperimentConfig,
             video_dir: Path | None) -> Iterator[dict]:
    """One policy's episodes: one at a time, or with batch_envs > 1 in batches of episodes of one task (a batch
    shares one prompt length), each batch run until all of its episodes ended."""
    if config.batch_envs == 1:
        for episode, attempt in work:
            yield run_episode(vla, env, episode, config, video_dir, attempt)
        return
    attempt = {episode.key: a for episode, a in work}
    for batch in task_batches([episode for episode, _ in work], config.batch_envs):
        yield from run_batch(vla, [env, *envs], [(e, attempt[e.key]) for e in batch], config, video_dir)


def report(out: Path, policies: list[CachePolicy]) -> list[dict]:
    """Merge every rank's JSONL and write summary.md, summary.csv and summary.png. Each row says whether its
    policy is meant to reuse K/V (`reuses`: cache enabled, not a pruner)."""
    records = load_records(result_files(out))
    suites, rows = summarize(records, [p.label for p in policies])
    reuses = {p.label: p.enabled and not p.prunes for p in policies}
    for row in rows:
        row["reuses"] = reuses.get(row["policy"])
    write_tables(out, suites, rows)
    write_plots(out, rows)
    return rows


SHARD_WAIT = timedelta(days=7)  # how long a finished rank waits for the others


def launch(config: ExperimentConfig, progress: bool = True, restart: bool = False,
           verify_code_change: bool = False) -> list[dict]:
    """Run on one process, or shard over Lightning Fabric processes (devices x num_nodes). The process that
    claims the output dir hands its run token to the processes Fabric starts, so they join its lock. The config
    is checked and its policies built once here (`claim_output` checks it before anything else)."""
    launcher = config.launcher
    world = launcher.devices * launcher.num_nodes
    if world <= 1:
        return run_experiment(config, progress, restart, verify_code_change)
    with claim_output(config, restart, world, verify_code_change) as lock:
        from lightning.fabric import Fabric

        from lightning.fabric.strategies import DDPStrategy

        # A rank whose share is done waits at the barrier below for the slowest one; torch's default 30 minutes
        # is shorter than a share of a closed-loop sweep can differ. A rank that dies closes its connection, which
        # ends the wait at once, so a long timeout does not turn a crash into a hang.
        fabric = Fabric(accelerator=launcher.accelerator, devices=launcher.devices, num_nodes=launcher.num_nodes,
                        strategy=DDPStrategy(timeout=SHARD_WAIT))
        previous = os.environ.get("VLACACHE_RUN_TOKEN")
        os.environ["VLACACHE_RUN_TOKEN"] = lock.token
        try:
            fabric.launch()
        finally:
            if previous is None:
                os.environ.pop("VLACACHE_RUN_TOKEN", None)
            else:
                os.environ["VLACACHE_RUN_TOKEN"] = previous
        fabric.barrier()  # every rank starts after the lock holder has prepared the directory
        threads = use_threads(config.threads, launcher.devices)
        if fabric.global_rank == 0:
            announce(config, threads, world)
        if fabric.device.type == "cuda":
            config.backbone = {**config.backbone, "device": str(fabric.device)}
        policies = [build_policy(spec) for spec in config.policies]
        run_shard(config, progress and fabric.global_rank == 0, fabric.global_rank, fabric.world_size, policies)
        fabric.barrier()
        rows = report(Path(config.output_dir), policies) if fabric.global_rank == 0 else []
        fabric.barrier()  # the lock holder may be any rank: it releases only once the report is written
        return rows
