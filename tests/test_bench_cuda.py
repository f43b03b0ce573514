"""The CPU-checkable parts of the step-cost benchmark's CUDA path (``benchmarks/step_timing.py``,
``benchmarks/cuda.sh``, the clock of ``benchmarks/report.py``): a GPU run cannot happen here, so
what decides it is tested without one."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"tram_bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_devices_get_the_cuda_event_timer_and_cpu_the_host_clocks() -> None:
    timing = load("step_timing")
    for device in (torch.device("cuda"), torch.device("cuda", 1)):
        timer = timing.step_timer(device)
        assert isinstance(timer, timing.CudaEventTimer)
        assert timer.device == device
        assert "device" in timer.clocks
    host = timing.step_timer(torch.device("cpu"))
    assert type(host) is timing.HostTimer
    assert host.clocks == ("cpu", "wall")
    with pytest.raises(ValueError, match="needs a CUDA device, but got cpu"):
        timing.CudaEventTimer(torch.device("cpu"))


def test_host_timer_measures_the_round() -> None:
    timing = load("step_timing")
    timer = timing.step_timer(torch.device("cpu"))
    timer.start()
    x = torch.randn(256, 256)
    for _ in range(20):
        x = x @ x.T / 256
    times = timer.stop()
    assert set(times) == {"cpu", "wall"}
    assert times["cpu"] > 0
    assert times["wall"] > 0


def test_report_checks_cuda_runs_on_the_cuda_event_clock() -> None:
    report = load("report")
    assert report.primary_clock({"device": "cuda", "torch_threads": 1}) == "device"
    assert report.primary_clock({"device": "cpu", "torch_threads": 1}) == "cpu"
    assert report.primary_clock({"device": "cpu", "torch_threads": 2}) == "wall"
    assert report.primary_clock({"device": "cuda", "clock": "wall"}) == "wall"
    # A CUDA run's rounds carry device_s: the ratios come from them, the wall clock beside.
    run = {
        "step_cost_machine": {"device": "cuda", "torch_threads": 1},
        "benchmarks": [
            {
                "stats": {"data": [wall]},
                "extra_info": {
                    "kind": "time",
                    "model": "small_llama",
                    "method": method,
                    "steps_per_round": 1,
                    "cpu_s": [0.5],
                    "wall_s": [wall],
                    "device_s": [device],
                },
            }
            for method, wall, device in (("adamw", 0.030, 0.010), ("sam", 0.050, 0.019))
        ],
    }
    summary = report.summarize(run)
    assert summary["machine"]["clock"] == "device"
    target = summary["models"]["small_llama"]["targets"][0]
    assert target["target"] == "SAM step / AdamW step"
    assert target["value"] == pytest.approx(1.9)
    assert target["value_wall_clock"] == pytest.approx(0.050 / 0.030)
    assert "CUDA-event time" in report.render_markdown(summary)


def test_lora_model_is_checked_against_its_own_targets() -> None:
    report = load("report")
    names = [t[0] for t in report.targets_for("small_llama_lora")]
    assert "TRAM-x radius_every=4 step / SAM step" in names
    assert dict((t[0], t[4]) for t in report.targets_for("small_llama_lora"))[
        "TRAM-x radius_every=4 step / SAM step"
    ] == pytest.approx(1.15)
    assert report.targets_for("small_llama") is report.TARGETS


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_cuda_script_dry_run_prints_the_plan_without_a_gpu(tmp_path: Path) -> None:
    root = BENCHMARKS.parent
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    out = tmp_path / "cuda-results"
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "cuda.sh"), "--dry-run", "--blocks", "3", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"output:   {out}/" in result.stdout
    assert "3 blocks x 3 rounds" in result.stdout
    assert "--benchmark-only" in result.stdout
    # The selection is valid and selects every row of every model: collected, not run.
    assert "tests collected" in result.stdout
    assert "dry run: nothing was timed" in result.stdout
    assert not out.exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_cuda_script_refuses_a_machine_without_a_gpu_and_bad_arguments() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    bad = subprocess.run(
        ["bash", str(BENCHMARKS / "cuda.sh"), "--blocks"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert bad.returncode != 0
    unknown = subprocess.run(
        ["bash", str(BENCHMARKS / "cuda.sh"), "--fast"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert unknown.returncode == 2
    assert "unknown argument '--fast'" in unknown.stderr
    if torch.cuda.is_available():
        return
    run = subprocess.run(
        ["bash", str(BENCHMARKS / "cuda.sh")], capture_output=True, text=True, env=env, timeout=60
    )
    assert run.returncode == 2
    assert "no GPU" in run.stderr
