"""Plot and tabulate the d trajectory of every-step TRAM-x against amortised TRAM-x.

    python benchmarks/results/generalization/amortised_trajectory.py RUNS OUT TITLE

reads ``RUNS/radius_every{K}/seed*/results.json`` (each with ``radius_per_step``, the d of
every optimizer step) for K = 1 and every K > 1 on disk, and writes ``OUT/trajectory.png`` and
``OUT/trajectory.txt``, pairing the runs of each seed. Used for ``cross_domain/amortised/`` (runs
in its ``trajectory/``) and ``amortised_cross_lingual/`` (runs in its ``results/``).

Two gaps are tabulated per amortised run, both as the median of |reused − measured| / measured:

- *run gap*: the d the amortised run used at step t against the d the every-step run measured
  at step t. It mixes the reuse with the drift of two runs whose weights part after step 1.
- *reuse gap*: within the every-step run alone, on the steps that reuse d, d_{K⌊(t−1)/K⌋+1} (the
  last measured step's d, as ``radius_every=K`` would reuse it) against d_t. The reuse's own
  error, without the drift.

Beside them, every-step d's own median step-to-step change |d_t − d_{t−1}| / d_t. A second
table gives the reuse gap of each every-step trajectory for K = 2, 4, 8, 16, whether or not a
run with that K exists.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

REUSE_GAP_K = (2, 4, 8, 16)


def load(runs_dir: Path, every: int) -> dict[int, list[float]]:
    runs = {}
    for path in sorted((runs_dir / f"radius_every{every}").glob("seed*/results.json")):
        results = json.loads(path.read_text())
        runs[int(results["seed"])] = [float(v) for v in results["radius_per_step"]]
    return runs


def amortised_values(runs_dir: Path) -> list[int]:
    """The K > 1 of the ``radius_every{K}`` folders in ``runs_dir``, ascending."""
    values = [int(p.name.removeprefix("radius_every")) for p in runs_dir.glob("radius_every*")]
    return sorted(k for k in values if k > 1)


def median_relative_gap(used: list[float], measured: list[float]) -> float:
    return statistics.median(abs(u - m) / m for u, m in zip(used, measured, strict=True) if m > 0)


def reuse_gap(full: list[float], every: int) -> float:
    """The median relative gap of the d that ``radius_every=every`` would have reused to the d
    measured at the same step, over the steps of the every-step trajectory that reuse."""
    steps = [step for step in range(len(full)) if step % every]
    last_measured = [full[(step // every) * every] for step in steps]
    return median_relative_gap(last_measured, [full[step] for step in steps])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="the folder of the radius_every{K}/ folders")
    parser.add_argument("out", type=Path, help="where trajectory.png and trajectory.txt go")
    parser.add_argument("title", help="the task, for the plot titles")
    args = parser.parse_args()
    every_step = load(args.runs, 1)
    amortised = {k: load(args.runs, k) for k in amortised_values(args.runs)}
    seeds = sorted(seed for seed in every_step if any(seed in runs for runs in amortised.values()))
    figure, axes = plt.subplots(1, len(seeds), figsize=(5 * len(seeds), 3.5), squeeze=False)
    lines = [
        "seed  K  steps  mean d (every step)  mean d (every K-th)  median run gap"
        "  median reuse gap  median step-to-step change"
    ]
    for axis, seed in zip(axes[0], seeds, strict=True):
        full = every_step[seed]
        axis.plot(range(1, len(full) + 1), full, label="every step")
        changes = statistics.median(abs(b - a) / b for a, b in itertools.pairwise(full) if b > 0)
        for every, runs in amortised.items():
            if seed not in runs:
                continue
            used = runs[seed]
            axis.step(range(1, len(used) + 1), used, where="post", label=f"radius_every={every}")
            lines.append(
                f"{seed:>4}  {every}  {len(full):>5}  {statistics.fmean(full):>19.4f}  "
                f"{statistics.fmean(used):>19.4f}  {median_relative_gap(used, full):>14.2f}"
                f"  {reuse_gap(full, every):>16.2f}  {changes:>26.2f}"
            )
        axis.set_yscale("log")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("d (forward KL)")
        axis.set_title(f"TRAM-x, {args.title}, seed {seed}")
        axis.legend()
    lines += ["", "seed  reuse gap by K: " + "  ".join(f"K = {k:<2}" for k in REUSE_GAP_K)]
    for seed in sorted(every_step):
        gaps = "  ".join(f"{reuse_gap(every_step[seed], k):>6.2f}" for k in REUSE_GAP_K)
        lines.append(f"{seed:>4}  {'':>15}  {gaps}")
    figure.tight_layout()
    figure.savefig(args.out / "trajectory.png", dpi=120)
    (args.out / "trajectory.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
