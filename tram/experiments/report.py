"""Aggregate the results files of a sweep into a Markdown table and a plot.

    tram-report outputs/multirun/<name>/<time> [more dirs or results.json files]
        [--baseline adamw] [--out DIR] [--no-plot]

Every ``results.json`` below the given paths is read (see :mod:`tram.experiments.run`); runs are
grouped by task and model, and within a group by optimizer. For each optimizer the table gives
the in-domain metric, each out-of-domain metric and their average as mean ± the half-width of
the 95% confidence interval over seeds (Student's t, n − 1 degrees of freedom); accuracy is in
percent, perplexity as it is; the best mean of each column is in bold. A second table tests each
optimizer against the baseline (AdamW by default) on the in-domain metric and on the OOD average,
pairing runs by seed: the mean difference, the paired t-test p-value and the Wilcoxon
signed-rank p-value (both two-sided, from scipy; "–" when fewer than two seeds pair up, or
when every difference is zero for Wilcoxon).

How many seeds stand behind the numbers is stated where a reader looks first: in each group's
heading, on the figure and in the closing summary. With one seed per optimizer no interval is
drawn and the report says so ("1 seed: no interval, not evidence of a difference"); with fewer
than :data:`FEW_SEEDS` it says how wide the intervals are.

The report is printed, followed by a short summary, and written to ``<out>/report.md`` with a bar
chart ``<out>/report.png`` (``out`` defaults to the first directory given).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import textwrap
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "FEW_SEEDS",
    "ONE_SEED",
    "ORDER",
    "Group",
    "build_figure",
    "closing_summary",
    "collect",
    "holm",
    "main",
    "paired_differences",
    "paired_tests",
    "plot",
    "render",
    "seed_counts",
    "seed_notes",
    "seeds_label",
    "signed_rank_p",
    "summarize",
]

RESULTS_FILE = "results.json"
ORDER = [
    "adamw",
    "sam",
    "asam",
    "fsam",
    "trpo",
    "r3f",
    "r4f",
    "mesa",
    "tram_theta0",
    "tram_prev",
    "tram_x",
    "tram_fisher",
]
"""Row order: the paper's tables (unknown names follow, sorted)."""

PERCENT_METRICS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "auroc": "AUROC"}
"""Metrics stored as fractions and reported in percent (see :mod:`tram.experiments.metrics`),
with their display names; any other metric (perplexity) is reported as it is."""

OOD_AVG = "OOD avg"
PAIRED_METRICS = ("in-domain", OOD_AVG)
"""The metrics each optimizer is compared with the baseline on: the training domain and the
out-of-domain average."""

ONE_SEED = "1 seed: no interval, not evidence of a difference"
"""What the table, the summary and the figure say where an optimizer has a single seed."""
FEW_SEEDS = 10
"""Below this many seeds the report also states how wide the 95% intervals are, and the t
multiplier behind them (2.26 at 10 seeds, 4.30 at 3, 12.7 at 2)."""


@dataclass
class Group:
    """All runs of one task and model: optimizer -> seed -> results."""

    task: str
    model: str
    metric: str
    higher_is_better: bool
    train_domain: str
    ood_domains: list[str]
    runs: dict[str, dict[int, dict[str, Any]]]

    @property
    def columns(self) -> list[str]:
        return [self.train_domain, *self.ood_domains, OOD_AVG]

    @property
    def optimizers(self) -> list[str]:
        known = [name for name in ORDER if name in self.runs]
        return known + sorted(name for name in self.runs if name not in ORDER)

    def value(self, results: dict[str, Any], column: str) -> float:
        if column == OOD_AVG:
            value = results.get("ood_average")
        else:
            value = results["domains"][column][self.metric]
        value = float("nan") if value is None else float(value)
        return value * 100.0 if self.metric in PERCENT_METRICS else value

    def values(self, optimizer: str, column: str) -> dict[int, float]:
        return {seed: self.value(r, column) for seed, r in self.runs[optimizer].items()}


# ------------------------------------------------------------------------------ reading


def collect(paths: Sequence[str | Path]) -> list[Group]:
    """Read every results file under ``paths`` and group them."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(sorted(path.rglob(RESULTS_FILE)))
        else:
            raise FileNotFoundError(f"{path} does not exist")
    if not files:
        raise FileNotFoundError(f"no {RESULTS_FILE} under {', '.join(map(str, paths))}")
    groups: dict[tuple[str, str], Group] = {}
    mtimes: dict[tuple[str, str, str, int], float] = {}
    for file in files:
        try:
            results = json.loads(file.read_text())
            key = (str(results["task"]), str(results["model"]))
            optimizer, seed = str(results["optimizer"]), int(results["seed"])
            metric = str(results["metric"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{file}: not a tram results file ({error})") from error
        group = groups.get(key)
        if group is None:
            group = groups[key] = Group(
                task=key[0],
                model=key[1],
                metric=metric,
                higher_is_better=bool(results.get("higher_is_better", metric == "accuracy")),
                train_domain=str(results["train_domain"]),
                ood_domains=[str(d) for d in results["ood_domains"]],
                runs=defaultdict(dict),
            )
        elif metric != group.metric or str(results["train_domain"]) != group.train_domain:
            raise ValueError(f"{file}: its metric or training domain differs from the other runs")
        run = (*key, optimizer, seed)
        previous = mtimes.get(run)
        mtime = file.stat().st_mtime
        if previous is not None:
            warnings.warn(
                f"{key[0]}/{key[1]}: several runs of {optimizer} with seed {seed}; using the "
                "newest",
                stacklevel=2,
            )
            if mtime < previous:
                continue
        mtimes[run] = mtime
        group.runs[optimizer][seed] = results
    return [groups[key] for key in sorted(groups)]


# ------------------------------------------------------------------------------ statistics


def mean_ci(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t-interval (None for fewer than two values)."""
    from scipy import stats

    clean = [v for v in values if math.isfinite(v)]
    if not clean:
        return float("nan"), None
    mean = sum(clean) / len(clean)
    if len(clean) < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in clean) / (len(clean) - 1))
    return mean, float(stats.t.ppf(0.975, len(clean) - 1)) * sd / math.sqrt(len(clean))


ROUNDING = 1e-9
"""Relative size (of the largest value compared) below which two paired differences are the same
number: see :func:`_without_rounding`."""


def _without_rounding(diffs: Sequence[float], scale: float) -> list[float]:
    """``diffs`` with float rounding taken out: a magnitude within ``ROUNDING * scale`` of zero is
    zero, and magnitudes within that of the smallest of their run are that value.

    Paired differences of means of accuracies that count the same examples are equal in exact
    arithmetic, but not always in floats (100 * (a/1000 + b/1000 + c/1000) / 3 minus another such
    mean); a rank test would rank such ties as distinct values and a zero as a tiny difference.
    Real differences are far apart: one example of 1,000 is 0.1 point, 1e-7 of the 100 here."""
    tolerance = ROUNDING * max(scale, 1.0)
    snapped = [0.0 if abs(d) <= tolerance else d for d in diffs]
    start: float | None = None
    by_magnitude = sorted((abs(d), i) for i, d in enumerate(snapped) if d != 0.0)
    for magnitude, i in by_magnitude:
        if start is None or magnitude - start > tolerance:
            start = magnitude
        snapped[i] = math.copysign(start, snapped[i])
    return snapped


def signed_rank_p(differences: Sequence[float]) -> float | None:
    """Two-sided p of Wilcoxon's signed-rank test on ``differences``, exact with ties and zeros.

    Zeros are dropped (Wilcoxon's own treatment, SciPy's ``zero_method="wilcox"``); the others
    are ranked by magnitude with tied magnitudes sharing their mean rank; the statistic is the
    sum W of the positive differences' ranks. Under the null hypothesis each sign is + or −
    with probability 1/2 independently, so W's distribution is that of the rank sums of all
    2^n sign patterns: counted exactly here, over doubled ranks (integers, since a mean rank is
    a multiple of 1/2), by adding one rank at a time. The p-value is twice the smaller tail,
    at most 1, as SciPy's exact and permutation methods give. It is exact for every n, where
    SciPy's default switches to the normal approximation with ties above 13 differences, and
    it does not depend on the SciPy release (1.14 and older gave tied ranks the untied exact
    distribution). None when no difference is non-zero.
    """
    from scipy.stats import rankdata

    nonzero = [d for d in differences if d != 0]
    if not nonzero:
        return None
    doubled = [round(2 * r) for r in rankdata([abs(d) for d in nonzero])]
    observed = sum(r for r, d in zip(doubled, nonzero, strict=True) if d > 0)
    counts = [1] + [0] * sum(doubled)  # counts[w]: sign patterns whose doubled W is w
    for rank in doubled:
        counts = [c + (counts[w - rank] if w >= rank else 0) for w, c in enumerate(counts)]
    total = 2 ** len(doubled)
    lower = sum(counts[: observed + 1])
    upper = sum(counts[observed:])
    return min(1.0, 2 * min(lower, upper) / total)


def paired_tests(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """Paired comparison of ``a`` against ``b`` over their common seeds with finite values: the
    mean difference, its 95% CI half-width and sample standard deviation, and the p-values.

    Which differences are zero, equal to each other (ties of the Wilcoxon ranks) or all the same
    (no variance for the t-test) is judged up to float rounding (:func:`_without_rounding`).
    The Wilcoxon p is :func:`signed_rank_p`'s, exact with ties and zeros."""
    from scipy import stats

    seeds = sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s]))
    diffs = [a[s] - b[s] for s in seeds]
    scale = max((max(abs(a[s]), abs(b[s])) for s in seeds), default=1.0)
    exact = _without_rounding(diffs, scale)
    out: dict[str, Any] = {
        "n": len(seeds),
        "diff": None,
        "diff_ci": None,
        "diff_sd": None,
        "t_p": None,
        "wilcoxon_p": None,
    }
    if not diffs:
        return out
    out["diff"], out["diff_ci"] = mean_ci(diffs)
    if len(diffs) < 2:
        return out
    out["diff_sd"] = statistics.stdev(diffs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if any(d != exact[0] for d in exact):
            out["t_p"] = float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)
        elif exact[0] == 0:
            out["t_p"] = 1.0
        else:  # a constant, non-zero difference: no variance, the t statistic is infinite
            out["t_p"] = 0.0
        out["wilcoxon_p"] = signed_rank_p(exact)
    return out


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (Holm, 1979).

    With the m available p-values sorted, p_(1) <= ... <= p_(m), the adjusted value is
    max over j <= i of min(1, (m - j + 1) p_(j)); it controls the family-wise error rate
    without assuming independence. ``None`` (no test) stays ``None`` and is not counted in m.
    """
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(present):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[index] = running
    return adjusted


def summarize(group: Group) -> dict[str, dict[str, tuple[float, float | None]]]:
    """optimizer -> column -> (mean, CI half-width)."""
    return {
        name: {c: mean_ci(list(group.values(name, c).values())) for c in group.columns}
        for name in group.optimizers
    }


# ------------------------------------------------------------------------------ seeds


def seed_counts(group: Group) -> dict[str, int]:
    """optimizer -> number of seeds it was run with, in row order."""
    return {name: len(group.runs[name]) for name in group.optimizers}


def seeds_label(group: Group) -> str:
    """How many seeds each optimizer has: "1 seed per optimizer", "5 seeds per optimizer", or
    "3-5 seeds per optimizer" when they differ."""
    counts = set(seed_counts(group).values())
    low, high = min(counts), max(counts)
    if low == high:
        return f"{low} seed{'s' if low != 1 else ''} per optimizer"
    return f"{low}-{high} seeds per optimizer"


def seed_notes(group: Group, baseline: str = "adamw") -> list[str]:
    """Sentences that say what the seeds can support, most important first.

    Optimizers with one seed get :data:`ONE_SEED`. With two or more the note gives the number
    of seeds and how wide the 95% intervals of the paired out-of-domain difference to
    ``baseline`` came out (the optimizers' own OOD-average intervals when there is no
    baseline), so that a reader knows which differences the sweep cannot resolve; below
    :data:`FEW_SEEDS` it also gives the t multiplier that makes them wide.
    """
    counts = seed_counts(group)
    single = [name for name, n in counts.items() if n == 1]
    notes: list[str] = []
    if len(single) == len(counts):
        return [ONE_SEED]
    if single:
        notes.append(f"{', '.join(single)}: {ONE_SEED}")
    unit = "points" if group.metric in PERCENT_METRICS else group.metric
    differences = paired_differences(group, baseline)
    if differences:  # optimizer -> (pairs, interval of the paired OOD difference)
        intervals = {n: (t[OOD_AVG]["n"], t[OOD_AVG]["diff_ci"]) for n, t in differences.items()}
        what = f"the paired {OOD_AVG} difference to {baseline}"
    else:
        summary = summarize(group)
        intervals = {name: (counts[name], summary[name][OOD_AVG][1]) for name in counts}
        what = f"the {OOD_AVG}"
    drawn = {name: (n, ci) for name, (n, ci) in intervals.items() if ci is not None}
    if not drawn:
        return notes
    pairs = sorted({n for n, _ in drawn.values()})
    widths = [ci for _, ci in drawn.values()]
    digits = 1 if group.metric in PERCENT_METRICS else 2
    narrow, wide = (f"±{w:.{digits}f}" for w in (min(widths), max(widths)))
    span = narrow if narrow == wide else f"{narrow} to {wide}"
    seeds = f"{pairs[0]}" if len(pairs) == 1 else f"{pairs[0]}-{pairs[-1]}"
    if len(pairs) == 1 and pairs[0] < FEW_SEEDS:
        notes.append(f"{seeds} seeds, {_few(pairs[0])}: {span} {unit} on {what}")
        return notes
    notes.append(f"{seeds} seeds: 95% CIs of {span} {unit} on {what}")
    for n in (n for n in pairs if n < FEW_SEEDS):
        names = ", ".join(name for name, (m, _) in drawn.items() if m == n)
        notes.append(f"{names}: {n} seeds, {_few(n)}")
    return notes


def _few(n: int) -> str:
    """What ``n`` seeds do to a 95% t-interval: its multiplier of the standard error."""
    from scipy import stats

    return f"few: wide 95% CIs (t = {float(stats.t.ppf(0.975, n - 1)):.2f} × the standard error)"


# ------------------------------------------------------------------------------ rendering


def _number(value: float | None, digits: int) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    if value is None:
        return "–"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def render(groups: Sequence[Group], baseline: str = "adamw") -> str:
    """The Markdown report of ``groups``."""
    lines: list[str] = []
    for group in groups:
        digits = 1 if group.metric in PERCENT_METRICS else 2
        unit = (
            f"{PERCENT_METRICS[group.metric]}, %"
            if group.metric in PERCENT_METRICS
            else f"{group.metric}, lower is better"
        )
        summary = summarize(group)
        lines += [f"## {group.task} · {group.model} ({unit}), {seeds_label(group)}", ""]
        notes = seed_notes(group, baseline)
        lines += [*(f"**{note}.**" for note in notes), ""] if notes else []
        lines.append(
            f"Trained on **{group.train_domain}**; mean ± 95% CI over seeds (Student's t; "
            "no interval for one seed)."
        )
        lines.append("")
        header = [
            "Optimizer",
            f"{group.train_domain} (in-domain)",
            *group.ood_domains,
            OOD_AVG,
            "Seeds",
            "Train time (s)",
        ]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        # No "best" in bold from single runs: it would read as a winner.
        compared = len(group.optimizers) > 1 and max(seed_counts(group).values()) > 1
        best = {}
        for column in group.columns:
            means = [summary[n][column][0] for n in group.optimizers]
            finite = [m for m in means if math.isfinite(m)]
            if finite:
                best[column] = max(finite) if group.higher_is_better else min(finite)
        for name in group.optimizers:
            cells = [name]
            for column in group.columns:
                mean, ci = summary[name][column]
                cell = _number(mean, digits)
                if ci is not None:
                    cell += f" ± {_number(ci, digits)}"
                if compared and best.get(column) == mean:
                    cell = f"**{cell}**"
                cells.append(cell)
            runs = group.runs[name]
            times = [float(r.get("train_time_s", float("nan"))) for r in runs.values()]
            cells += [str(len(runs)), _number(sum(times) / len(times), 0)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += _tests(group, baseline, digits)
        radius = {
            n: [
                float(r["mean_radius"])
                for r in group.runs[n].values()
                if r.get("mean_radius") is not None
            ]
            for n in group.optimizers
        }
        radius = {n: v for n, v in radius.items() if v}
        if radius:
            parts = [f"{n} {sum(v) / len(v):.3g}" for n, v in radius.items()]
            lines += [f"Mean ascent radius (TRAM's d): {', '.join(parts)}.", ""]
    return "\n".join(lines).rstrip() + "\n"


def _tests(group: Group, baseline: str, digits: int) -> list[str]:
    if baseline not in group.runs:
        return [f"No {baseline} runs: no paired tests.", ""]
    others = [n for n in group.optimizers if n != baseline]
    if not others:
        return []
    tests = paired_differences(group, baseline)
    pairs = max(test["n"] for metrics in tests.values() for test in metrics.values())
    if pairs < 2:
        intro = f"Differences to {baseline} (optimizer − {baseline}) of single runs, {ONE_SEED}:"
    else:
        intro = (
            f"Paired tests against {baseline} over seeds (difference = optimizer − {baseline}, "
            "mean ± 95% CI; two-sided p-values; Holm's adjustment over the "
            f"{len(others)} optimizers compared on the same metric):"
        )
    lines = [
        intro,
        "",
        "| Optimizer | Metric | Difference | Pairs | t-test p | Holm-adjusted t-test p "
        "| Wilcoxon p |",
        "|---|---|---|---|---|---|---|",
    ]
    adjusted: dict[tuple[str, str], float | None] = {}
    for label in PAIRED_METRICS:
        family = [(name, label) for name in others]
        p_values = [tests[name][label]["t_p"] for name, _ in family]
        adjusted.update(zip(family, holm(p_values), strict=True))
    for name in others:
        for label, test in tests[name].items():
            diff = test["diff"]
            text = "–" if diff is None else f"{diff:+.{digits}f}"
            if test["diff_ci"] is not None:
                text += f" ± {_number(test['diff_ci'], digits)}"
            lines.append(
                f"| {name} | {label} | {text} | {test['n']} | {_p(test['t_p'])} | "
                f"{_p(adjusted[name, label])} | {_p(test['wilcoxon_p'])} |"
            )
    lines.append("")
    return lines


def paired_differences(group: Group, baseline: str) -> dict[str, dict[str, Any]]:
    """optimizer -> metric label ("in-domain", "OOD avg") -> :func:`paired_tests` against
    ``baseline``; empty when the group has no ``baseline`` runs."""
    if baseline not in group.runs:
        return {}
    columns = dict(zip(PAIRED_METRICS, (group.train_domain, OOD_AVG), strict=True))
    return {
        name: {
            label: paired_tests(group.values(name, column), group.values(baseline, column))
            for label, column in columns.items()
        }
        for name in group.optimizers
        if name != baseline
    }


def closing_summary(groups: Sequence[Group], baseline: str = "adamw") -> str:
    """The lines printed after the table: per group, how many seeds, what they can support
    (:func:`seed_notes`), and the out-of-domain averages, with the paired differences to
    ``baseline`` and their 95% intervals where there are at least two seeds."""
    lines = ["Summary:"]
    for group in groups:
        digits = 1 if group.metric in PERCENT_METRICS else 2
        notes = seed_notes(group, baseline)
        label = f"{group.task} · {group.model}"
        lines.append(
            f"- {label}: {'; '.join(notes)}." if notes else f"- {label}: {seeds_label(group)}."
        )
        means = summarize(group)
        parts = []
        for name in group.optimizers:
            mean, ci = means[name][OOD_AVG]
            ci_text = "" if ci is None else f" ± {_number(ci, digits)}"
            parts.append(f"{name} {_number(mean, digits)}{ci_text}")
        single = all(n == 1 for n in seed_counts(group).values())
        lines.append(f"  {OOD_AVG}{' (single runs)' if single else ''}: {', '.join(parts)}")
        differences = [
            (name, tests[OOD_AVG])
            for name, tests in paired_differences(group, baseline).items()
            if tests[OOD_AVG]["diff_ci"] is not None
        ]
        if differences:
            parts = [
                f"{name} {test['diff']:+.{digits}f} ± {_number(test['diff_ci'], digits)} "
                f"(n = {test['n']})"
                for name, test in differences
            ]
            lines.append(f"  {OOD_AVG} − {baseline}, paired, 95% CI: {', '.join(parts)}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ figure

_WARNING_COLOR = "darkred"
"""The colour of the seed notes on the figure (written in bold)."""


def build_figure(
    groups: Sequence[Group], *, baseline: str = "adamw", footer: str | None = None
) -> Figure:
    """The report's figure: per group, two panels.

    Left, grouped bars (one per optimizer) per domain, with 95% CI error bars for optimizers
    with two seeds or more and none for a single seed; the title states the number of seeds
    and the notes of :func:`seed_notes` are written at the top of the panel. Right, the paired
    difference to ``baseline`` with its 95% CI (the quantity the tests use: seed-to-seed
    variation shared by both methods cancels in it, so these intervals are narrower than the
    bars' would suggest); a difference from fewer than two pairs is not drawn, and when no
    optimizer has two the panel holds only the note that says why. ``footer`` is written
    under the panels (the main job points to the multi-seed benchmark there).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars_width = max(6.0, 1.3 * max(len(g.columns) for g in groups) + 2)
    fig, axes = plt.subplots(
        len(groups),
        2,
        figsize=(bars_width + 4.5, 4.4 * len(groups) + (0.5 if footer else 0.0)),
        squeeze=False,
        gridspec_kw={"width_ratios": [bars_width, 4.5]},
    )
    for (ax, side), group in zip(axes, groups, strict=True):
        counts = seed_counts(group)
        colors = {name: f"C{i % 10}" for i, name in enumerate(group.optimizers)}
        unit = _bars(ax, group, counts, colors)
        notes = seed_notes(group, baseline)
        interval = "no interval" if max(counts.values()) == 1 else "mean ± 95% CI"
        ax.set_title(f"{group.task} · {group.model}: {interval}, {seeds_label(group)}")
        if notes:
            ax.text(
                0.5,
                0.97,
                "\n".join(line for note in notes for line in textwrap.wrap(note, 70)),
                transform=ax.transAxes,
                ha="center",
                va="top",
                fontsize="medium",
                bbox={"facecolor": "white", "edgecolor": _WARNING_COLOR},
                color=_WARNING_COLOR,
                fontweight="bold",
            )
        _paired(side, group, baseline, unit, colors)
    if footer:
        fig.text(0.01, 0.005, footer, fontsize="small", ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0.0, 0.09 / len(groups) if footer else 0.0, 1.0, 1.0))
    return fig


def _bars(ax: Axes, group: Group, counts: dict[str, int], colors: dict[str, str]) -> str:
    """Draw the grouped bars of ``group``; return the metric's axis label."""
    summary = summarize(group)
    names = group.optimizers
    mixed = len(set(counts.values())) > 1
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        means = [summary[name][c][0] for c in group.columns]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(group.columns))]
        label = f"{name} ({counts[name]} seed{'s' if counts[name] != 1 else ''})" if mixed else name
        if counts[name] < 2:  # one value per bar: nothing to draw an interval from
            ax.bar(xs, means, width, label=label, color=colors[name])
            continue
        errors = [summary[name][c][1] for c in group.columns]
        yerr = [math.nan if e is None else e for e in errors]
        ax.bar(xs, means, width, yerr=yerr, capsize=2, label=label, color=colors[name])
    ax.set_xticks(range(len(group.columns)))
    ax.set_xticklabels([f"{group.train_domain}\n(in-domain)", *group.ood_domains, OOD_AVG])
    unit = (
        f"{PERCENT_METRICS[group.metric]} (%)" if group.metric in PERCENT_METRICS else group.metric
    )
    ax.set_ylabel(unit)
    finite = [
        summary[n][c][0] for n in names for c in group.columns if math.isfinite(summary[n][c][0])
    ]
    tops = [
        mean + (ci or 0.0)
        for n in names
        for mean, ci in (summary[n][c] for c in group.columns)
        if math.isfinite(mean)
    ]
    if finite:
        # The bars and their intervals fill the lower two thirds; the notes and the legend go
        # above them.
        low = max(0.0, min(finite) - 10.0) if group.metric in PERCENT_METRICS else 0.0
        ax.set_ylim(low, low + (max(tops) - low) / 0.66)
    ax.legend(
        fontsize="small",
        ncol=min(len(names), 4),
        loc="upper center",
        bbox_to_anchor=(0.5, 0.8),
        framealpha=0.9,
    )
    ax.grid(axis="y", alpha=0.3)
    return unit


def _paired(side: Axes, group: Group, baseline: str, unit: str, colors: dict[str, str]) -> None:
    """Draw the paired differences to ``baseline`` (those from two pairs or more)."""
    differences = paired_differences(group, baseline)
    rows = [(n, label, test) for n, tests in differences.items() for label, test in tests.items()]
    drawn = [row for row in rows if row[2]["diff_ci"] is not None]
    if not drawn:
        side.set_axis_off()
        if rows:  # there is a baseline, but no difference has an interval
            pairs = max(test["n"] for _, _, test in rows)
            why = ONE_SEED if pairs == 1 else f"no seed in common with {baseline}"
            side.text(
                0.5,
                0.5,
                f"Paired difference to {baseline}: not drawn.\n\n"
                + "\n".join(textwrap.wrap(f"{why}.", 28)),
                transform=side.transAxes,
                ha="center",
                va="center",
                fontsize="medium",
                color=_WARNING_COLOR,
                fontweight="bold",
            )
        return
    pairs = sorted({test["n"] for _, _, test in drawn})
    for y, (name, label, test) in enumerate(rows):
        if test["diff_ci"] is None:
            if test["diff"] is not None:
                side.text(0.0, y, f"  n = {test['n']}: no interval", va="center", fontsize="small")
            continue
        side.errorbar(
            test["diff"],
            y,
            xerr=test["diff_ci"],
            fmt="o" if label == OOD_AVG else "s",
            mfc=colors[name] if label == OOD_AVG else "white",
            color=colors[name],
            capsize=3,
        )
    side.axvline(0.0, color="black", linewidth=0.8)
    side.set_yticks(range(len(rows)))
    side.set_yticklabels([f"{name} {label}" for name, label, _ in rows], fontsize="small")
    side.invert_yaxis()
    side.set_xlabel(f"{unit} − {baseline}, paired by seed")
    n_text = f"{pairs[0]}" if len(pairs) == 1 else f"{pairs[0]}-{pairs[-1]}"
    side.set_title(f"difference to {baseline} ± 95% CI, {n_text} seeds")
    side.grid(axis="x", alpha=0.3)


def plot(
    groups: Sequence[Group], path: Path, *, baseline: str = "adamw", footer: str | None = None
) -> Path:
    """Write :func:`build_figure` to ``path`` (PNG); return ``path``."""
    import matplotlib.pyplot as plt

    fig = build_figure(groups, baseline=baseline, footer=footer)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None, *, footer: str | None = None) -> int:
    """``tram-report``: print the report of the given sweep directories and its
    :func:`closing_summary`, write .md and .png. ``footer`` (not a command-line option: the
    main job's pointer to the multi-seed benchmark) is written under the figure and printed
    last."""
    parser = argparse.ArgumentParser(prog="tram-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="sweep directories or results.json files")
    parser.add_argument(
        "--baseline", default="adamw", help="optimizer the others are tested against"
    )
    parser.add_argument(
        "--out", help="directory for report.md and report.png (default: the first path)"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    try:
        groups = collect(args.paths)
    except (FileNotFoundError, ValueError) as error:
        print(f"tram-report: {error}", file=sys.stderr)
        return 2
    text = render(groups, baseline=args.baseline)
    first = Path(args.paths[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    print(text, end="")
    print(f"\nWritten: {out / 'report.md'}", end="")
    if not args.no_plot:
        png = plot(groups, out / "report.png", baseline=args.baseline, footer=footer)
        print(f", {png}", end="")
    print("\n")
    print(closing_summary(groups, baseline=args.baseline), end="")
    if footer:
        print(f"\n{footer}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
