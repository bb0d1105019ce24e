"""`vlacache run`: every policy of an experiment over the env's episodes, resumable, sharded, reported.

Each finished episode is appended at once to a JSONL file; a re-run of the same command skips what is there;
Ctrl-C loses at most the running episode; an exception inside one episode is recorded as that episode's error
and the run goes on. With `launcher.devices` x `launcher.num_nodes` > 1, Lightning Fabric starts one process
per device, each takes every n-th episode and writes its own JSONL; rank 0 merges them and writes the report.
"""

from __future__ import annotations

import time
import traceback
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .env import Env, EpisodeSpec
from .experiment import ExperimentConfig, build_backbone, build_env, build_policy
from .report import LATENCY_PARTS, summarize, write_plots, write_tables
from .results import ResultStore, load_records, record_key
from .runtime import CachedVLA
from .types import StepStats


def episode_record(policy: str, episode: EpisodeSpec, steps: list[StepStats], **extra: Any) -> dict[str, Any]:
    """One JSONL line: the episode, its outcome and its per-query statistics (means, p50, p95)."""
    latency = {}
    for part in LATENCY_PARTS + ("total",):
        values = np.array([s.latency_ms[part] for s in steps]) if steps else np.array([np.nan])
        latency[part] = {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95))}
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
        **extra,
    }


def run_episode(vla: CachedVLA, env: Env, episode: EpisodeSpec, config: ExperimentConfig, video_dir: Path | None) -> dict:
    """Roll one episode out; any exception becomes the record's `error` (KeyboardInterrupt propagates)."""
    steps: list[StepStats] = []
    env_steps, success, error, frames = 0, None, None, []
    start = time.perf_counter()
    try:
        vla.reset()
        obs = env.reset(episode)
        limit = config.max_steps or env.max_steps
        done, info = False, {}
        while not done and env_steps < limit:
            if video_dir is not None:
                frames.append(np.asarray(obs.images["primary"]))
            result = vla.predict(obs)
            steps.append(result.stats)
            chunk = result.actions[0]
            for action in chunk[: config.execute_chunk or len(chunk)]:
                obs, _, done, info = env.step(action)
                env_steps += 1
                if done or env_steps >= limit:
                    break
        success = info.get("success")
        success = None if success is None else bool(success)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # recorded, never silent: the report counts errors per policy
        error = f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_exc(limit=6))
    if video_dir is not None and frames:
        save_gif(video_dir / f"{vla.policy.label}__{episode.key.replace('|', '_').replace('/', '-')}.gif", frames)
    return episode_record(
        vla.policy.label, episode, steps, success=success, env_steps=env_steps, error=error,
        wall_s=time.perf_counter() - start,
    )


def save_gif(path: Path, frames: list[np.ndarray]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)


def run_experiment(config: ExperimentConfig, progress: bool = True, rank: int = 0, world: int = 1) -> list[dict]:
    """Run (or resume) the experiment's share of episodes for this rank; return summary rows on rank 0."""
    out = Path(config.output_dir)
    store = ResultStore(out / ("episodes.jsonl" if world == 1 else f"episodes.rank{rank}.jsonl"))
    policies = [build_policy(spec) for spec in config.policies]
    labels = [p.label for p in policies]
    if len(set(labels)) != len(labels):
        raise ValueError(f"policy labels must be unique, got {labels}; set `label:` in the policy configs")
    env = build_env(config.env, config.perturbation)
    episodes = env.episodes()[: config.episodes]
    work = [(p, e) for p in policies for e in episodes][rank::world]
    done = {k for k in (record_key(r) for r in load_records(out.glob("episodes*.jsonl")))}
    todo = [(p, e) for p, e in work if f"{p.label}::{e.key}" not in done]
    if todo:
        backbone = build_backbone(config.backbone)
        video_dir = out / "videos" if config.videos else None
        bar = tqdm(total=len(todo), desc=f"{config.name}" + (f" [rank {rank}]" if world > 1 else ""),
                   disable=not progress, unit="episode")
        wins = finished = 0
        try:
            for policy, group in groupby(todo, key=lambda item: item[0]):
                with CachedVLA(backbone, policy) as vla:
                    for _, episode in group:
                        record = run_episode(vla, env, episode, config, video_dir)
                        store.append(record)
                        finished += 1
                        wins += bool(record["success"])
                        bar.set_postfix(policy=policy.label, success=f"{wins}/{finished}", errors=record["error"] is not None)
                        bar.update()
        finally:
            bar.close()
            env.close()
    else:
        env.close()
    if rank != 0:
        return []
    return report(out, labels)


def report(out: Path, labels: list[str]) -> list[dict]:
    """Merge every rank's JSONL and write summary.md, summary.csv and summary.png."""
    records = load_records(sorted(out.glob("episodes*.jsonl")))
    suites, rows = summarize(records, labels)
    write_tables(out, suites, rows)
    write_plots(out, rows)
    return rows


def launch(config: ExperimentConfig, progress: bool = True) -> list[dict]:
    """Run on one process, or shard over Lightning Fabric processes (devices x num_nodes)."""
    launcher = config.launcher
    if launcher.devices * launcher.num_nodes <= 1:
        return run_experiment(config, progress)
    from lightning.fabric import Fabric

    accelerator = launcher.accelerator
    fabric = Fabric(accelerator=accelerator, devices=launcher.devices, num_nodes=launcher.num_nodes, strategy="ddp")
    fabric.launch()
    if fabric.device.type == "cuda":
        config.backbone = {**config.backbone, "device": str(fabric.device)}
    run_experiment(config, progress and fabric.global_rank == 0, fabric.global_rank, fabric.world_size)
    fabric.barrier()
    if fabric.global_rank == 0:
        return report(Path(config.output_dir), [build_policy(s).label for s in config.policies])
    return []


def print_summary(rows: list[dict], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from .report import _fmt, table_columns

    suites = sorted({k.split("/", 1)[1] for row in rows for k in row if k.startswith("success/") and k != "success/mean"})
    cols = table_columns(suites)
    table = Table(title="vlacache run: per policy (means over queries)")
    for _, title, _ in cols:
        table.add_column(title, justify="left" if title == "policy" else "right")
    for row in rows:
        table.add_row(*[_fmt(row.get(key), kind) for key, _, kind in cols])
    console = console or Console()
    if console.width < 170:
        console = Console(width=170)
    console.print(table)
    if any(row["reuse_ratio"] == 0 for row in rows if row["policy"] != "no-cache"):
        console.print(
            "Note: a policy with 0% reuse found nothing it judged safe to reuse. With random weights (the tiny\n"
            "presets) attention entropy does not fall with depth, so the entropy-adaptive schedule of vla-cache\n"
            "reuses nothing; trained checkpoints behave as in the paper. See docs/ARCHITECTURE.md."
        )
