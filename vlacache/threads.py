"""How many torch threads a process computes with. Several processes sharing the cores each using torch's default
(one thread per core) oversubscribe them: under load a tiny query took 12x longer than with one thread.

`threads: N` in a run, bench or serve config sets N per process; `null` (the default) means torch's own default
for a single process, and the cores divided among the processes otherwise (what Lightning gives each process)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch


def threads_for(threads: int | None, processes: int = 1) -> int:
    """The thread count `threads` (None: automatic) gives each of `processes` processes on this machine."""
    if threads is not None:
        return threads
    if processes <= 1:
        return torch.get_num_threads()
    return max(1, (os.cpu_count() or 1) // processes)


def use_threads(threads: int | None, processes: int = 1) -> str:
    """Set this process's torch threads; a header line saying what was chosen and why."""
    count = threads_for(threads, processes)
    torch.set_num_threads(count)
    why = "threads=" + str(threads) if threads is not None else (
        "torch's default" if processes <= 1 else f"auto: {os.cpu_count()} cores / {processes} processes")
    return f"{count} torch thread{'s' if count != 1 else ''} per process ({why}; set threads=N)"


@contextmanager
def torch_threads(threads: int | None, processes: int = 1) -> Iterator[str]:
    """`use_threads` for the duration of a run or bench, then the thread count the caller had (a notebook keeps
    its own setting); yields the header line."""
    before = torch.get_num_threads()
    try:
        yield use_threads(threads, processes)
    finally:
        torch.set_num_threads(before)
