"""Wall-clock split of a control step; on CUDA each section is synchronised and device time recorded."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class StepTimer:
    """Times named sections of one step. With sync=True on CUDA the numbers are honest per section."""

    def __init__(self, device: torch.device, sync: bool = True) -> None:
        self.cuda = device.type == "cuda"
        self.sync = sync and self.cuda
        self.ms: dict[str, float] = {}
        self._start = self._end = None
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)

    def _barrier(self) -> None:
        if self.sync:
            torch.cuda.synchronize()

    @contextmanager
    def section(self, name: str):
        self._barrier()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._barrier()
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1e3

    def start(self) -> None:
        self._barrier()
        self._t0 = time.perf_counter()
        if self.cuda:
            self._start.record()

    def stop(self) -> tuple[float, float | None]:
        """Wall time and (on CUDA) device time of the whole step, in ms."""
        device_ms = None
        if self.cuda:
            self._end.record()
            torch.cuda.synchronize()
            device_ms = self._start.elapsed_time(self._end)
        return (time.perf_counter() - self._t0) * 1e3, device_ms
