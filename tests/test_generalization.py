"""The generalization benchmark's protocol: tuning on validation only, selection, paired
evaluation, resume, report, and the power analysis."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.test_experiments import assets  # noqa: F401  (module-scoped fixture)
from tram.experiments import generalization
from tram.experiments.generalization import (
    BUDGETS,
    FIXED,
    GRIDS,
    Grid,
    Job,
    plan,
    seeds_needed,
    select,
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
    assert str(tuning[0].relative()) == "tune/sam_rho0.02/seed101"


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


@pytest.mark.parametrize("task", sorted(BUDGETS))
def test_every_planned_run_is_a_valid_config(task):
    """Each budget composes with every method and grid value into a config the runner accepts."""
    from hydra import compose, initialize_config_dir

    from tram.experiments.run import CONFIG_DIR, training_arguments, validate

    selection = {m: {"value": grid.values[-1]} for m, grid in GRIDS.items()}
    methods = [*FIXED, *GRIDS]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        for job in plan(methods, [1]):
            cfg = compose(
                "finetune", overrides=generalization._overrides(job, selection, BUDGETS[task])
            )
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


@pytest.mark.parametrize(("sd", "expected"), [(1.0, 10), (2.0, 34), (0.5, 5)])
def test_seeds_needed_matches_paired_t_power_tables(sd, expected):
    # Standardised effect 1/sd at alpha 0.05, power 0.8: n = 10, 34, 5 (Cohen's tables; G*Power).
    assert seeds_needed(sd) == expected


def test_seeds_needed_without_spread():
    assert seeds_needed(0.0) == 2


def test_run_select_evaluate_resume_and_report(assets, tmp_path, monkeypatch):  # noqa: F811
    """Two methods end to end on the tiny fabricated assets, two runs side by side."""
    monkeypatch.setitem(GRIDS, "sam", Grid("rho", (0.01, 0.05), 0.05))
    budget = [
        "experiment=smoke",
        f"model.source={assets['bert']}",
        "model.name=tiny_bert",
        f"task.data_dir={assets['vader']}",
        "train.max_steps=2",
        "train.batch_size=4",
        "task.max_eval_examples=16",
        "train.eval_batch_size=16",
    ]
    out = tmp_path / "bench"
    kwargs = dict(methods=["adamw", "sam"], seeds=[1], tuning_seeds=[101], budget=budget)
    assert generalization.run(out, jobs=2, **kwargs) == 0
    selection = json.loads((out / "selection.json").read_text())
    assert selection["sam"]["value"] in (0.01, 0.05)
    tuned = json.loads((out / "results/tune/sam_rho0.01/seed101/results.json").read_text())
    assert tuned["domains"] == {}
    assert tuned["in_domain_validation"] is not None
    for method in ("adamw", "sam"):
        results = json.loads((out / f"results/test/{method}/seed1/results.json").read_text())
        assert results["seed"] == 1
        assert results["optimizer"] == method
        assert set(results["domains"]) == {"movies", "amazon", "tweets", "nyt"}
    sam = json.loads((out / "results/test/sam/seed1/results.json").read_text())
    assert sam["config"]["optimizer"]["method"]["rho"] == selection["sam"]["value"]

    started: list[Job] = []
    monkeypatch.setattr(generalization, "_run_job", lambda job, *a: started.append(job))
    assert generalization.run(out, jobs=2, **kwargs) == 0
    assert started == []  # every results file exists: nothing runs again

    text = generalization.report(out)
    assert "| adamw |" in text
    assert "| sam |" in text
    assert "Budget of every run: `experiment=smoke`" in text
    assert "### Power" in text
    assert "### Tuning (in-domain validation only)" in text
    assert (out / "report.md").read_text() == text
    assert (out / "report.png").stat().st_size > 0


def test_scheduler_bounds_the_workers_and_waits_for_tuning(tmp_path, monkeypatch):
    """The thread-pool scheduler with a fake runner: at most ``jobs`` at once, evaluation of a
    tuned method only after every tuning run, a failed tuning drops that method's evaluation."""
    import threading

    monkeypatch.setitem(GRIDS, "sam", Grid("rho", (0.01, 0.05), 0.05))
    monkeypatch.setitem(GRIDS, "asam", Grid("rho", (0.2, 0.5), 0.5))
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
