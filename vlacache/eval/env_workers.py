"""Envs in worker processes: with `batch_envs` > 1 (and `env_workers: true`, the default) each env of a batch of
episodes lives in its own process, and the runner starts every env's chunk of actions before collecting any, so
B simulators step at once (on as many cores as there are) while the model runs one batch.

A worker builds its env from the same config as an in-process one (the env's registering module is imported
first, so plug-in envs work too), answers one request at a time over a pipe and returns exceptions as their
traceback text. A worker that dies is reported with its exit code; the caller never waits on a dead process.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import traceback
from typing import Any, Mapping

import numpy as np

from ..env import Env, EpisodeSpec
from ..types import Observation

POLL_S = 1.0


class EnvWorkerError(RuntimeError):
    """The env in a worker process raised (the message carries its traceback) or the worker died."""


def _serve(conn, spec: Any, perturbation: Any, modules: list[str]) -> None:
    from ..experiment import build_env

    try:
        for module in modules:
            importlib.import_module(module)
        env = build_env(spec, perturbation)
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    handlers = {
        "episodes": env.episodes,
        "reset": lambda episode: (env.reset(episode), env.max_steps),
        "step": env.step,
        "run_actions": env.run_actions,
    }
    while True:
        method, args = conn.recv()
        if method == "close":
            env.close()
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", handlers[method](*args)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


def _registering_modules(spec: Any, perturbation: Any) -> list[str]:
    """The modules that define the env (and perturbation) classes, for the worker to import before building."""
    from ..config import resolve_component
    from ..registry import ENVS, PERTURBATIONS

    classes = [resolve_component(ENVS, spec, "env")[0]]
    if perturbation:
        classes.append(resolve_component(PERTURBATIONS, perturbation, "perturbation")[0])
    return [c.__module__ for c in classes if c.__module__ != "__main__"]


class WorkerEnv(Env):
    """An env built and stepped in its own process (spawned); `start_actions` returns at once."""

    def __init__(self, spec: Mapping[str, Any] | str, perturbation: Mapping[str, Any] | None = None,
                 wait: bool = True) -> None:
        context = mp.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, spec, perturbation, _registering_modules(spec, perturbation)),
                                        daemon=True, name="vlacache-env-worker")
        self._process.start()
        child.close()
        self._ready = False
        self._closed = False
        if wait:
            self.wait_ready()

    def wait_ready(self) -> "WorkerEnv":
        if not self._ready:
            self._receive("building the env")
            self._ready = True
        return self

    def _receive(self, what: str) -> Any:
        while not self._conn.poll(POLL_S):
            if not self._process.is_alive():
                raise self._died(what)
        try:
            status, value = self._conn.recv()
        except EOFError:  # the process ended and its end of the pipe with it
            self._process.join(timeout=POLL_S)
            raise self._died(what) from None
        if status == "error":
            raise EnvWorkerError(f"the env in its worker process raised while {what}:\n{value}")
        return value

    def _died(self, what: str) -> EnvWorkerError:
        return EnvWorkerError(f"the env worker process died (exit code {self._process.exitcode}) while {what}; run "
                              "with env_workers=false to see the env's own error in this process")

    def _call(self, method: str, *args: Any) -> Any:
        self._conn.send((method, args))
        return self._receive(method)

    def episodes(self) -> list[EpisodeSpec]:
        return self._call("episodes")

    def reset(self, episode: EpisodeSpec | None = None) -> Observation:
        obs, self.max_steps = self._call("reset", episode)
        return obs

    def step(self, action: np.ndarray) -> tuple[Observation, float, bool, dict[str, Any]]:
        return self._call("step", action)

    def run_actions(self, actions: np.ndarray, budget: int) -> tuple[Observation, bool, dict[str, Any], int]:
        return self._call("run_actions", actions, budget)

    def start_actions(self, actions: np.ndarray, budget: int) -> None:
        self._conn.send(("run_actions", (actions, budget)))

    def finish_actions(self) -> tuple[Observation, bool, dict[str, Any], int]:
        return self._receive("running actions")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._process.is_alive():
                self._conn.send(("close", ()))
                self._receive("closing")
        except (EnvWorkerError, OSError):
            pass  # closing: a worker that already failed has nothing left to release
        finally:
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
            self._conn.close()


def start_workers(count: int, spec: Mapping[str, Any] | str, perturbation: Mapping[str, Any] | None = None) -> list[WorkerEnv]:
    """`count` worker envs, built in parallel (each simulator's start-up overlaps the others')."""
    workers = [WorkerEnv(spec, perturbation, wait=False) for _ in range(count)]
    try:
        return [worker.wait_ready() for worker in workers]
    except BaseException:
        for worker in workers:
            worker.close()
        raise
