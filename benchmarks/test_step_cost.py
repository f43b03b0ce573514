"""Step cost of every method: time of one optimizer step, and memory over the base AdamW.

Run with ``make bench``; see ``benchmarks/README.md``. The machinery is in ``conftest.py``; the
summary, ratios and targets in ``report.py``.
"""

from __future__ import annotations

from typing import Any


def test_step_time(benchmark: Any, step_cost: Any, model_name: str, method: str, block: int):
    """One full optimizer step (both passes, the reference forward included)."""
    runner = step_cost.runner(model_name, method)
    benchmark.group = f"step time: {model_name}"
    benchmark.extra_info.update(
        kind="time",
        model=model_name,
        method=method,
        block=block,
        steps_per_round=runner.steps_per_call,
    )
    first = len(runner.cpu_times)
    benchmark.pedantic(runner.run, rounds=step_cost.rounds, iterations=1)
    # pytest-benchmark keeps the wall-clock times; the process CPU time of the same rounds too.
    benchmark.extra_info["cpu_s"] = runner.cpu_times[first:]
    benchmark.extra_info["wall_s"] = runner.wall_times[first:]
    if runner.device_times:  # CUDA: the CUDA-event time of the same rounds
        benchmark.extra_info["device_s"] = runner.device_times[first:]


def test_step_memory(benchmark: Any, step_cost: Any, model_name: str, method: str):
    """Held, peak and per-step allocations; the time recorded here is of the traced step."""
    benchmark.group = f"memory (traced, times not comparable): {model_name}"
    result = benchmark.pedantic(
        step_cost.measure_memory, args=(model_name, method), rounds=1, iterations=1
    )
    benchmark.extra_info.update(result)
    allocations = result["allocations"]
    if result["method"] != "peer_sam" and allocations is not None:
        assert allocations["wrapper_large"] == [], (
            f"{method} allocates in its own code after the first step: "
            f"{allocations['wrapper_large']}"
        )
