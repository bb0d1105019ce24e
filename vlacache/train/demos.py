"""Scripted-expert demonstrations for LIBERO and ManiSkill, recorded as a policy sees them (`record_demos`,
`load_demos`). ManiSkill tasks (env name: simpler, the SIMPLER adapter) are solved by ManiSkill's motion planner
(`vlacache.train.planner`); everything below about LIBERO's expert, noise and placements is LIBERO's.

The expert (vlacache.train.expert) drives the same `LiberoEnv` adapter the evaluation uses, so every stored
observation is exactly a policy's input: the flipped agent view and the wrist camera at `resolution`, the 8-d
proprio and the instruction. The stored action is the expert's CLEAN action for that observation (model
convention: 6 arm values in [-1, 1], gripper 1 = open / 0 = close); with noise on, the executed action differs
(DART), so the data holds the corrections back from the perturbed states.

Output folder:
  <suite>_task<k>_seed<s>.npz   one per SUCCESSFUL episode, a replay recording (envs/replay.py) plus the
                                 actions: image__primary / image__wrist [T, H, W, 3] uint8, proprio [T, 8]
                                 float32, instruction, actions [T, 7] float32, task, seed (ManiSkill:
                                 <task>_seed<s>.npz, the adapter's cameras, proprio = the 9 joint positions)
  index.jsonl                    one line per attempted episode: task, seed, success, steps, file (or null),
                                 wall_s, recoveries (and error, when it raised); appended with fsync
  dataset_statistics.json        OpenVLA / OFT normalisation statistics of the stored episodes
  summary.json                   the expert's success rate per task
  settings.json                  env, expert and noise settings; a resume with other ones is refused
  run.lock                       while a recording runs: a second one into the same folder is refused
Failed expert episodes are counted in the index and the summary, never stored. Re-running the same config
skips every (task, seed) already in the index, except those that raised, which are tried again.
Scenes come from the task's placement sampler (`placement: sampled`), seeds from `first_seed` (100000) on:
evaluation uses LIBERO's shipped initial states, so no demonstration repeats an evaluation episode.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
import warnings
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from vlacache.config import ConfigError, resolve_component, typed
from vlacache.env import EpisodeSpec
from vlacache.types import InputError
from vlacache.envs.replay import IMAGE_PREFIX, save_recording
from vlacache.eval.lock import acquire_lock, run_token
from vlacache.eval.results import ResultStore
from vlacache.registry import ENVS
from vlacache.train.expert import ActionNoise, ExpertConfig, NoiseConfig, PickPlaceExpert

INDEX = "index.jsonl"
INDEX_FIELDS = ("task", "seed", "success", "steps", "file")  # every complete index line holds these
STATISTICS = "dataset_statistics.json"
SUMMARY = "summary.json"
SETTINGS = "settings.json"  # env (seeds and tasks aside), expert and noise: a resume must match them
ARM_DIMS = 6  # normalised action dims (the gripper is not: mask false)
# the SIMPLER adapter's settings under which a stored action converts back into exactly the executed one
PLANNED_ENV = {"control_mode": "pd_ee_delta_pose", "rotation": "none", "gripper": "binarize", "obs_mode": "rgb"}


@dataclass
class DemosConfig:
    """What to record. `env` is an env spec as `vlacache run` takes it (name: libero, ...); without `seeds` in it,
    the seeds are first_seed .. first_seed + episodes_per_task - 1 for every task."""

    env: dict[str, Any] = field(default_factory=lambda: {
        "name": "libero", "suite": "libero_spatial", "placement": "sampled", "resolution": 128})
    episodes_per_task: int = 50
    first_seed: int = 100000
    expert: dict[str, Any] = field(default_factory=dict)  # ExpertConfig overrides
    noise: dict[str, Any] = field(default_factory=lambda: {"sigma": 0.15, "burst_prob": 0.04})  # NoiseConfig; {} = off
    output_dir: str = "demos"
    workers: int = 1

    @property
    def planned(self) -> bool:
        """ManiSkill tasks through the SIMPLER adapter, solved by the motion planner."""
        return self.env.get("name") == "simpler"

    def env_spec(self) -> dict[str, Any]:
        """The env spec with placement and seeds filled in."""
        spec = dict(self.env)
        if spec.get("name") not in ("libero", "simpler"):
            raise ConfigError("demonstrations are recorded in the LIBERO env (name: libero) or in ManiSkill tasks "
                              f"through the SIMPLER adapter (name: simpler), got name: {spec.get('name')}")
        if self.planned:
            for key, value in PLANNED_ENV.items():
                if spec.setdefault(key, value) != value:
                    raise ConfigError(f"motion-planner demonstrations need env.{key}: {value} (the stored actions are "
                                      f"end-effector deltas in the model's convention), got {spec[key]!r}")
        else:
            spec.setdefault("placement", "sampled")
            if spec["placement"] != "sampled":
                raise ConfigError("demonstrations use placement: sampled; the shipped initial states are the evaluation episodes")
        if "seeds" not in spec:
            if self.episodes_per_task < 1:
                raise ConfigError(f"episodes_per_task must be >= 1, got {self.episodes_per_task}")
            spec["seeds"] = list(range(self.first_seed, self.first_seed + self.episodes_per_task))
        return spec

    def check(self) -> "DemosConfig":
        """Fail early, naming the key, on anything the recording would trip over (nothing is built)."""
        spec = self.env_spec()
        resolve_component(ENVS, spec, "env")
        if self.planned:
            from vlacache.train.planner import check_task

            for task in spec.get("task_ids") or []:
                check_task(task)
            if self.noise or self.expert:
                raise ConfigError("the motion planner records its own clean actions: set noise: {} and expert: {} "
                                  "for ManiSkill demonstrations")
        typed(ExpertConfig, self.expert, "the expert config")
        typed(NoiseConfig, self.noise, "the noise config").check()
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        return self


# -- one episode (in a worker process, or in this one) -----------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(env_spec: dict[str, Any], expert: dict[str, Any], noise: dict[str, Any]) -> None:
    cls, env_config = resolve_component(ENVS, env_spec, "env")
    _WORKER.update(make_env=lambda: cls(env_config), envs={})
    if env_spec.get("name") == "simpler":
        from vlacache.train.planner import check_planner

        check_planner()
        _WORKER.update(expert=None)
        return
    _WORKER.update(expert=PickPlaceExpert(typed(ExpertConfig, expert, "the expert config")),
                   noise=typed(NoiseConfig, noise, "the noise config"))


def _worker_env(task: str):
    """The worker's env for `task`: one per task, kept for the worker's life. The episodes come seed-major (every
    task in turn), and an adapter rebuilds its simulator when the task changes (ManiSkill: ~6 s a build)."""
    envs = _WORKER["envs"]
    if task not in envs:
        envs[task] = _WORKER["make_env"]()
    return envs[task]


def _close_worker_envs() -> None:
    for env in _WORKER.pop("envs", {}).values():
        env.close()


def _run_episode(episode: EpisodeSpec) -> dict[str, Any]:
    """Roll the worker's expert out (ManiSkill: the motion planner); the arrays come back only for a success. An
    error (a simulator fault, "screw plan failed") is this episode's outcome: the run goes on."""
    env = _worker_env(episode.task)
    start = time.perf_counter()
    record: dict[str, Any] = {"task": episode.task, "seed": int(episode.seed)}
    try:
        if _WORKER["expert"] is None:
            from vlacache.train.planner import run_planned_episode

            record.update(run_planned_episode(env, episode))
        else:
            record.update(_expert_episode(env, episode))
    except Exception as e:
        steps = env.t if getattr(env, "task_id", None) is not None else 0
        record.update(success=False, steps=steps, error=f"{type(e).__name__}: {e}")
    record["wall_s"] = round(time.perf_counter() - start, 2)
    return record


def _expert_episode(env, episode: EpisodeSpec) -> dict[str, Any]:
    """LIBERO's scripted expert on the privileged state, its executed actions noised (DART)."""
    expert = _WORKER["expert"]
    obs = env.reset(episode)
    expert.reset()
    noise = ActionNoise(_WORKER["noise"], seed=[env.task_index(episode.task), int(episode.seed)])
    frames: dict[str, list[np.ndarray]] = {"primary": [], "wrist": []}
    proprio, actions = [], []
    done, info = False, {"success": False}
    while not done:
        action = expert.act(env.privileged_state())
        for camera, images in frames.items():
            images.append(obs.images[camera])
        proprio.append(obs.proprio)
        actions.append(action)
        obs, _, done, info = env.step(noise(action, expert.phase))
    record: dict[str, Any] = dict(success=bool(info["success"]), steps=len(actions), recoveries=expert.recoveries)
    if record["success"]:
        record["arrays"] = {
            "primary": np.stack(frames["primary"]).astype(np.uint8),
            "wrist": np.stack(frames["wrist"]).astype(np.uint8),
            "proprio": np.stack(proprio).astype(np.float32),
            "actions": np.stack(actions).astype(np.float32),
            "instruction": obs.instruction,
        }
    return record


# -- the recorder ----------------------------------------------------------------------------------------------
def record_demos(config: DemosConfig, progress: bool = True) -> dict[str, Any]:
    """Record every (task, seed) of `config` not yet in the output folder's index; returns the summary."""
    config.check()
    spec = config.env_spec()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cls, env_config = resolve_component(ENVS, spec, "env")
    with acquire_lock(out, run_token()):  # one recording per folder: two would record the same episodes
        return _record(out, config, spec, cls, env_config, progress)


def _record(out: Path, config: DemosConfig, spec: dict, cls, env_config, progress: bool) -> dict[str, Any]:
    suite = getattr(env_config, "suite", None) or "maniskill"
    _claim(out, config)
    done = {(r["task"], r["seed"]) for r in read_index(out) if "error" not in r}
    listing = cls(env_config)  # lists the episodes; builds no simulator
    # seed-major, so that a recording stopped early still covers every task evenly
    pending = sorted((e for e in listing.episodes() if (e.task, e.seed) not in done),
                     key=lambda e: (e.seed, listing.task_index(e.task)))
    listing.close()
    index = ResultStore(out / INDEX, INDEX_FIELDS)  # a line torn by a kill is moved aside first, never glued onto
    bar = tqdm(total=len(pending), desc=f"demos {suite}", unit="ep", disable=not progress)
    stored = 0
    try:
        for n, record in enumerate(_records(pending, spec, config), 1):
            stored += _write(out, index, suite, record)
            bar.update(1)
            bar.set_postfix(stored=stored, success=f"{stored / n:.0%}")
    finally:
        bar.close()
    write_statistics(out, suite)
    summary = summarize(out, suite)
    summary.update(expert=dataclasses.asdict(typed(ExpertConfig, config.expert, "the expert config")),
                   noise=dataclasses.asdict(typed(NoiseConfig, config.noise, "the noise config")), env=spec)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _claim(out: Path, config: DemosConfig) -> None:
    """Write the folder's recording settings, or check that a resume uses the same ones (only seeds may differ)."""
    spec = {k: v for k, v in config.env_spec().items() if k not in ("seeds", "tasks")}
    settings = json.loads(json.dumps({
        "env": dataclasses.asdict(resolve_component(ENVS, spec, "env")[1]) | {"seeds": None, "tasks": None},
        "expert": dataclasses.asdict(typed(ExpertConfig, config.expert, "the expert config")),
        "noise": dataclasses.asdict(typed(NoiseConfig, config.noise, "the noise config")),
    }))
    # a setting added after a folder was recorded reads as its default there, so older folders still resume
    defaults = json.loads(json.dumps({"expert": dataclasses.asdict(ExpertConfig()), "noise": dataclasses.asdict(NoiseConfig())}))
    path = out / SETTINGS
    if path.exists():
        old = json.loads(path.read_text())
        changed = [f"{group}.{key}" for group in settings for key in settings[group]
                   if old.get(group, {}).get(key, defaults.get(group, {}).get(key)) != settings[group][key]]
        if changed:
            raise ConfigError(f"{out} holds demos recorded with other settings ({', '.join(changed)}); "
                             "record into another output_dir")
        return
    path.write_text(json.dumps(settings, indent=2) + "\n")


def _records(pending: list[EpisodeSpec], spec: dict[str, Any], config: DemosConfig) -> Iterator[dict[str, Any]]:
    """Episode records as they finish: in this process for one worker, else in `workers` spawned processes."""
    if not pending:
        return
    args = (spec, config.expert, config.noise)
    if config.workers == 1:
        _init_worker(*args)
        try:
            for episode in pending:
                yield _run_episode(episode)
        finally:
            _close_worker_envs()
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(config.workers, mp_context=context, initializer=_init_worker, initargs=args) as pool:
        futures = [pool.submit(_run_episode, episode) for episode in pending]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _write(out: Path, index: ResultStore, suite: str, record: dict[str, Any]) -> int:
    """Store a success's arrays (atomically), then append its index line; returns 1 if an episode was stored."""
    arrays = record.pop("arrays", None)
    record["file"] = None
    if arrays is not None:
        task = record["task"]
        name = (f"{suite}_task{int(task.rpartition('/')[2])}" if task.rpartition("/")[2].isdigit() else task)
        name = f"{name}_seed{record['seed']}.npz"
        partial = out / f".{name}.partial.npz"
        cameras = {k: v for k, v in arrays.items() if k not in ("proprio", "actions", "instruction")}
        save_recording(partial, cameras, arrays["instruction"],
                       arrays["proprio"], actions=np.asarray(arrays["actions"], dtype=np.float32),
                       task=np.array(record["task"]), seed=np.array(record["seed"], dtype=np.int64))
        os.replace(partial, out / name)
        record["file"] = name
    line = {k: record[k] for k in ("task", "seed", "success", "steps", "file", "wall_s", "recoveries", "error")
            if k in record}
    index.append(line)
    return int(arrays is not None)


def read_index(folder: str | Path) -> list[dict[str, Any]]:
    """Every complete line of a demo folder's index.jsonl (the latest per task and seed); torn lines skipped."""
    path = Path(folder) / INDEX
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    if not path.exists():
        return []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            latest[(record["task"], record["seed"])] = record
        except (json.JSONDecodeError, KeyError, TypeError):
            warnings.warn(f"{path}:{number}: not a complete record (a run killed mid-write?), skipped", stacklevel=2)
    return list(latest.values())


def task_order(task: str) -> tuple:
    """LIBERO tasks ('suite/3') by number, named tasks (ManiSkill's 'PushCube-v1') by name after them."""
    tail = task.rpartition("/")[2]
    return (0, int(tail), "") if tail.isdigit() else (1, 0, task)


# -- statistics and summary ----------------------------------------------------------------------------------
def write_statistics(folder: str | Path, suite: str) -> dict[str, Any]:
    """dataset_statistics.json over every stored episode, in the OpenVLA / OFT layout, keyed by suite."""
    demos = load_demos(folder)
    result = {suite: statistics([demos.load(i, ("actions", "proprio")) for i in range(len(demos))])}
    (Path(folder) / STATISTICS).write_text(json.dumps(result, indent=2) + "\n")
    return result


def statistics(episodes: list[dict[str, Any]]) -> dict[str, Any]:
    """One dataset key's statistics (transitions, trajectories, action and proprio moments) over `episodes`."""
    actions = [e["actions"] for e in episodes]
    proprio = [e["proprio"] for e in episodes]
    stats: dict[str, Any] = {"num_transitions": int(sum(len(a) for a in actions)), "num_trajectories": len(actions)}
    if actions:
        stats["action"] = {**_moments(np.concatenate(actions)), "mask": [True] * ARM_DIMS + [False]}
        stats["proprio"] = _moments(np.concatenate(proprio))
    return stats


def _moments(x: np.ndarray) -> dict[str, list[float]]:
    x = x.astype(np.float64)
    return {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(), "max": x.max(0).tolist(), "min": x.min(0).tolist(),
            "q01": np.quantile(x, 0.01, axis=0).tolist(), "q99": np.quantile(x, 0.99, axis=0).tolist()}


def summarize(folder: str | Path, suite: str) -> dict[str, Any]:
    """The expert's success per task over every attempted episode in the index (an error counts as a failure)."""
    records = read_index(folder)
    per_task: dict[str, dict[str, Any]] = {}
    for task in sorted({r["task"] for r in records}, key=task_order):
        rows = [r for r in records if r["task"] == task]
        wins = [r for r in rows if r["success"]]
        per_task[task] = {
            "attempted": len(rows), "succeeded": len(wins), "success_rate": len(wins) / len(rows),
            "errors": sum("error" in r for r in rows),
            "mean_steps": float(np.mean([r["steps"] for r in wins])) if wins else None,
            "mean_wall_s": float(np.mean([r["wall_s"] for r in rows])),
            "recoveries": int(sum(r.get("recoveries", 0) for r in rows)),
        }
    attempted = sum(t["attempted"] for t in per_task.values())
    succeeded = sum(t["succeeded"] for t in per_task.values())
    return {"suite": suite, "attempted": attempted, "succeeded": succeeded,
            "success_rate": succeeded / attempted if attempted else None, "per_task": per_task}


# -- reading ----------------------------------------------------------------------------------------------------
class DemoSet:
    """A demo folder: `index` (every attempted episode), `episodes` (the stored ones); `demos[i]` loads the i-th
    stored episode's arrays (primary, wrist, proprio, actions, instruction, task, seed; cameras without the
    recording's `image__` prefix) on demand."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not (self.folder / INDEX).exists():
            raise InputError(f"{self.folder} holds no {INDEX}: not a demo folder (`vlacache demos` writes one)")
        self.index = read_index(self.folder)
        self.episodes = sorted((r for r in self.index if r.get("file")),
                               key=lambda r: (task_order(r["task"]), r["seed"]))
        stats = self.folder / STATISTICS
        self.statistics = json.loads(stats.read_text()) if stats.exists() else None

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.load(i)

    def load(self, i: int, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
        """The i-th stored episode's arrays (only `keys`, e.g. ('actions',), to skip decompressing images)."""
        path = self.folder / self.episodes[i]["file"]
        try:
            with np.load(path) as data:
                names = {k.removeprefix(IMAGE_PREFIX): k for k in data.files}
                arrays = {k: data[names[k]] for k in (keys or names)}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            raise InputError(f"demonstration {path} is missing, truncated or corrupt ({error}); record it again with "
                             f"`vlacache demos` into {self.folder} (it resumes), or delete its line from {INDEX}") from None
        for key in ("instruction", "task"):
            if key in arrays:
                arrays[key] = str(arrays[key])
        if "seed" in arrays:
            arrays["seed"] = int(arrays["seed"])
        return arrays

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))


def load_demos(folder: str | Path) -> DemoSet:
    """Open a folder written by `record_demos` (index read now, episode arrays when indexed)."""
    return DemoSet(folder)
