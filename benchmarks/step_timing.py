"""The clocks of one timed round of the step-cost benchmark, chosen by device.

:func:`step_timer` picks them from the device the model is on:

- every device: the process CPU time (``time.process_time``) and the wall-clock time
  (``time.perf_counter``) of the round;
- CUDA, in addition: the device time between two ``torch.cuda.Event(enable_timing=True)``
  recorded on the current stream before and after the round (``Event.elapsed_time``, after
  ``Event.synchronize``). It is the work the GPU did for the round and is not lengthened by the
  host waiting on other processes; the wall-clock time is taken after a
  ``torch.cuda.synchronize`` so that it covers the kernels too.

CUDA is touched only when a CUDA timer starts, so the choice can be tested on a machine without
a GPU.
"""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["CudaEventTimer", "HostTimer", "step_timer"]


class HostTimer:
    """Process CPU time and wall-clock time of a round, in seconds."""

    clocks: tuple[str, ...] = ("cpu", "wall")

    def __init__(self) -> None:
        self._cpu = self._wall = 0.0

    def start(self) -> None:
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def stop(self) -> dict[str, float]:
        return {
            "cpu": time.process_time() - self._cpu,
            "wall": time.perf_counter() - self._wall,
        }


class CudaEventTimer(HostTimer):
    """:class:`HostTimer` plus the CUDA-event time of the round (``"device"``), in seconds."""

    clocks = ("cpu", "wall", "device")

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        if device.type != "cuda":
            raise ValueError(f"CudaEventTimer needs a CUDA device, but got {device}")
        self.device = device
        self._events: tuple[Any, Any] | None = None

    def start(self) -> None:
        if self._events is None:  # created on first use: constructing the timer needs no GPU
            self._events = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
        torch.cuda.synchronize(self.device)  # nothing of an earlier round runs into this one
        super().start()
        self._events[0].record(torch.cuda.current_stream(self.device))

    def stop(self) -> dict[str, float]:
        assert self._events is not None, "stop() before start()"
        begin, end = self._events
        end.record(torch.cuda.current_stream(self.device))
        end.synchronize()
        torch.cuda.synchronize(self.device)
        times = super().stop()
        times["device"] = begin.elapsed_time(end) / 1000.0  # milliseconds -> seconds
        return times


def step_timer(device: torch.device) -> HostTimer:
    """The timer for rounds on ``device``: CUDA events on CUDA, host clocks elsewhere."""
    if device.type == "cuda":
        return CudaEventTimer(device)
    return HostTimer()
