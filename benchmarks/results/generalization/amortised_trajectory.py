"""Plot and tabulate the d trajectory of every-step TRAM-x against radius_every=4.

    python benchmarks/results/generalization/amortised_trajectory.py RUNS OUT TITLE

reads ``RUNS/radius_every{1,4}/seed*/results.json`` (each with ``radius_per_step``, the d of
every optimizer step) and writes ``OUT/trajectory.png`` and ``OUT/trajectory.txt``, pairing the
two runs of each seed. Used for ``cross_domain/amortised/`` (runs in its ``trajectory/``) and
``amortised_cross_lingual/`` (runs in its ``results/``).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def load(runs_dir: Path, every: int) -> dict[int, list[float]]:
    runs = {}
    for path in sorted((runs_dir / f"radius_every{every}").glob("seed*/results.json")):
        results = json.loads(path.read_text())
        runs[int(results["seed"])] = [float(v) for v in results["radius_per_step"]]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="the folder of radius_every1/ and radius_every4/")
    parser.add_argument("out", type=Path, help="where trajectory.png and trajectory.txt go")
    parser.add_argument("title", help="the task, for the plot titles")
    args = parser.parse_args()
    every_step, amortised = load(args.runs, 1), load(args.runs, 4)
    seeds = sorted(set(every_step) & set(amortised))
    figure, axes = plt.subplots(1, len(seeds), figsize=(5 * len(seeds), 3.5), squeeze=False)
    lines = [
        "seed  steps  mean d (every step)  mean d (every 4th)  median |relative gap|"
        "  median |step-to-step change|"
    ]
    for axis, seed in zip(axes[0], seeds, strict=True):
        full, reused = every_step[seed], amortised[seed]
        axis.plot(range(1, len(full) + 1), full, label="every step")
        axis.step(range(1, len(reused) + 1), reused, where="post", label="radius_every=4")
        axis.set_yscale("log")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("d (forward KL)")
        axis.set_title(f"TRAM-x, {args.title}, seed {seed}")
        axis.legend()
        # How far the reused d is from the d measured at the same step of the every-step run,
        # next to how far every-step d moves from one step to the next by itself.
        gaps = sorted(abs(r - f) / f for f, r in zip(full, reused, strict=True) if f > 0)
        changes = sorted(abs(b - a) / b for a, b in itertools.pairwise(full) if b > 0)
        lines.append(
            f"{seed:>4}  {len(full):>5}  {sum(full) / len(full):>19.4f}  "
            f"{sum(reused) / len(reused):>18.4f}  {gaps[len(gaps) // 2]:>21.2f}"
            f"  {changes[len(changes) // 2]:>29.2f}"
        )
    figure.tight_layout()
    figure.savefig(args.out / "trajectory.png", dpi=120)
    (args.out / "trajectory.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
