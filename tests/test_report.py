"""tram-report on fabricated sweep directories."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

scipy_stats = pytest.importorskip("scipy.stats")

from tram.experiments import report  # noqa: E402

OOD = ["amazon", "tweets", "nyt"]


def write_run(
    directory: Path,
    optimizer: str,
    seed: int,
    values: dict[str, float],
    *,
    task: str = "vader_sentiment",
    model: str = "minilm",
    metric: str = "accuracy",
    radius: float | None = None,
) -> None:
    train = next(iter(values))
    ood = [d for d in values if d != train]
    results = {
        "task": task,
        "model": model,
        "optimizer": optimizer,
        "seed": seed,
        "metric": metric,
        "higher_is_better": metric == "accuracy",
        "train_domain": train,
        "ood_domains": ood,
        "domains": {d: {metric: v, "loss": 0.5} for d, v in values.items()},
        "in_domain": values[train],
        "ood_average": sum(values[d] for d in ood) / len(ood),
        "train_time_s": 100.0 + seed,
        "steps": 10,
        "mean_radius": radius,
    }
    run = directory / f"{optimizer}_seed{seed}"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(results))


ACCURACY = {  # optimizer -> per-seed (in-domain, amazon, tweets, nyt)
    "adamw": [(0.80, 0.70, 0.60, 0.75), (0.82, 0.72, 0.61, 0.74), (0.81, 0.69, 0.62, 0.76)],
    "sam": [(0.83, 0.73, 0.64, 0.77), (0.84, 0.74, 0.63, 0.78), (0.82, 0.72, 0.66, 0.77)],
    "tram_x": [(0.84, 0.75, 0.66, 0.79), (0.85, 0.76, 0.65, 0.80), (0.84, 0.74, 0.67, 0.78)],
}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for optimizer, rows in ACCURACY.items():
        for seed, row in enumerate(rows, start=1):
            radius = 0.01 * seed if optimizer == "tram_x" else None
            write_run(root, optimizer, seed, dict(zip(["movies", *OOD], row)), radius=radius)
    return root


def ood_average(row: tuple[float, ...]) -> float:
    return 100 * sum(row[1:]) / 3


def test_collect_groups_by_task_model_and_optimizer(sweep):
    (group,) = report.collect([sweep])
    assert (group.task, group.model, group.metric) == ("vader_sentiment", "minilm", "accuracy")
    assert group.optimizers == ["adamw", "sam", "tram_x"]
    assert group.columns == ["movies", *OOD, "OOD avg"]
    assert sorted(group.runs["sam"]) == [1, 2, 3]


def test_mean_and_confidence_interval(sweep):
    (group,) = report.collect([sweep])
    summary = report.summarize(group)
    values = [ood_average(r) for r in ACCURACY["sam"]]
    mean = sum(values) / 3
    sem = scipy_stats.sem(values)
    half = scipy_stats.t.ppf(0.975, 2) * sem
    got_mean, got_half = summary["sam"]["OOD avg"]
    assert got_mean == pytest.approx(mean)
    assert got_half == pytest.approx(half)
    assert summary["adamw"]["movies"][0] == pytest.approx(81.0)


def test_paired_tests_match_scipy(sweep):
    (group,) = report.collect([sweep])
    a = group.values("tram_x", "OOD avg")
    b = group.values("adamw", "OOD avg")
    test = report.paired_tests(a, b)
    xs, ys = [a[s] for s in (1, 2, 3)], [b[s] for s in (1, 2, 3)]
    assert test["n"] == 3
    assert test["diff"] == pytest.approx(sum(x - y for x, y in zip(xs, ys)) / 3)
    assert test["t_p"] == pytest.approx(scipy_stats.ttest_rel(xs, ys).pvalue)
    assert test["wilcoxon_p"] == pytest.approx(
        scipy_stats.wilcoxon([x - y for x, y in zip(xs, ys)]).pvalue
    )


def test_paired_difference_interval_is_the_t_interval_of_the_differences():
    test = report.paired_tests({1: 2.0, 2: 3.0, 3: 7.0}, {1: 1.0, 2: 1.0, 3: 1.0})
    differences = [1.0, 2.0, 6.0]
    assert test["diff"] == pytest.approx(3.0)
    half = scipy_stats.t.ppf(0.975, 2) * scipy_stats.sem(differences)
    assert test["diff_ci"] == pytest.approx(half)
    assert test["diff_sd"] == pytest.approx(scipy_stats.tstd(differences))


def test_holm_adjustment():
    # Sorted 0.01, 0.03, 0.04 -> 3 x 0.01, 2 x 0.03, max(0.06, 1 x 0.04): monotone step-down.
    assert report.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert report.holm([0.5, None, 0.6]) == [pytest.approx(1.0), None, pytest.approx(1.0)]
    assert report.holm([]) == []


def test_paired_tests_edge_cases():
    assert report.paired_tests({1: 1.0}, {1: 0.5}) == {
        "n": 1,
        "diff": 0.5,
        "diff_ci": None,
        "diff_sd": None,
        "t_p": None,
        "wilcoxon_p": None,
    }
    same = report.paired_tests({1: 1.0, 2: 2.0}, {1: 1.0, 2: 2.0})
    assert same["t_p"] == 1.0
    assert same["wilcoxon_p"] is None
    assert report.paired_tests({1: 1.0}, {2: 1.0})["n"] == 0
    assert report.mean_ci([3.0]) == (3.0, None)


def _brute_force_signed_rank_p(differences: list[float]) -> float:
    """Every sign pattern enumerated: the definition :func:`report.signed_rank_p` counts."""
    import itertools

    nonzero = [d for d in differences if d != 0]
    ranks = scipy_stats.rankdata([abs(d) for d in nonzero])
    observed = sum(r for r, d in zip(ranks, nonzero, strict=True) if d > 0)
    sums = [
        sum(r for r, sign in zip(ranks, signs, strict=True) if sign)
        for signs in itertools.product([False, True], repeat=len(nonzero))
    ]
    lower = sum(w <= observed + 1e-9 for w in sums)
    upper = sum(w >= observed - 1e-9 for w in sums)
    return min(1.0, 2 * min(lower, upper) / len(sums))


@pytest.mark.parametrize("seed", range(6))
def test_the_signed_rank_p_is_exact_with_ties_and_zeros(seed: int) -> None:
    """Against SciPy's exact distribution (no ties), SciPy's permutation test (ties and zeros,
    up to 13 differences: SciPy 1.15's default there) and every sign pattern enumerated (16
    tied differences, where SciPy's default takes the normal approximation)."""
    rng = random.Random(seed)
    untied = [rng.uniform(-3, 2) for _ in range(9 + seed)]
    assert report.signed_rank_p(untied) == pytest.approx(
        scipy_stats.wilcoxon(untied, method="exact").pvalue, rel=1e-12
    )
    tied = [rng.choice([-0.3, -0.1, 0.0, 0.1, 0.2, 0.3, 0.5]) for _ in range(8 + seed)]
    if any(tied):
        permutation = scipy_stats.wilcoxon(tied, method=scipy_stats.PermutationMethod()).pvalue
        assert report.signed_rank_p(tied) == pytest.approx(permutation, rel=1e-12)
    many = [rng.choice([-0.2, 0.0, 0.1, 0.2, 0.4, 0.7]) for _ in range(16)]
    assert report.signed_rank_p(many) == pytest.approx(_brute_force_signed_rank_p(many), rel=1e-12)
    assert report.signed_rank_p([0.0, 0.0]) is None
    assert report.signed_rank_p([0.4]) == 1.0


def test_wilcoxon_ranks_differences_that_are_equal_up_to_float_rounding_as_ties():
    """OOD averages of accuracies on 3 x 1,000 examples, in percent: seeds 3 and 5 differ from
    the baseline by exactly 11/10 point, but the floats differ in the last bits, and ranking
    them as two values gives Wilcoxon p = 0.4375 instead of the exact differences' 0.40625."""
    from fractions import Fraction

    method = [(729, 780, 737), (715, 746, 740), (763, 761, 702), (702, 744, 783)]
    method += [(768, 741, 768), (724, 734, 722)]
    baseline = [(735, 765, 716), (704, 769, 724), (737, 730, 726), (725, 723, 773)]
    baseline += [(742, 759, 743), (790, 759, 770)]

    def ood(counts: tuple[int, int, int]) -> float:  # as the runner: the mean of accuracies
        return 100 * sum(c / 1000 for c in counts) / len(counts)

    a = {seed: ood(c) for seed, c in enumerate(method, start=1)}
    b = {seed: ood(c) for seed, c in enumerate(baseline, start=1)}
    exact = [100 * Fraction(sum(x) - sum(y), 3000) for x, y in zip(method, baseline, strict=True)]
    assert exact[2] == exact[4] == Fraction(11, 10)
    assert a[3] - b[3] != a[5] - b[5]  # not in floats
    test = report.paired_tests(a, b)
    assert test["wilcoxon_p"] == pytest.approx(
        scipy_stats.wilcoxon([float(d) for d in exact]).pvalue, rel=1e-12
    )
    assert test["wilcoxon_p"] == pytest.approx(0.40625)
    # The mean, the interval and the t-test keep the measured values.
    assert test["diff"] == pytest.approx(float(sum(exact) / len(exact)), rel=1e-12)
    assert test["t_p"] == pytest.approx(
        scipy_stats.ttest_rel(list(a.values()), list(b.values())).pvalue
    )
    # A difference of zero up to rounding is a zero: dropped by Wilcoxon, constant for the t-test.
    same = report.paired_tests({1: 0.1 + 0.2, 2: 0.7}, {1: 0.3, 2: 0.7})
    assert same["t_p"] == 1.0
    assert same["wilcoxon_p"] is None
    shifted = report.paired_tests({1: 0.1 + 0.2 + 1.0, 2: 1.7, 3: 2.0}, {1: 0.3, 2: 0.7, 3: 1.0})
    assert shifted["t_p"] == 0.0  # every difference is 1 (up to rounding): no variance


def test_render_markdown(sweep):
    text = report.render(report.collect([sweep]))
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| Optimizer | movies"))
    assert header.split(" | ")[1:6] == ["movies (in-domain)", "amazon", "tweets", "nyt", "OOD avg"]
    row = next(line for line in lines if line.startswith("| tram_x |"))
    mean = sum(ood_average(r) for r in ACCURACY["tram_x"]) / 3
    assert f"**{mean:.1f} ± " in row  # best OOD average in bold
    assert "| sam | OOD avg |" in text
    assert "| tram_x | in-domain |" in text
    assert "Wilcoxon p" in text
    (group,) = report.collect([sweep])
    others = [name for name in group.optimizers if name != "adamw"]
    raw = [
        report.paired_tests(group.values(n, "OOD avg"), group.values("adamw", "OOD avg"))["t_p"]
        for n in others
    ]
    for name, p, adjusted in zip(others, raw, report.holm(raw), strict=True):
        row = next(line for line in lines if line.startswith(f"| {name} | OOD avg |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[4:6] == [f"{p:.3f}", f"{adjusted:.3f}"]
    assert "Mean ascent radius (TRAM's d): tram_x 0.02" in text


def test_main_writes_markdown_and_png(sweep, capsys):
    assert report.main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    assert "| adamw |" in printed
    assert (sweep / "report.md").read_text() in printed
    png = (sweep / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_perplexity_groups(tmp_path):
    root = tmp_path / "lm"
    for optimizer, ppl in (("adamw", (20.0, 30.0, 31.0)), ("tram_prev", (19.0, 28.0, 29.5))):
        for seed, shift in ((1, 0.0), (2, 0.5)):
            write_run(
                root,
                optimizer,
                seed,
                {d: v + shift for d, v in zip(["movies", "amazon", "nyt"], ppl)},
                task="vader_lm",
                model="smollm2",
                metric="perplexity",
            )
    write_run(root / "other", "adamw", 1, {"en": 0.5, "it": 0.4}, task="topics", model="e5")
    groups = report.collect([root])
    assert [(g.task, g.metric) for g in groups] == [
        ("topics", "accuracy"),
        ("vader_lm", "perplexity"),
    ]
    text = report.render(groups)
    assert "perplexity, lower is better" in text
    assert "**29.00 ± 3.18**" in text  # lower is better: tram_prev's OOD average is the best
    assert "| tram_prev | OOD avg | -1.75 ± 0.00 | 2 | <0.001 | <0.001 | 0.500 |" in text
    assert "±0.00 perplexity on the paired OOD avg difference to adamw" in text
    assert report.main([str(root), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.png").is_file()


def test_missing_baseline_and_other_baseline(sweep):
    groups = report.collect([sweep])
    assert "No nosuch runs" in report.render(groups, baseline="nosuch")
    assert "| adamw | OOD avg |" in report.render(groups, baseline="sam")


def test_duplicate_seed_keeps_the_newest(tmp_path):
    write_run(tmp_path / "a", "adamw", 1, {"movies": 0.5, "nyt": 0.4})
    write_run(tmp_path / "b", "adamw", 1, {"movies": 0.9, "nyt": 0.8})
    with pytest.warns(UserWarning, match="several runs of adamw with seed 1"):
        (group,) = report.collect([tmp_path])
    assert len(group.runs["adamw"]) == 1


def test_bad_input(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.json").write_text("{}")
    assert report.main([str(tmp_path)]) == 2
    assert "not a tram results file" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing")]) == 2


def test_nan_values_are_dashes(tmp_path):
    write_run(tmp_path, "adamw", 1, {"movies": math.nan, "nyt": 0.4})
    text = report.render(report.collect([tmp_path]))
    assert "| adamw | – |" in text


def test_paired_differences_cover_every_other_optimizer(sweep):
    (group,) = report.collect([sweep])
    differences = report.paired_differences(group, "adamw")
    assert set(differences) == set(group.optimizers) - {"adamw"}
    expected = report.paired_tests(group.values("sam", "movies"), group.values("adamw", "movies"))
    assert differences["sam"]["in-domain"] == expected
    assert report.paired_differences(group, "no_such_optimizer") == {}


# ------------------------------------------------------------------------------ seeds on the page


matplotlib = pytest.importorskip("matplotlib")
from matplotlib.container import BarContainer, ErrorbarContainer  # noqa: E402


def one_seed_sweep(root: Path) -> Path:
    for optimizer, rows in ACCURACY.items():
        write_run(root, optimizer, 1, dict(zip(["movies", *OOD], rows[0])))
    return root


def errorbars(ax) -> list[ErrorbarContainer]:
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def texts(artist) -> str:
    return "\n".join(t.get_text() for t in artist.texts).replace("\n", " ")


@pytest.fixture
def close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def test_one_seed_report_says_it_is_not_evidence(tmp_path, close_figures):
    (group,) = report.collect([one_seed_sweep(tmp_path)])
    text = report.render([group])
    heading = next(line for line in text.splitlines() if line.startswith("## "))
    assert heading.endswith("1 seed per optimizer")
    assert f"**{report.ONE_SEED}.**" in text
    rows = [line for line in text.splitlines() if line.startswith(("| adamw |", "| tram_x |"))]
    assert rows
    assert not any("±" in row or "**" in row for row in rows)  # no interval, no winner
    assert f"of single runs, {report.ONE_SEED}:" in text
    summary = report.closing_summary([group])
    assert f"vader_sentiment · minilm: {report.ONE_SEED}." in summary
    assert "OOD avg (single runs): adamw " in summary
    assert "paired, 95% CI" not in summary

    fig = report.build_figure([group])
    bars, side = fig.axes
    assert len(bars.containers) == 3  # one BarContainer per optimizer ...
    assert errorbars(bars) == []  # ... and not one error bar, not even of zero width
    assert all(isinstance(c, BarContainer) and c.errorbar is None for c in bars.containers)
    assert report.ONE_SEED in texts(bars)
    assert "no interval, 1 seed per optimizer" in bars.get_title()
    # The paired panel: nothing plotted, only the note.
    assert not side.axison
    assert errorbars(side) == []
    assert len(side.lines) == 0
    assert "Paired difference to adamw: not drawn." in texts(side)
    assert report.ONE_SEED + "." in texts(side)


def test_several_seeds_draw_their_intervals_and_say_how_wide(sweep, close_figures):
    (group,) = report.collect([sweep])
    summary = report.summarize(group)
    fig = report.build_figure([group])
    bars, side = fig.axes
    assert "mean ± 95% CI, 3 seeds per optimizer" in bars.get_title()
    drawn = errorbars(bars)
    assert len(drawn) == 3
    for container, name in zip(drawn, group.optimizers, strict=True):
        (segments,) = container.lines[2]  # the vertical bars, one per column
        half_widths = [abs(s[1][1] - s[0][1]) / 2 for s in segments.get_segments()]
        assert half_widths == pytest.approx([summary[name][c][1] for c in group.columns])
    # Paired panel: sam and tram_x, in-domain and OOD average, each with its paired interval.
    differences = report.paired_differences(group, "adamw")
    expected = [t["diff_ci"] for tests in differences.values() for t in tests.values()]
    paired = errorbars(side)
    assert len(paired) == 4
    widths = [abs(s[1][0] - s[0][0]) / 2 for c in paired for s in c.lines[2][0].get_segments()]
    assert widths == pytest.approx(expected)
    assert side.get_title() == "difference to adamw ± 95% CI, 3 seeds"
    # Few seeds: the note gives the t multiplier and the widths of the paired OOD intervals.
    ood = [tests["OOD avg"]["diff_ci"] for tests in differences.values()]
    t = scipy_stats.t.ppf(0.975, 2)
    note = (
        f"3 seeds, few: wide 95% CIs (t = {t:.2f} × the standard error): ±{min(ood):.1f} to "
        f"±{max(ood):.1f} points on the paired OOD avg difference to adamw"
    )
    assert report.seed_notes(group) == [note]
    assert note in texts(bars)
    text = report.render([group])
    assert next(line for line in text.splitlines() if line.startswith("## ")).endswith(
        "3 seeds per optimizer"
    )
    assert f"**{note}.**" in text
    assert report.ONE_SEED not in text
    closing = report.closing_summary([group])
    sam = differences["sam"]["OOD avg"]
    assert f"sam {sam['diff']:+.1f} ± {sam['diff_ci']:.1f} (n = 3)" in closing


def test_mixed_seed_counts_mark_the_single_seed_optimizer(tmp_path, close_figures):
    for optimizer, rows in ACCURACY.items():
        for seed, row in enumerate(rows[: 1 if optimizer == "tram_x" else 3], start=1):
            write_run(tmp_path, optimizer, seed, dict(zip(["movies", *OOD], row)))
    (group,) = report.collect([tmp_path])
    assert report.seeds_label(group) == "1-3 seeds per optimizer"
    notes = report.seed_notes(group)
    assert notes[0] == f"tram_x: {report.ONE_SEED}"
    assert notes[1].startswith("3 seeds, few: ")
    fig = report.build_figure([group])
    bars, side = fig.axes
    labels = [text.get_text() for text in bars.get_legend().get_texts()]
    assert labels == ["adamw (3 seeds)", "sam (3 seeds)", "tram_x (1 seed)"]
    bar_containers = [c for c in bars.containers if isinstance(c, BarContainer)]
    assert [c.errorbar is None for c in bar_containers] == [False, False, True]
    assert len(errorbars(side)) == 2  # sam's two paired differences; tram_x's have no interval
    assert "n = 1: no interval" in texts(side)


def test_many_seeds_state_n_without_the_few_seeds_warning(tmp_path, close_figures):
    for seed in range(1, report.FEW_SEEDS + 1):
        shift = 0.003 * (seed % 4)
        for optimizer, gain in (("adamw", 0.0), ("sam", 0.004 * (seed % 3))):
            row = {"movies": 0.8 + shift, "amazon": 0.7 + gain, "nyt": 0.72 - shift + gain}
            write_run(tmp_path, optimizer, seed, row)
    (group,) = report.collect([tmp_path])
    (note,) = report.seed_notes(group)
    assert note.startswith(f"{report.FEW_SEEDS} seeds: 95% CIs of ±")
    assert "few" not in note
    assert "t =" not in note
    _, side = report.build_figure([group]).axes
    assert side.get_title().endswith(f"{report.FEW_SEEDS} seeds")


def test_main_prints_the_summary_and_the_footer_last(tmp_path, capsys, close_figures):
    one_seed_sweep(tmp_path)
    footer = "See the 21-seed benchmark."
    assert report.main([str(tmp_path)], footer=footer) == 0
    printed = capsys.readouterr().out.rstrip().splitlines()
    assert printed[-1] == footer
    assert printed[-5:-2] == [
        "Summary:",
        f"- vader_sentiment · minilm: {report.ONE_SEED}.",
        "  OOD avg (single runs): adamw 68.3, sam 71.3, tram_x 73.3",
    ]
    fig = report.build_figure(report.collect([tmp_path]), footer=footer)
    assert [t.get_text() for t in fig.texts] == [footer]
