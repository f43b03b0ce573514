"""Paired OOD comparison of amortised TRAM-x (``radius_every=K``) against every-step TRAM-x.

    python benchmarks/results/generalization/amortised_compare.py \
        --every-step DIR --amortised K=DIR [K=DIR ...] [--adamw DIR] [--metric KEY]

Each DIR holds ``seedN/results.json`` of one configuration. Runs are paired by seed (the same
head initialisation and data order); only the seeds every listed configuration has are used.
Prints, per seed, the metric (``--metric``: a key of ``results.json``, by default
``ood_average``, the out-of-domain average accuracy; ``in_domain_validation`` and ``in_domain``
are the others) and the mean d each run used, then the paired differences of the metric (mean,
95% t interval, sd, paired-t p) of each amortised configuration against every step (and of
each against AdamW, given ``--adamw``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from scipy import stats


def load(directory: Path) -> dict[int, dict]:
    return {
        int(path.parent.name.removeprefix("seed")): json.loads(path.read_text())
        for path in directory.glob("seed*/results.json")
    }


def amortised_option(text: str) -> tuple[int, Path]:
    every, _, directory = text.partition("=")
    if not every.isdigit() or not directory:
        raise argparse.ArgumentTypeError(f"expected K=DIR, but got {text!r}")
    return int(every), Path(directory)


def paired(name: str, left: list[float], right: list[float]) -> str:
    differences = [100 * (a - b) for a, b in zip(left, right, strict=True)]
    n = len(differences)
    mean = statistics.fmean(differences)
    if n < 2:
        return f"{name}: {mean:+.2f} points (n = 1)"
    sd = statistics.stdev(differences)
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    p = stats.ttest_1samp(differences, 0.0).pvalue if sd > 0 else float("nan")
    return f"{name}: {mean:+.2f} ± {half:.2f} points (95% CI, n = {n}, sd {sd:.2f}), p = {p:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every-step", type=Path, required=True)
    parser.add_argument("--amortised", type=amortised_option, nargs="+", required=True)
    parser.add_argument("--adamw", type=Path)
    parser.add_argument("--metric", default="ood_average")
    args = parser.parse_args()
    configurations = {"every step": load(args.every_step)}
    for every, directory in args.amortised:
        configurations[f"radius_every={every}"] = load(directory)
    if args.adamw is not None:
        configurations["AdamW"] = load(args.adamw)
    seeds = sorted(set.intersection(*(set(runs) for runs in configurations.values())))
    if not seeds:
        raise SystemExit("no seed has a run of every configuration")
    for seed in seeds:
        cells = []
        for name, runs in configurations.items():
            run = runs[seed]
            radius = (
                f", mean d {run['mean_radius']:.4f}" if run.get("mean_radius") is not None else ""
            )
            cells.append(f"{name} {100 * run[args.metric]:.1f}{radius}")
        label = "OOD" if args.metric == "ood_average" else args.metric
        print(f"seed {seed}: {label} " + "; ".join(cells))
    values = {
        name: [runs[seed][args.metric] for seed in seeds] for name, runs in configurations.items()
    }
    for name in values:
        if name.startswith("radius_every"):
            print(paired(f"{name} - every step", values[name], values["every step"]))
    if "AdamW" in values:
        for name in values:
            if name != "AdamW":
                print(paired(f"{name} - AdamW", values[name], values["AdamW"]))


if __name__ == "__main__":
    main()
