"""The generalization benchmark's protocol: tuning on validation only, selection, paired
evaluation, resume, report, and the power analysis."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_experiments import assets  # noqa: F401  (module-scoped fixture)
from tram.experiments import generalization, metrics
from tram.experiments import report as report_module
from tram.experiments.generalization import (
    BASES,
    BUDGETS,
    DIAGNOSTICS,
    FIXED,
    GRIDS,
    Grid,
    Job,
    choose_steps,
    curve_steps,
    plan,
    seeds_needed,
    select,
    tuning_values,
    with_steps,
)


def test_plan_tunes_first_then_evaluates_seed_by_seed():
    jobs = plan(["adamw", "sam"], [1, 2], tuning_seeds=[101])
    tuning = [j for j in jobs if j.phase == "tune"]
    assert [j.value for j in tuning] == list(GRIDS["sam"].values)
    assert all(j.method == "sam" and j.seed == 101 for j in tuning)
    assert jobs[: len(tuning)] == tuning
    assert [(j.method, j.seed) for j in jobs[len(tuning) :]] == [
        ("adamw", 1),
        ("sam", 1),
        ("adamw", 2),
        ("sam", 2),
    ]
    assert str(tuning[0].relative()) == f"tune/sam_rho{GRIDS['sam'].values[0]:g}/seed101"
    curve = Job("curve", "adamw", 102, 300)
    assert str(curve.relative()) == "curve/adamw_steps300/seed102"


def test_tuning_runs_never_evaluate_the_test_sets():
    tune = Job("tune", "tram_x", 101, 0.3)
    overrides = generalization._overrides(tune, {}, generalization.BUDGET)
    assert "evaluate.test=false" in overrides
    assert "optimizer.method.sigma=0.3" in overrides
    test = Job("test", "tram_x", 1)
    overrides = generalization._overrides(test, {"tram_x": {"value": 0.01}}, ())
    assert "evaluate.test=false" not in overrides
    assert "optimizer.method.sigma=0.01" in overrides
    assert generalization._overrides(Job("test", "adamw", 3), {}, ()) == [
        "optimizer=adamw",
        "seed=3",
    ]


@pytest.mark.parametrize(
    ("task", "round2"),
    # Round 1's fixed budgets are history: the fast suite composes round 2's.
    [
        pytest.param(t, r, marks=() if r else pytest.mark.slow)
        for t in sorted(BUDGETS)
        for r in (0, 1)
    ],
)
def test_every_planned_run_is_a_valid_config(task, round2):
    """Each budget (round 1's fixed one; round 2's base with a curve length) composes with every
    method, grid value, curve point and the diagnostics into a config the runner accepts."""
    from hydra import compose, initialize_config_dir

    from tram.experiments.run import CONFIG_DIR, training_arguments, validate

    selection = {m: {"value": grid.values[-1]} for m, grid in GRIDS.items()}
    methods = [*FIXED, *GRIDS]
    budget = with_steps(BASES[task], 230) if round2 else list(BUDGETS[task])
    jobs = plan(methods, [1])
    jobs[-1].overrides = list(DIAGNOSTICS)
    if round2:
        jobs.append(Job("curve", "adamw", 101, 70))
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        for job in jobs:
            base = BASES[task] if job.phase == "curve" else budget
            cfg = compose("finetune", overrides=generalization._overrides(job, selection, base))
            validate(cfg)
            training_arguments(cfg, Path("unused"))
            assert cfg.seed == job.seed
            assert cfg.evaluate.test == (job.phase == "test")
            if job.method in GRIDS:
                expected = job.value if job.phase == "tune" else GRIDS[job.method].values[-1]
                node = (
                    cfg.optimizer.regularizers[job.method]
                    if job.method in ("r3f", "r4f")
                    else cfg.optimizer.method
                )
                assert node[GRIDS[job.method].key] == expected
            if job.phase == "curve":
                assert (cfg.train.max_steps, cfg.train.warmup_steps) == (70, 7)
                assert cfg.optimizer.name == "adamw_steps70"
            elif round2:
                assert (cfg.train.max_steps, cfg.train.warmup_steps) == (230, 23)
            diagnosed = job.overrides == list(DIAGNOSTICS)
            assert cfg.diagnostics.cka == cfg.diagnostics.hessian == diagnosed
            assert cfg.diagnostics.examples == (128 if diagnosed else 256)


def _write(out: Path, job: Job, validation: float) -> None:
    path = out / "results" / job.relative() / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"in_domain_validation": validation}))


def test_selection_takes_the_best_validation_and_ties_keep_the_paper_value(tmp_path, monkeypatch):
    monkeypatch.setitem(GRIDS, "sam", Grid("rho", (0.01, 0.05, 0.2), 0.05))
    monkeypatch.setitem(GRIDS, "asam", Grid("rho", (0.1, 0.5), 0.5))
    for value, score in ((0.01, 0.80), (0.05, 0.81), (0.2, 0.83)):
        _write(tmp_path, Job("tune", "sam", 7, value), score)
        _write(tmp_path, Job("tune", "sam", 8, value), score - 0.01)
    for value in (0.1, 0.5):
        for seed in (7, 8):
            _write(tmp_path, Job("tune", "asam", seed, value), 0.75)
    selection = select(tmp_path, ["adamw", "sam", "asam"], [7, 8])
    assert selection.keys() == {"sam", "asam"}
    assert selection["sam"]["value"] == 0.2
    assert selection["sam"]["validation"]["0.2"] == pytest.approx(0.825)
    assert selection["asam"]["value"] == 0.5


def test_equal_counts_of_correct_examples_are_a_tie_whatever_their_float_sums(
    tmp_path, monkeypatch
):
    """Three seeds on 83 examples: 62 + 73 + 73 and 60 + 75 + 73 correct are the same mean, but
    not the same float; the protocol's tie rule (the paper's value, else the smaller) applies."""
    monkeypatch.setitem(GRIDS, "sam", Grid("rho", (0.1, 0.2, 0.4), 0.4))
    monkeypatch.setitem(GRIDS, "asam", Grid("rho", (0.1, 0.2, 0.5), 0.5))
    correct = {
        ("sam", 0.1): (62, 73, 73),
        ("sam", 0.2): (60, 75, 73),
        ("sam", 0.4): (50, 50, 50),
        ("asam", 0.1): (40, 40, 40),
        ("asam", 0.2): (72, 74, 70),
        ("asam", 0.5): (72, 72, 72),
    }
    for (method, value), counts in correct.items():
        for seed, count in zip((7, 8, 9), counts, strict=True):
            _write(tmp_path, Job("tune", method, seed, value), count / 83)
    selection = select(tmp_path, ["sam", "asam"], [7, 8, 9])
    sam, asam = selection["sam"]["validation"], selection["asam"]["validation"]
    assert sam["0.1"] != sam["0.2"]  # the float sums differ ...
    assert selection["sam"]["value"] == 0.1  # ... and the smaller value is kept
    assert asam["0.2"] != asam["0.5"]
    assert selection["asam"]["value"] == 0.5  # the paper's value, in a tie


@pytest.mark.parametrize(("sd", "expected"), [(1.0, 10), (2.0, 34), (0.5, 5)])
def test_seeds_needed_matches_paired_t_power_tables(sd, expected):
    # Standardised effect 1/sd at alpha 0.05, power 0.8: n = 10, 34, 5 (Cohen's tables; G*Power).
    assert seeds_needed(sd) == expected


def test_seeds_needed_without_spread():
    assert seeds_needed(0.0) == 2


def test_run_select_evaluate_resume_and_report(assets, tmp_path, monkeypatch):  # noqa: F811
    """Round 2 end to end on the tiny fabricated assets, two runs side by side: the learning
    curve fixes the length, the grid is tuned (and extended at most once), the evaluation saves
    predictions, the diagnosed seed measures the mechanism, a rerun resumes, the report reads
    it all back."""
    monkeypatch.setitem(GRIDS, "sam", Grid("rho", (0.01, 0.05), 0.05))
    monkeypatch.setattr(generalization, "MAX_EXTENSIONS", 1)
    base = [
        "experiment=smoke",
        f"model.source={assets['bert']}",
        "model.name=tiny_bert",
        f"task.data_dir={assets['vader']}",
        "train.batch_size=4",
        "task.max_eval_examples=16",
        "train.eval_batch_size=16",
    ]
    out = tmp_path / "bench"
    kwargs = dict(
        methods=["adamw", "sam"],
        seeds=[1, 2],
        tuning_seeds=[101],
        budget=base,
        curve=[1, 2],
        diagnose_seeds=[2],
        diagnostics=[
            *DIAGNOSTICS[:3],
            "diagnostics.examples=8",
            "diagnostics.hessian_iterations=2",
        ],
    )
    assert generalization.run(out, jobs=2, **kwargs) == 0
    curve = json.loads((out / "curve.json").read_text())
    assert curve["steps"] in (1, 2, 4)  # the curve doubles once if 2 steps is best
    assert json.loads((out / "budget.json").read_text())[-2:] == [
        f"train.max_steps={curve['steps']}",
        "train.warmup_steps=1",
    ]
    point = json.loads((out / "results/curve/adamw_steps2/seed101/results.json").read_text())
    assert point["domains"] == {}
    assert point["config"]["train"]["max_steps"] == 2
    selection = json.loads((out / "selection.json").read_text())
    assert selection["sam"]["value"] in (0.005, 0.01, 0.05, 0.1)
    assert selection["sam"]["tuning_seeds"] == [101]
    tuned = json.loads((out / "results/tune/sam_rho0.01/seed101/results.json").read_text())
    assert tuned["domains"] == {}
    assert tuned["in_domain_validation"] is not None
    assert tuned["config"]["train"]["max_steps"] == curve["steps"]
    for method in ("adamw", "sam"):
        for seed in (1, 2):
            run_dir = out / f"results/test/{method}/seed{seed}"
            results = json.loads((run_dir / "results.json").read_text())
            assert results["seed"] == seed
            assert results["optimizer"] == method
            assert set(results["domains"]) == {"movies", "amazon", "tweets", "nyt"}
            assert ("diagnostics" in results) == (seed == 2)
            splits = metrics.load_predictions(run_dir / "predictions.npz")
            assert splits.keys() == {f"test_{d}" for d in results["domains"]} | {"validation"}
            for probabilities, _ in splits.values():  # class probabilities, not logits
                assert probabilities.min() >= 0
                assert probabilities.sum(axis=1) == pytest.approx(1.0, abs=1e-5)
            for domain, values in results["domains"].items():
                assert metrics.accuracy(*splits[f"test_{domain}"]) == pytest.approx(
                    values["accuracy"]
                )
            assert metrics.accuracy(*splits["validation"]) == pytest.approx(
                results["in_domain_validation"]
            )
    sam = json.loads((out / "results/test/sam/seed1/results.json").read_text())
    assert sam["config"]["optimizer"]["method"]["rho"] == selection["sam"]["value"]

    started: list[Job] = []
    monkeypatch.setattr(generalization, "_run_job", lambda job, *a: started.append(job))
    assert generalization.run(out, jobs=2, **kwargs) == 0
    assert started == []  # every results file exists: nothing runs again

    (out / "protocol.json").write_text(json.dumps({"primary_metric": "auroc"}))
    text = generalization.report(out)
    assert "| adamw |" in text
    assert "| sam |" in text
    assert "# AUROC (primary metric)" in text
    assert "Budget of every run: `experiment=smoke`" in text
    assert "### Power (AUROC)" in text
    assert "### Tuning (in-domain validation only)" in text
    assert "### Learning curve (AdamW, in-domain validation accuracy only)" in text
    assert "### Mechanism (diagnosed evaluation seeds)" in text
    assert "| sam | 1 |" in text  # one diagnosed seed per method
    assert "![learning curve](curve.png)" in text
    assert (out / "curve.png").stat().st_size > 0
    assert (out / "report.md").read_text() == text
    assert (out / "report.png").stat().st_size > 0


def test_scheduler_bounds_the_workers_and_waits_for_tuning(tmp_path, monkeypatch):
    """The thread-pool scheduler with a fake runner: at most ``jobs`` at once, evaluation of a
    tuned method only after every tuning run, a failed tuning drops that method's evaluation."""
    import threading

    monkeypatch.setitem(GRIDS, "sam", Grid("rho", (0.01, 0.05), 0.05))
    monkeypatch.setitem(GRIDS, "asam", Grid("rho", (0.2, 0.5), 0.5))
    monkeypatch.setattr(generalization, "MAX_EXTENSIONS", 0)  # sam's choice stays at its edge
    lock = threading.Lock()
    active, log = [0], []

    def fake_run_job(job, out, selection, threads, budget):
        with lock:
            active[0] += 1
            log.append(("start", job.phase, job.method, active[0], dict(selection)))
        failing = job.phase == "tune" and job.method == "asam"
        time.sleep(0.0 if failing else 0.3)  # asam fails before any slot frees up
        with lock:
            active[0] -= 1
        if failing:
            return 3
        path = out / "runs" / job.relative() / "results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        score = 0.8 + (job.value or 0)
        path.write_text(json.dumps({"in_domain_validation": score}))
        return 0

    monkeypatch.setattr(generalization, "_run_job", fake_run_job)
    failed = generalization.run(
        tmp_path, methods=["adamw", "sam", "asam"], seeds=[1, 2], tuning_seeds=[101], jobs=3
    )
    assert failed == 1  # asam's first tuning run; its second is dropped with its evaluation
    starts = [entry for entry in log if entry[0] == "start"]
    assert max(entry[3] for entry in starts) == 3
    tuned_test = [entry for entry in starts if entry[1] == "test" and entry[2] == "sam"]
    assert [entry[4]["sam"]["value"] for entry in tuned_test] == [0.05, 0.05]
    last_tuning = max(i for i, entry in enumerate(starts) if entry[1] == "tune")
    first_tuned_test = min(i for i, entry in enumerate(starts) if entry in tuned_test)
    assert first_tuned_test > last_tuning
    assert [entry[2] for entry in starts].count("asam") == 1
    evaluated = (tmp_path / "results" / "test").rglob("results.json")
    assert sorted(str(p.parent.relative_to(tmp_path / "results")) for p in evaluated) == [
        "test/adamw/seed1",
        "test/adamw/seed2",
        "test/sam/seed1",
        "test/sam/seed2",
    ]


def test_command_line_rejects_bad_jobs(capsys):
    with pytest.raises(SystemExit):
        generalization.main(["run", "--out", "x", "--jobs", "0"])
    assert "--jobs must be at least 1, got 0" in capsys.readouterr().err


def test_the_protocol_keeps_each_distinct_invocation_once_latest_last(tmp_path, monkeypatch):
    """A sweep resumed by a loop over two stages records two invocations, not one per resume,
    and the last entry is the latest one (the one ``status`` reads)."""
    monkeypatch.setattr(generalization, "run", lambda out, **kwargs: 0)
    common = ["run", "--out", str(tmp_path), "--curve", "50,100", "--methods"]
    stage_a = [*common, "adamw,sam", "--seeds", "1-10"]
    stage_b = [*common, "adamw", "--seeds", "11-20"]
    for argv in (stage_a, stage_b, stage_a, stage_b, stage_a):
        assert generalization.main(argv) == 0
    protocol = json.loads((tmp_path / "protocol.json").read_text())
    prefix = "python -m tram.experiments.generalization "
    assert protocol["invocations"] == [prefix + " ".join(stage_b), prefix + " ".join(stage_a)]
    assert protocol["primary_metric"] == "auroc"


def test_power_table_reads_paired_differences_in_points():
    """Accuracies 0.80 vs 0.81/0.80/0.82: paired differences +1, 0, +2 points, sd exactly 1."""
    from collections import defaultdict

    from tram.experiments.report import Group

    def results(ood: float) -> dict:
        return {"ood_average": ood, "domains": {"movies": {"accuracy": 0.80}}}

    runs: dict = defaultdict(dict)
    for seed, ood in zip((1, 2, 3), (0.81, 0.80, 0.82), strict=True):
        runs["adamw"][seed] = results(0.80)
        runs["sam"][seed] = results(ood)
    group = Group(
        task="t",
        model="m",
        metric="accuracy",
        higher_is_better=True,
        train_domain="movies",
        ood_domains=["amazon"],
        runs=runs,
    )
    lines = generalization._power_lines(group, "adamw")
    assert "| sam | 3 | 1.00 | 10 |" in lines


# ------------------------------------------------------------------------------ metrics


def test_auroc_is_the_mann_whitney_statistic_with_ties():
    """Against scipy's Mann-Whitney U (average ranks for ties): AUROC = U / (n+ n-)."""
    import numpy as np
    from scipy import stats

    from tram.experiments import metrics

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=57)
    scores = np.round(rng.random(57) * 0.6 + 0.3 * labels, 1)  # rounding makes many ties
    probabilities = np.stack([1 - scores, scores], axis=1)
    u = stats.mannwhitneyu(scores[labels == 1], scores[labels == 0]).statistic
    expected = u / ((labels == 1).sum() * (labels == 0).sum())
    assert metrics.auroc(probabilities, labels) == pytest.approx(expected, abs=1e-12)
    assert 0.5 < expected < 1.0
    # Threshold-free: shifting every score leaves it unchanged; accuracy moves.
    shifted = np.clip(scores + 0.25, 0, 1)
    moved = np.stack([1 - shifted, shifted], axis=1)
    assert metrics.auroc(moved, labels) == pytest.approx(expected, abs=1e-12)
    assert metrics.accuracy(moved, labels) != metrics.accuracy(probabilities, labels)
    one_class = np.zeros(5, dtype=int)
    assert np.isnan(metrics.auroc(probabilities[:5], one_class))


def test_macro_f1_accuracy_and_one_vs_rest_auroc_by_hand():
    import numpy as np

    from tram.experiments import metrics

    # Three classes; predictions (argmax) 0,0,1,1,2,2 for labels 0,1,1,1,2,0.
    labels = np.array([0, 1, 1, 1, 2, 0])
    probabilities = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.5, 0.3, 0.2],
            [0.1, 0.8, 0.1],
            [0.2, 0.5, 0.3],
            [0.1, 0.2, 0.7],
            [0.3, 0.1, 0.6],
        ]
    )
    assert metrics.accuracy(probabilities, labels) == pytest.approx(4 / 6)
    # F1 = 2tp / (2tp + fp + fn): class 0: tp1 fp1 fn1 -> 2/4; class 1: tp2 fp0 fn1 -> 4/5;
    # class 2: tp1 fp1 fn0 -> 2/3.
    assert metrics.macro_f1(probabilities, labels) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    # One-vs-rest: class 0 scores {.7,.3} vs {.5,.1,.2,.1}: 7 of 8 pairs; class 1 {.3,.8,.5}
    # vs {.2,.2,.1}: 9/9; class 2 {.7} vs {.1,.2,.1,.3,.6}: 5/5.
    assert metrics.auroc(probabilities, labels) == pytest.approx((7 / 8 + 1 + 1) / 3)
    assert metrics.compute("macro_f1", probabilities, labels) == metrics.macro_f1(
        probabilities, labels
    )
    with pytest.raises(ValueError, match="unknown metric 'f2'"):
        metrics.compute("f2", probabilities, labels)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got values from 0 to 3"):
        metrics.accuracy(probabilities, np.array([0, 1, 2, 3, 0, 0]))
    with pytest.raises(ValueError, match=r"got \(6, 3\) and \(5,\)"):
        metrics.accuracy(probabilities, labels[:5])


def test_predictions_round_trip(tmp_path):
    import numpy as np

    from tram.experiments import metrics

    probabilities = np.array([[0.25, 0.75], [0.875, 0.125]])
    path = metrics.save_predictions(
        tmp_path / "p.npz",
        {"test_tweets": (probabilities, [1, 0]), "validation": (probabilities, [0, 0])},
    )
    loaded = metrics.load_predictions(path)
    assert loaded.keys() == {"test_tweets", "validation"}
    np.testing.assert_array_equal(loaded["test_tweets"][0], probabilities.astype(np.float32))
    np.testing.assert_array_equal(loaded["validation"][1], [0, 0])


# ------------------------------------------------------------------------------ round 2 protocol


def test_grid_extends_past_the_edge_until_the_choice_is_interior(tmp_path, monkeypatch):
    monkeypatch.setitem(GRIDS, "sam", Grid("rho", (0.01, 0.02, 0.05), 0.05, factor=2.0))
    seeds = [7, 8, 9]

    def write(value: float, score: float) -> None:
        for k, seed in enumerate(seeds):
            _write(tmp_path, Job("tune", "sam", seed, value), score + 0.003 * (k - 1))

    assert tuning_values(tmp_path, "sam", seeds) == ([0.01, 0.02, 0.05], False)
    for value, score in ((0.01, 0.84), (0.02, 0.82), (0.05, 0.80)):
        write(value, score)
    # The best (0.01) is the smallest value tried: one more below it, 0.01 / 2.
    assert tuning_values(tmp_path, "sam", seeds) == ([0.005, 0.01, 0.02, 0.05], False)
    write(0.005, 0.85)
    _write(tmp_path, Job("tune", "sam", 7, 0.0025), 0.80)  # one of three seeds so far
    lines = generalization._tuning_lines(tmp_path)
    assert "| sam | rho | 0.0025: 80.0 (n = 1), 0.005: 85.0 (n = 3), 0.01: 84.0 (n = 3)" in (
        "\n".join(lines)
    )
    # The seeds the report names are the ones the runs used, not the default tuning seeds.
    assert "Seeds 7, 8, 9 (not among the evaluation seeds)" in "\n".join(lines)
    partial = tmp_path / "results" / Job("tune", "sam", 7, 0.0025).relative()
    (partial / "results.json").unlink()
    partial.rmdir()
    assert tuning_values(tmp_path, "sam", seeds) == ([0.0025, 0.005, 0.01, 0.02, 0.05], False)
    write(0.0025, 0.83)
    values, complete = tuning_values(tmp_path, "sam", seeds)
    assert (values, complete) == ([0.0025, 0.005, 0.01, 0.02, 0.05], True)
    entry = select(tmp_path, ["sam"], seeds)["sam"]
    assert entry["value"] == 0.005
    assert entry["interior"] is True
    assert entry["validation"]["0.005"] == pytest.approx(0.85)
    assert entry["tuning_seeds"] == seeds


def test_grid_extension_stops_after_the_maximum(tmp_path, monkeypatch):
    monkeypatch.setitem(GRIDS, "tram_x", Grid("sigma", (0.03, 0.1), 0.1, factor=3.0))
    monkeypatch.setattr(generalization, "MAX_EXTENSIONS", 2)
    for _ in range(3):
        values, complete = tuning_values(tmp_path, "tram_x", [5])
        # Validation accuracy grows with sigma: the choice is always the top edge.
        for value in values:
            path = tmp_path / "results" / Job("tune", "tram_x", 5, value).relative()
            if not path.exists():
                _write(tmp_path, Job("tune", "tram_x", 5, value), 0.5 + value / 10)
    values, complete = tuning_values(tmp_path, "tram_x", [5])
    assert values == [0.03, 0.1, 0.3, 0.9]
    assert complete
    assert select(tmp_path, ["tram_x"], [5])["tram_x"]["interior"] is False


def _write_curve(out: Path, steps: int, seed: int, validation: float) -> None:
    _write(out, Job("curve", "adamw", seed, steps), validation)


def test_budget_is_the_fewest_steps_within_a_point_of_the_best(tmp_path):
    assert choose_steps(tmp_path, [50, 100], [1, 2]) == (None, {})
    for steps, score in ((50, 0.70), (100, 0.770), (200, 0.778), (400, 0.774)):
        _write_curve(tmp_path, steps, 1, score + 0.002)
        _write_curve(tmp_path, steps, 2, score - 0.002)
    chosen, means = choose_steps(tmp_path, [50, 100, 200, 400], [1, 2])
    assert chosen == 100  # 0.8 points below the best (200 steps); 50 is 7.8 below
    assert means[200] == pytest.approx(0.778)
    assert curve_steps(tmp_path, [50, 100, 200, 400], [1, 2]) == [50, 100, 200, 400]
    # The choice is the curve's end: it doubles past it, until the choice is inside (or twice).
    assert curve_steps(tmp_path, [50, 100], [1, 2]) == [50, 100, 200]
    assert curve_steps(tmp_path, [50], [1, 2]) == [50, 100, 200]
    # ... and waits for the runs of a new point before going further.
    assert curve_steps(tmp_path, [400], [1, 2]) == [400, 800]
    assert curve_steps(tmp_path, [50], [1, 2], doublings=1) == [50, 100]
    assert curve_steps(tmp_path, [50, 100], [1, 2], doublings=0) == [50, 100]


def test_a_point_exactly_one_point_below_the_best_is_within_the_tolerance(tmp_path):
    """Three seeds on 1,000 validation examples: 791 + 785 + 802 correct is exactly 30 examples,
    1 point, below 801 + 795 + 812, but the float difference of the means is 1.0000000000000009
    points; the rule ("within 1 point") takes it, as it takes equal counts as a tie."""
    correct = {
        80: (700, 700, 700),
        160: (791, 785, 802),
        320: (800, 790, 805),
        640: (801, 795, 812),
    }
    for steps, counts in correct.items():
        for seed, count in zip((101, 102, 103), counts, strict=True):
            _write_curve(tmp_path, steps, seed, count / 1000)
    chosen, means = choose_steps(tmp_path, list(correct), [101, 102, 103])
    assert 100 * (means[640] - means[160]) > 1.0  # the float sums overshoot ...
    assert chosen == 160  # ... and the point 1 point below the best is still the budget
    # Anything a count more than 1 point below stays outside.
    for steps, counts in correct.items():
        _write_curve(tmp_path, steps, 104, (counts[0] - (1 if steps == 160 else 0)) / 1000)
    assert choose_steps(tmp_path, list(correct), [101, 102, 103, 104])[0] == 320


def _verdict_group(ood: dict[str, dict[int, float]]) -> Any:
    from tram.experiments.report import Group

    runs = {
        method: {
            seed: {"domains": {"en": {"accuracy": 0.8}}, "ood_average": value}
            for seed, value in by_seed.items()
        }
        for method, by_seed in ood.items()
    }
    return Group("topics", "e5", "accuracy", True, "en", ["it", "ja", "ko"], runs)


def test_verdict_rule_holm_over_every_method_and_a_gain_of_exactly_one_point():
    """The protocol's rule per TRAM variant on the OOD average: "beats" needs a mean gain of at
    least 1 point and a Holm-adjusted p < 0.05 (Holm over every method compared, not only the
    TRAM variants); "excluded" needs the 95% CI's upper end below +1."""
    # Accuracies on 3 x 1,000 examples: tram_theta0 gains exactly 30 examples per 3,000 on average
    # (1 point), which the float mean of the differences puts at 0.9999999999999977.
    base = [(786, 745, 789), (779, 770, 723), (776, 705, 757)]
    base += [(740, 799, 719), (794, 709, 762), (758, 789, 729)]
    gain = (31, 28, 34, 28, 27, 32)  # examples of the first language
    seeds = range(1, 7)

    def ood(counts: tuple[int, ...]) -> float:  # as the runner: the mean of accuracies
        return sum(c / 1000 for c in counts) / len(counts)

    adamw = {s: ood(c) for s, c in zip(seeds, base, strict=True)}
    shifted = {s: ood((c[0] + g, *c[1:])) for s, c, g in zip(seeds, base, gain, strict=True)}

    def plus(points: tuple[float, ...]) -> dict[int, float]:
        return {s: adamw[s] + d / 100 for s, d in zip(seeds, points, strict=True)}

    group = _verdict_group(
        {
            "adamw": adamw,
            "sam": plus((1.0, -1.0, 2.0, -2.0, 0.5, -0.5)),
            "asam": plus((0.3, -0.2, 0.1, -0.4, 0.2, 0.1)),
            "tram_theta0": shifted,
            # p = 0.021 alone; Holm's 3rd of 6 (x 3) makes it 0.062; over the four TRAM
            # variants only, it would be the last (x 1), 0.021.
            "tram_x": plus((3.0, 0.5, 2.5, 4.0, 0.2, 1.8)),
            "tram_prev": plus((-1.2, -0.8, -1.0, -0.9, -1.1, -1.0)),
            "tram_fisher": plus((0.5, 0.6, 0.4, 0.5, 0.45, 0.55)),
        }
    )
    tests = report_module.paired_differences(group, "adamw")
    assert tests["tram_theta0"]["OOD avg"]["diff"] < 1.0  # the float mean ...
    assert tests["tram_x"]["OOD avg"]["t_p"] < 0.05
    text = generalization._verdict_lines(group, "adamw")
    assert any("(over the 6 methods compared)" in line for line in text)
    lines = {line.split(":")[0][2:]: line for line in text if line.startswith("- ")}
    assert lines.keys() == {"tram_theta0", "tram_x", "tram_prev", "tram_fisher"}
    beats = "**beats adamw (mean gain ≥ 1 point, Holm-adjusted p < 0.05)**."
    assert lines["tram_theta0"].endswith(beats)  # ... is a gain of 1 point
    assert lines["tram_x"].endswith("**undecided**.")
    raw = tests["tram_x"]["OOD avg"]["t_p"]  # the third smallest of six p-values: x 3
    assert f"Holm-adjusted p = {3 * raw:.3f}" in lines["tram_x"]
    assert 3 * raw > 0.05
    assert lines["tram_prev"].endswith("**a 1-point gain is excluded**.")
    assert lines["tram_fisher"].endswith("**a 1-point gain is excluded**.")


def _results_with_predictions(out: Path, method: str, seed: int, shift: float, rng) -> None:
    """A test run on domains movies (in-domain), amazon, tweets whose OOD scores are shifted by
    ``shift`` (accuracy moves with the threshold, AUROC does not)."""
    import numpy as np

    from tram.experiments import metrics

    splits = {}
    domains = {}
    for domain in ("movies", "amazon", "tweets"):
        labels = rng.integers(0, 2, size=40)
        scores = np.clip(
            0.3 * labels + rng.random(40) * 0.7 + (shift if domain != "movies" else 0), 0, 1
        )
        probabilities = np.stack([1 - scores, scores], axis=1)
        splits[f"test_{domain}"] = (probabilities, labels)
        domains[domain] = {"accuracy": metrics.accuracy(probabilities, labels)}
    target = out / "results" / "test" / method / f"seed{seed}"
    metrics.save_predictions(target / "predictions.npz", splits)
    ood = [domains[d]["accuracy"] for d in ("amazon", "tweets")]
    results = {
        "task": "vader_sentiment",
        "model": "minilm",
        "optimizer": method,
        "seed": seed,
        "metric": "accuracy",
        "higher_is_better": True,
        "train_domain": "movies",
        "ood_domains": ["amazon", "tweets"],
        "domains": domains,
        "ood_average": sum(ood) / len(ood),
        "train_time_s": 1.0,
        "diagnostics": {
            "cka": {"movies": 0.9 - shift, "amazon": 0.8 - shift, "tweets": 0.7 - shift},
            "epsilon_sharpness": 1.0 + seed + shift,
            "top_hessian_eigenvalue": 10.0 + seed,
        },
    }
    (target / "results.json").write_text(json.dumps(results))


def test_report_rescores_from_predictions_with_verdict_and_mechanism(tmp_path):
    import numpy as np

    from tram.experiments import metrics

    rng = np.random.default_rng(0)
    for seed in (1, 2, 3, 4):
        _results_with_predictions(tmp_path, "adamw", seed, 0.0, rng)
        _results_with_predictions(tmp_path, "tram_x", seed, 0.1 * seed, rng)
    (tmp_path / "protocol.json").write_text(json.dumps({"primary_metric": "auroc"}))
    text = generalization.report(tmp_path)
    assert text.index("# AUROC (primary metric)") < text.index("# accuracy (secondary metric)")
    assert "## vader_sentiment · minilm (AUROC, %)" in text
    assert "### Verdict (AUROC, out-of-domain average)" in text
    assert "### Power (AUROC)" in text
    assert "### Power (accuracy)" in text
    assert "### Metric spread" in text
    assert "### Mechanism (diagnosed evaluation seeds)" in text
    # The AUROC table's adamw OOD mean, recomputed here from the saved predictions.
    aurocs = []
    for seed in (1, 2, 3, 4):
        splits = metrics.load_predictions(
            tmp_path / "results" / "test" / "adamw" / f"seed{seed}" / "predictions.npz"
        )
        aurocs.append(
            np.mean([metrics.auroc(*splits[f"test_{d}"]) for d in ("amazon", "tweets")]) * 100
        )
    adamw_row = next(r for r in text.split("# accuracy")[0].splitlines() if r.startswith("| adamw"))
    assert adamw_row.split(" | ")[4].strip("*").startswith(f"{np.mean(aurocs):.1f} ± ")
    # tram_x's CKA is lower by exactly 0.1 * seed on every domain, its sharpness higher.
    group = generalization.rescored(
        __import__("tram.experiments.report", fromlist=["collect"]).collect(
            [tmp_path / "results" / "test"]
        )[0],
        tmp_path,
        "auroc",
    )
    values = generalization.mechanism(group, group, "adamw")["values"]
    assert values["tram_x"][3]["CKA OOD"] == pytest.approx(0.75 - 0.3)
    assert values["tram_x"][2]["ε-sharpness"] == pytest.approx(3.2)
    assert "| tram_x | 4 |" in text
    assert "![mechanism](mechanism.png)" in text
    assert (tmp_path / "mechanism.png").stat().st_size > 0
    assert (tmp_path / "report.png").stat().st_size > 0


def test_report_says_which_runs_have_no_predictions_and_what_stands_in(tmp_path):
    import numpy as np

    rng = np.random.default_rng(1)
    for seed in (1, 2, 3):
        _results_with_predictions(tmp_path, "adamw", seed, 0.0, rng)
        _results_with_predictions(tmp_path, "tram_x", seed, 0.05, rng)
    (tmp_path / "protocol.json").write_text(json.dumps({"primary_metric": "auroc"}))
    (tmp_path / "results" / "test" / "tram_x" / "seed2" / "predictions.npz").unlink()
    text = generalization.report(tmp_path)
    primary = text.split("# accuracy (secondary metric)")[0]
    assert primary.startswith("# AUROC (primary metric)")
    assert (
        "**1 of 6 runs have no saved predictions and are left out of the tables computed from "
        "them: tram_x seed 2.**" in primary
    )
    row = next(line for line in primary.splitlines() if line.startswith("| tram_x |"))
    assert row.split(" | ")[5] == "2"  # seeds: 1 and 3
    # No predictions at all: the results files' accuracy, named as what it is.
    for path in (tmp_path / "results" / "test").rglob("predictions.npz"):
        path.unlink()
    text = generalization.report(tmp_path)
    assert text.startswith("# accuracy (in place of the primary metric, AUROC)")
    assert (
        "**No run has saved predictions: AUROC cannot be computed; the results files' accuracy "
        "stands in.**" in text
    )


def test_mechanism_correlation_p_value_permutes_seeds_not_pairs():
    """The pairs of one seed share the baseline's run (every difference subtracts it), so they
    are not independent and the p-value of Spearman's test over the pairs is too small. The
    p-value is the share of the permutations of the seeds' OOD differences (all methods moved
    together) whose |ρ| reaches the observed one; here computed by brute force."""
    import itertools

    import numpy as np
    from scipy import stats

    from tram.experiments.report import Group

    rng = np.random.default_rng(3)
    seeds = [1, 2, 3, 4]
    methods = ["adamw", "sam", "tram_theta0", "tram_x"]
    base_sharp = {s: float(v) for s, v in zip(seeds, rng.normal(2.0, 1.0, 4), strict=True)}
    base_ood = {s: float(v) for s, v in zip(seeds, rng.normal(0.7, 0.05, 4), strict=True)}
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for method in methods:
        for seed in seeds:
            if method == "adamw":
                sharp, ood = base_sharp[seed], base_ood[seed]
            else:
                sharp = base_sharp[seed] + float(rng.normal(0.0, 0.3))
                ood = base_ood[seed] + float(rng.normal(0.0, 0.02))
            runs.setdefault(method, {})[seed] = {
                "domains": {"en": {"accuracy": 0.8}},
                "ood_average": ood,
                "diagnostics": {"epsilon_sharpness": sharp},
            }
    group = Group("t", "m", "accuracy", True, "en", ["it"], runs)
    rho, p, n = generalization.mechanism(group, group, "adamw")["correlations"]["ε-sharpness"]

    def pairs(order: tuple[int, ...]) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for method in methods[1:]:
            for seed, other in zip(seeds, order, strict=True):
                diagnostic = runs[method][seed]["diagnostics"]["epsilon_sharpness"]
                xs.append(diagnostic - base_sharp[seed])
                ood = runs[method][other]["ood_average"]
                ys.append(100 * ood - 100 * base_ood[other])
        return xs, ys

    observed = stats.spearmanr(*pairs(tuple(seeds))).statistic
    permuted = [abs(stats.spearmanr(*pairs(o)).statistic) for o in itertools.permutations(seeds)]
    expected = sum(r >= abs(observed) - 1e-12 for r in permuted) / len(permuted)
    assert n == 12
    assert rho == pytest.approx(observed)
    assert p == pytest.approx(expected)
    assert p != pytest.approx(stats.spearmanr(*pairs(tuple(seeds))).pvalue)


def _write_timed(
    out: Path, job: Job, seconds: float, validation: float = 0.5, **extra: Any
) -> None:
    path = out / "results" / job.relative() / "results.json"
    path.parent.mkdir(parents=True)
    steps = int(job.value) if job.phase == "curve" else 40
    record = {"in_domain_validation": validation, "steps": steps, "train_time_s": seconds - 2.0}
    path.write_text(json.dumps({**record, "eval_time_s": 2.0, **extra}))


def test_status_counts_the_runs_and_estimates_the_compute_left(tmp_path):
    """Runs done and left per phase, and each run left priced at its method's median (a method
    with none yet: the two-pass methods' median), diagnosed seeds with the diagnostics' median;
    curve points of another length than the budget's price nothing."""
    from tram.experiments.sweep_status import sweep_status

    invocation = (
        "python -m tram.experiments.generalization run --jobs 2 --out X --task cross_lingual "
        "--tuning-seeds 101-102 --curve 20,40 --diagnose-seeds 1 --methods adamw,sam,tram_x "
        "--seeds 1-2"
    )
    (tmp_path / "protocol.json").write_text(
        json.dumps({"task": "cross_lingual", "invocations": ["older", invocation]})
    )
    (tmp_path / "curve.json").write_text(json.dumps({"steps": 40, "curve": {"20": 0.4, "40": 0.5}}))
    for seed in (101, 102):
        _write_timed(tmp_path, Job("curve", "adamw", seed, 20), 7.0)  # another length: unpriced
        _write_timed(tmp_path, Job("curve", "adamw", seed, 40), 100.0 if seed == 101 else 120.0)
        for value, seconds, validation in (
            (0.01, 300.0, 0.5),
            (0.02, 340.0, 0.6),
            (0.05, 320.0, 0.5),
        ):
            _write_timed(tmp_path, Job("tune", "sam", seed, value), seconds, validation)
    _write_timed(tmp_path, Job("test", "adamw", 1), 110.0, diagnostics_time_s=50.0)
    text = sweep_status(tmp_path)
    assert "last run with --jobs 2" in text
    assert "curve adamw          4 of   4 runs" in text
    assert "tune  sam            6 of   6 runs" in text
    assert "tune  tram_x         0 of   6 runs" in text
    assert "test  adamw          1 of   2 runs" in text
    assert "all: 11 of 22 runs" in text
    assert "adamw 110 s" in text  # median of 100, 120 and 110: the 20-step points are not priced
    assert "tram_x ~320 s (none yet)" in text
    # Left: adamw seed 2 (110); sam seeds 1, 2 (320 each, seed 1 diagnosed +50); tram_x six
    # tuning and two test runs (8 x 320, seed 1 diagnosed +50).
    left = 110 + 2 * 320 + 50 + 8 * 320 + 50
    assert f"left: about {left / 3600:.1f} core-hours, {left / 7200:.1f} h at --jobs 2" in text
