"""Paired OOD comparison: TRAM-x with radius_every=4 against round 1's every-step TRAM-x, AdamW.

Run from the repository root:
``python benchmarks/results/generalization/cross_domain/amortised/compare.py``.
The every-step and AdamW runs are round 1's (same budget, seeds, head initialisation and data
order; ``../results/test/``).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from scipy import stats

HERE = Path(__file__).parent
ROUND_1 = HERE.parent / "results" / "test"


def main() -> None:
    rows = []
    seeds = sorted(
        int(p.name.removeprefix("seed")) for p in (HERE / "results" / "tram_x_radius4").iterdir()
    )
    for seed in seeds:
        amortised = json.loads(
            (HERE / "results" / "tram_x_radius4" / f"seed{seed}" / "results.json").read_text()
        )
        every = json.loads((ROUND_1 / "tram_x" / f"seed{seed}" / "results.json").read_text())
        adamw = json.loads((ROUND_1 / "adamw" / f"seed{seed}" / "results.json").read_text())
        rows.append((seed, amortised, every, adamw))
        print(
            f"seed {seed}: OOD {100 * amortised['ood_average']:.1f} (radius_every=4) "
            f"{100 * every['ood_average']:.1f} (every step) "
            f"{100 * adamw['ood_average']:.1f} (AdamW); "
            f"mean measured d {amortised['mean_radius']:.4f} vs {every['mean_radius']:.4f}"
        )
    for name, left, right in (
        ("radius_every=4 - every step", 1, 2),
        ("radius_every=4 - AdamW", 1, 3),
        ("every step - AdamW", 2, 3),
    ):
        differences = [100 * (row[left]["ood_average"] - row[right]["ood_average"]) for row in rows]
        n = len(differences)
        mean = statistics.mean(differences)
        sd = statistics.stdev(differences)
        half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
        p = stats.ttest_1samp(differences, 0.0).pvalue
        print(
            f"{name}: {mean:+.2f} ± {half:.2f} points (95% CI, n = {n}, sd {sd:.2f}), p = {p:.2f}"
        )


if __name__ == "__main__":
    main()
