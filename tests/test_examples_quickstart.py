"""examples/quickstart.py runs, prints a falling loss and exits 0."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"^step\s+(\d+)\s+loss ([0-9.]+)\s+ascent_norm ([0-9.]+)$", re.MULTILINE)
SUMMARY = re.compile(r"first ([0-9.]+)\s+final ([0-9.]+)")
ACCURACY = re.compile(r"accuracy (before|after) fine-tuning: ([0-9.]+)")


def test_quickstart_runs_and_the_loss_falls() -> None:
    # One thread: the model is tiny, and on a busy CI machine thread contention costs more
    # than it gives.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    steps = [
        (int(s), float(loss), float(norm)) for s, loss, norm in STEP_LINE.findall(result.stdout)
    ]
    assert len(steps) >= 4, result.stdout
    assert [s for s, _, _ in steps] == sorted(s for s, _, _ in steps)
    first_loss, final_loss = steps[0][1], steps[-1][1]
    assert final_loss < first_loss, result.stdout
    # The ascent really happened: SAM's ‖g‖ is positive and finite.
    assert all(0.0 < norm < float("inf") for _, _, norm in steps)

    summary = SUMMARY.search(result.stdout)
    assert summary is not None, result.stdout
    first, final = map(float, summary.groups())
    assert first == first_loss
    assert final == final_loss
    assert final < 0.5 * first

    accuracy = dict(ACCURACY.findall(result.stdout))
    assert float(accuracy["after"]) > float(accuracy["before"])
