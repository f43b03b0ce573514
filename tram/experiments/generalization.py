"""The generalization benchmark: methods x seeds at a fixed compute budget, tuned on validation.

    python -m tram.experiments.generalization run --out DIR [--task cross_domain|cross_lingual]
        [--methods adamw,sam,asam,r3f,tram_x,tram_theta0] [--seeds 1-8] [--tuning-seeds 101-103]
        [--curve 50,100,200,400] [--diagnose-seeds 1-5] [--jobs 1] [--threads 1] [overrides]
    python -m tram.experiments.generalization report DIR [--primary auroc]
    python -m tram.experiments.generalization status DIR

``run`` does the whole protocol, resumable (a run whose results file exists is not repeated):

0. **Budget** (round 2, ``--curve``): AdamW at each step count over the tuning seeds, on the
   training domain's validation split only; the run length of everything after is the fewest
   steps within :data:`CURVE_TOLERANCE` point of the best mean validation accuracy (the curve
   grows by doubling while its longest run is the choice). Without ``--curve`` every run has
   round 1's fixed budget (:data:`BUDGETS`).
1. **Tuning** on the training domain's validation split only (``evaluate.test=false``: the test
   sets, in-domain and out-of-domain, are never evaluated): every value of each method's grid
   (SAM's and ASAM's ρ, TRAM-x's σ) over the tuning seeds, which are disjoint from the
   evaluation seeds. The value with the best mean validation accuracy is chosen; a tie keeps the
   paper's value. While the choice sits at an edge of the values tried, the grid is extended
   past it (:func:`tuning_values`). The choice is written to ``DIR/selection.json``.
2. **Evaluation** of every method with its chosen value over the evaluation seeds, paired by
   seed (same initialisation of the head and same data order for every method), on the test
   sets (as many examples of each as the budget's ``task.max_eval_examples`` allows); the runs
   of ``--diagnose-seeds`` also measure CKA, ε-sharpness and the top Hessian eigenvalue
   (:data:`DIAGNOSTICS`). Methods without a grid start once the curve is done; a tuned method's
   evaluation starts once its tuning is complete.

Runs go to ``DIR/runs/<phase>/<method>/seed<k>/`` (logs, TensorBoard, Hydra config) and their
results files and per-example predictions are copied to
``DIR/results/<phase>/<method>/seed<k>/{results.json,predictions.npz}``, the part to commit.
``--jobs`` runs that many processes side by side, each with ``--threads`` (default
``cores / jobs``) threads.

``report`` writes ``DIR/report.md`` and ``DIR/report.png`` from the committed files: the test
table of the primary metric (computed from the saved predictions; ``DIR/protocol.json`` names
it) and of accuracy, each with paired tests against AdamW and Holm's adjustment
(:mod:`tram.experiments.report`), a verdict per TRAM variant, a power analysis (from the spread
of the paired out-of-domain differences, how many seeds a paired t-test needs to detect a
1-point difference with 80% power), the spread of every metric, the mechanism table, the
learning curve, the tuning table and the budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tram.experiments.metrics import PREDICTIONS_FILE

__all__ = [
    "BUDGET",
    "BUDGETS",
    "FIXED",
    "GRIDS",
    "Grid",
    "Job",
    "main",
    "plan",
    "seeds_needed",
    "select",
]

BUDGETS: dict[str, tuple[str, ...]] = {
    "cross_domain": (
        "experiment=sentiment_default",
        "train.max_steps=80",
        "train.lr=1e-4",
        "train.warmup_steps=8",
        "task.max_eval_examples=1000",
        "+trainer.train_sampling_strategy=group_by_length",
    ),
    "cross_lingual": (
        "experiment=topics_default",
        "train.max_steps=100",
        "train.warmup_steps=10",
        "task.max_eval_examples=null",
        "+trainer.train_sampling_strategy=group_by_length",
    ),
}
"""The fixed budget of every run of round 1, per task (``run`` without ``--curve``).

``cross_domain``: MiniLM on VADER movies, 80 steps of 16 examples (lr 1e-4, linear decay after
8 warm-up steps), batches of similar length (about 20% less padding work), and up to 1000
examples per evaluation set (all of the in-domain validation and test splits). The learning
rate is AdamW's best in-domain validation accuracy (seed 101) of 1e-4 (78.0) and 2e-4 (77.1);
the 150-step preset's 5e-5 leaves 80 steps far from converged (SAM: 66-71).

``cross_lingual``: multilingual-e5-small on the English chatterbot topics, evaluated zero-shot
on it, ja, ko, zh and uk (every example), 100 steps at the preset's lr 1e-4.
"""
BUDGET = BUDGETS["cross_domain"]

BASES: dict[str, tuple[str, ...]] = {
    "cross_domain": (
        "experiment=sentiment_default",
        "train.lr=1e-4",
        "task.max_eval_examples=1000",
        "+trainer.train_sampling_strategy=group_by_length",
    ),
    "cross_lingual": (
        "experiment=topics_default",
        "task.max_eval_examples=null",
        "+trainer.train_sampling_strategy=group_by_length",
    ),
}
"""Round 2 (``run --curve``): every setting of a run but its length, which the AdamW learning
curve on in-domain validation decides (:func:`choose_steps`); warm-up is 10% of the steps."""

PRIMARY_METRICS: dict[str, str] = {"cross_domain": "auroc", "cross_lingual": "accuracy"}
"""Round 2's pre-registered primary metric per task (a :data:`tram.experiments.metrics.METRICS`
name), computed from the saved predictions; accuracy is always reported as well. Binary
sentiment: the threshold-free AUROC (see the cross-domain protocol for the pilot that chose
it); 10-topic classification: accuracy, the paper's metric (an argmax over ten classes has no
threshold to fall on either side of)."""

DIAGNOSTICS: tuple[str, ...] = (
    "diagnostics.cka=true",
    "diagnostics.sharpness=true",
    "diagnostics.hessian=true",
    "diagnostics.examples=128",
    "diagnostics.sharpness_steps=5",
    "diagnostics.hessian_iterations=10",
)
"""Overrides of the evaluation runs whose seed is in ``--diagnose-seeds``: linear CKA to the
pre-trained model per domain, ε-sharpness and the top Hessian eigenvalue of the in-domain
validation loss (:mod:`tram.experiments.diagnose`), on 128 evenly spaced examples (all of them
where a split is smaller), 5 ascent steps and at most 10 power iterations: fewer than the
runner's defaults (256, 10, 20), so that a diagnosed run costs well under twice a plain one."""

WARMUP_FRACTION = 0.1
CURVE_TOLERANCE = 1.0
"""The budget is the fewest curve steps whose mean validation accuracy is within this many
points of the best mean (past the knee of the curve)."""
MAX_EXTENSIONS = 3
"""Grid values added on one side at most when the choice sits at that edge."""


@dataclass(frozen=True)
class Grid:
    """A method's tuned hyperparameter: its config key, the values tried first, the paper's
    value, and the factor by which the grid is extended past an edge (``value / factor`` below,
    ``value * factor`` above)."""

    key: str
    values: tuple[float, ...]
    default: float
    factor: float = 2.0

    def beyond(self, value: float, side: int) -> float:
        """The next value past ``value`` (``side`` -1: below, +1: above), to 2 significant
        digits."""
        nxt = value / self.factor if side < 0 else value * self.factor
        return float(f"{nxt:.2g}")


GRIDS: dict[str, Grid] = {
    "sam": Grid("rho", (0.01, 0.02, 0.05), 0.05),
    "asam": Grid("rho", (0.1, 0.2, 0.5), 0.5),
    "tram_x": Grid("sigma", (0.03, 0.1, 0.3), 0.1, factor=3.0),
}
"""Round 2's starting grids around the paper's values (Sherborne et al. 2024, App. B.2; TRAM-x's σ
has no paper value, 0.1 is its R3F noise) and round 1's choices (SAM 0.02 and ASAM 0.2, both
the smallest of round 1's grids (0.02, 0.05, 0.1) and (0.2, 0.5, 1.0); TRAM-x 0.1 of (0.01, 0.1,
0.3)). A grid grows past an edge whenever the chosen value sits on it (:func:`tuning_values`)."""

FIXED = ("adamw", "r3f", "tram_theta0", "tram_prev", "tram_fisher")
"""Methods run with the paper's values only."""

TUNING_SEEDS = (101, 102, 103)


@dataclass
class Job:
    """One fine-tuning run of the benchmark: a learning-curve point (``value``: steps), a
    tuning run (``value``: the grid value) or an evaluation run."""

    phase: str  # "curve", "tune" or "test"
    method: str
    seed: int
    value: float | None = None
    overrides: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.phase == "curve":
            return f"{self.method}_steps{int(self.value or 0)}"
        if self.phase == "tune":
            return f"{self.method}_{GRIDS[self.method].key}{self.value:g}"
        return self.method

    def relative(self) -> Path:
        return Path(self.phase) / self.label / f"seed{self.seed}"


def plan(
    methods: Sequence[str], seeds: Sequence[int], tuning_seeds: Sequence[int] = TUNING_SEEDS
) -> list[Job]:
    """The runs of the starting grids and of the evaluation, in the order they should start:
    tuning first, then evaluation seed by seed (grid extensions come from :func:`tuning_values`
    as results arrive)."""
    jobs = [
        Job("tune", method, seed, value)
        for method in methods
        if method in GRIDS
        for value in GRIDS[method].values
        for seed in tuning_seeds
    ]
    jobs += [Job("test", method, seed) for seed in seeds for method in methods]
    return jobs


def _results(out: Path, job: Job) -> Path:
    return out / "results" / job.relative() / "results.json"


def _validation(out: Path, job: Job) -> float | None:
    path = _results(out, job)
    if not path.exists():
        return None
    return float(json.loads(path.read_text())["in_domain_validation"])


TIE_TOLERANCE = 1e-9
"""Scores this close are a tie: means of accuracies that count the same correct examples differ
in the last bits of their float sums (72/83 + 74/83 + 70/83 is not 3 x 72/83 in floats), and
one example of a 83-example split over three seeds is 4e-3."""


def _best(scores: Mapping[float, float], default: float) -> float:
    """The value with the best score; a tie (within :data:`TIE_TOLERANCE`) keeps ``default``,
    else the smallest of the tied values."""
    best = max(scores.values())
    tied = [value for value, score in scores.items() if best - score <= TIE_TOLERANCE]
    return default if default in tied else min(tied)


def tuning_values(out: Path, method: str, tuning_seeds: Sequence[int]) -> tuple[list[float], bool]:
    """The grid values of ``method`` to run and whether its tuning is complete.

    The starting grid, then, each time every value's runs exist and the best mean validation
    accuracy sits at an edge of the values tried, one more value past that edge
    (:meth:`Grid.beyond`), up to :data:`MAX_EXTENSIONS` per side."""
    grid = GRIDS[method]
    values = sorted(grid.values)
    extended = {-1: 0, 1: 0}
    while True:
        scores: dict[float, float] = {}
        for value in values:
            runs = [_validation(out, Job("tune", method, s, value)) for s in tuning_seeds]
            if any(r is None for r in runs):
                return values, False
            scores[value] = sum(r for r in runs if r is not None) / len(runs)
        chosen = _best(scores, grid.default)
        side = -1 if chosen == values[0] else 1 if chosen == values[-1] else 0
        if side == 0 or extended[side] >= MAX_EXTENSIONS:
            return values, True
        extended[side] += 1
        edge = values[0] if side < 0 else values[-1]
        values = sorted([*values, grid.beyond(edge, side)])


def select(out: Path, methods: Sequence[str], tuning_seeds: Sequence[int]) -> dict[str, Any]:
    """Each tuned method's value with the best mean in-domain validation accuracy over the
    tuning seeds (a tie keeps the paper's value), over every value of its (extended) grid."""
    selection: dict[str, Any] = {}
    for method in methods:
        if method not in GRIDS:
            continue
        grid = GRIDS[method]
        values, _ = tuning_values(out, method, tuning_seeds)
        scores: dict[float, float] = {}
        for value in values:
            runs = [_validation(out, Job("tune", method, s, value)) for s in tuning_seeds]
            if all(r is not None for r in runs):
                scores[value] = sum(r for r in runs if r is not None) / len(runs)
        if not scores:
            continue
        chosen = _best(scores, grid.default)
        selection[method] = {
            "key": grid.key,
            "value": chosen,
            "paper_value": grid.default,
            "interior": min(scores) < chosen < max(scores),
            "tuning_seeds": list(tuning_seeds),
            "validation": {f"{v:g}": scores[v] for v in sorted(scores)},
        }
    return selection


def choose_steps(
    out: Path, curve: Sequence[int], tuning_seeds: Sequence[int]
) -> tuple[int | None, dict[int, float]]:
    """The run length past the knee of AdamW's in-domain validation curve.

    Returns the fewest steps whose mean validation accuracy over ``tuning_seeds`` is within
    :data:`CURVE_TOLERANCE` points of the best mean, and the means (fractions); None while a
    curve run is missing. "Within" allows :data:`TIE_TOLERANCE` of float rounding, as the tie
    rule does: 30 examples of 3 x 1,000 are exactly 1 point, but their float means can differ
    by 1.0000000000000009 points."""
    means: dict[int, float] = {}
    for steps in curve:
        runs = [_validation(out, Job("curve", "adamw", s, steps)) for s in tuning_seeds]
        if any(r is None for r in runs):
            return None, means
        means[steps] = sum(r for r in runs if r is not None) / len(runs)
    best = max(means.values())
    within = CURVE_TOLERANCE + 100 * TIE_TOLERANCE
    return min(s for s, m in means.items() if 100 * (best - m) <= within), means


def curve_steps(
    out: Path, curve: Sequence[int], tuning_seeds: Sequence[int], doublings: int = 2
) -> list[int]:
    """``curve``, doubled past its end while the choice is its longest run (``doublings``
    times at most)."""
    steps = sorted(int(s) for s in curve)
    for _ in range(doublings):
        chosen, _ = choose_steps(out, steps, tuning_seeds)
        if chosen is None or chosen != steps[-1]:
            break
        steps.append(2 * steps[-1])
    return steps


def with_steps(base: Sequence[str], steps: int) -> list[str]:
    """``base`` with its run length: ``steps`` optimizer steps, 10% of them warm-up."""
    warmup = max(1, round(WARMUP_FRACTION * steps))
    return [*base, f"train.max_steps={steps}", f"train.warmup_steps={warmup}"]


def _overrides(job: Job, selection: Mapping[str, Any], budget: Sequence[str]) -> list[str]:
    if job.phase == "curve":
        overrides = [*with_steps(budget, int(job.value or 0)), "optimizer=adamw"]
        overrides += [f"seed={job.seed}", "evaluate.test=false", f"optimizer.name={job.label}"]
        return [*overrides, *job.overrides]
    overrides = [*budget, f"optimizer={job.method}", f"seed={job.seed}"]
    value = job.value
    if job.phase == "test" and job.method in selection:
        value = selection[job.method]["value"]
    if value is not None:
        node = f"regularizers.{job.method}" if job.method in ("r3f", "r4f") else "method"
        overrides.append(f"optimizer.{node}.{GRIDS[job.method].key}={value}")
    if job.phase == "tune":
        overrides += ["evaluate.test=false", f"optimizer.name={job.label}"]
    return [*overrides, *job.overrides]


def _run_job(
    job: Job, out: Path, selection: Mapping[str, Any], threads: int, budget: Sequence[str]
) -> int:
    """Run one job as its own ``tram.experiments.run`` process, its output in ``run.log``;
    returns its exit status (called in a worker thread of :func:`run`)."""
    run_dir = out / "runs" / job.relative()
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "tram.experiments.run", *_overrides(job, selection, budget)]
    command += [f"hydra.run.dir={run_dir}", "hydra.job.chdir=false"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    with (run_dir / "run.log").open("w") as log:
        log.write("+ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False
        )
    return process.returncode


def run(
    out: Path,
    *,
    methods: Sequence[str],
    seeds: Sequence[int],
    tuning_seeds: Sequence[int] = TUNING_SEEDS,
    jobs: int = 1,
    extra: Sequence[str] = (),
    budget: Sequence[str] = BUDGET,
    threads: int | None = None,
    curve: Sequence[int] = (),
    curve_doublings: int = 2,
    diagnose_seeds: Sequence[int] = (),
    diagnostics: Sequence[str] = DIAGNOSTICS,
) -> int:
    """Run the protocol (see the module docstring); returns the number of failed runs.

    ``curve``: when given, ``budget`` has no run length: AdamW runs each of these step counts
    over ``tuning_seeds`` on validation first, and :func:`choose_steps` fixes the length of
    every later run (written to ``budget.json``); the curve doubles past its end at most
    ``curve_doublings`` times (:func:`curve_steps`). ``diagnose_seeds``: evaluation seeds whose
    runs also measure ``diagnostics``. ``threads``: torch threads per run (default: the cores
    divided by ``jobs``). Every run's results file and predictions are copied under
    ``out/results``; a run whose results file exists there is not repeated."""
    out.mkdir(parents=True, exist_ok=True)
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // jobs)
    methods = list(methods)
    running: dict[Future[int], tuple[Job, float]] = {}
    failed: list[Job] = []
    selection_file = out / "selection.json"
    selection: dict[str, Any] = (
        json.loads(selection_file.read_text()) if selection_file.exists() else {}
    )
    final_budget: list[str] | None = None if curve else list(budget)
    if final_budget is not None:
        (out / "budget.json").write_text(json.dumps(final_budget, indent=2) + "\n")

    def runnable() -> list[Job]:
        nonlocal final_budget
        wanted: list[Job] = []
        if final_budget is None:
            steps = curve_steps(out, curve, tuning_seeds, curve_doublings)
            chosen, means = choose_steps(out, steps, tuning_seeds)
            if chosen is None:
                return [
                    Job("curve", "adamw", s, n, list(extra)) for n in steps for s in tuning_seeds
                ]
            final_budget = with_steps(budget, chosen)
            record = {
                "steps": chosen,
                "curve": {str(n): m for n, m in means.items()},
                "tolerance_points": CURVE_TOLERANCE,
                "tuning_seeds": list(tuning_seeds),
                "budget": final_budget,
            }
            (out / "curve.json").write_text(json.dumps(record, indent=2) + "\n")
            (out / "budget.json").write_text(json.dumps(final_budget, indent=2) + "\n")
            print(f"budget: {chosen} steps ({json.dumps(record['curve'])})", flush=True)
        complete = set()
        for method in methods:
            if method not in GRIDS:
                complete.add(method)
                continue
            values, done = tuning_values(out, method, tuning_seeds)
            if done:
                complete.add(method)
                if method not in selection or selection[method]["validation"].keys() != {
                    f"{v:g}" for v in values
                }:
                    selection.update(select(out, [method], tuning_seeds))
                    selection_file.write_text(json.dumps(selection, indent=2) + "\n")
                    print(f"selection: {json.dumps(selection[method])}", flush=True)
            wanted += [Job("tune", method, s, v, list(extra)) for v in values for s in tuning_seeds]
        for seed in seeds:
            for method in methods:
                if method in complete:
                    more = list(diagnostics) if seed in diagnose_seeds else []
                    wanted.append(Job("test", method, seed, None, [*more, *extra]))
        return wanted

    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="tram-job") as pool:
        while True:
            busy = {job.relative() for job, _ in running.values()}
            dropped = {j.method for j in failed if j.phase == "tune"}
            if any(j.phase == "curve" for j in failed):
                ready: list[Job] = []
            else:
                ready = [
                    j
                    for j in runnable()
                    if not _results(out, j).exists()
                    and j.relative() not in busy
                    and j.method not in dropped
                    and all(j.relative() != f.relative() for f in failed)
                ]
            while ready and len(running) < jobs:
                job = ready.pop(0)
                print(f"start {job.relative()}", flush=True)
                budget_now = list((final_budget if job.phase != "curve" else budget) or ())
                future = pool.submit(_run_job, job, out, selection, threads, budget_now)
                running[future] = (job, time.perf_counter())
                busy.add(job.relative())
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job, started = running.pop(future)
                try:
                    returncode: int | str = future.result()
                except OSError as error:  # the process could not start
                    returncode = f"{type(error).__name__}: {error}"
                source = out / "runs" / job.relative()
                if returncode == 0 and (source / "results.json").exists():
                    target = _results(out, job).parent
                    target.mkdir(parents=True, exist_ok=True)
                    if (source / PREDICTIONS_FILE).exists():
                        shutil.copyfile(source / PREDICTIONS_FILE, target / PREDICTIONS_FILE)
                    shutil.copyfile(source / "results.json", target / "results.json")
                    status = "done"
                else:
                    failed.append(job)
                    status = f"FAILED (exit {returncode})"
                    if job.phase == "tune":
                        print(
                            f"tuning of {job.method} failed: its evaluation is dropped",
                            flush=True,
                        )
                    if job.phase == "curve":
                        print("a learning-curve run failed: nothing else starts", flush=True)
                elapsed = time.perf_counter() - started
                print(f"{status} {job.relative()} in {elapsed:.0f} s", flush=True)
    return len(failed)


# ------------------------------------------------------------------------------ report


def seeds_needed(
    sd: float, difference: float = 1.0, power: float = 0.8, alpha: float = 0.05
) -> int:
    """Seeds a two-sided paired t-test needs to detect ``difference`` with the given power, when
    the paired differences have standard deviation ``sd`` (noncentral t distribution)."""
    from scipy import stats

    if not (sd > 0 and math.isfinite(sd)):
        return 2
    for n in range(2, 10_000):
        critical = stats.t.ppf(1 - alpha / 2, n - 1)
        noncentrality = difference * math.sqrt(n) / sd
        achieved = stats.nct.sf(critical, n - 1, noncentrality) + stats.nct.cdf(
            -critical, n - 1, noncentrality
        )
        if achieved >= power:
            return n
    return 10_000


def _power_lines(group: Any, baseline: str) -> list[str]:
    from tram.experiments.report import OOD_AVG, PERCENT_METRICS, paired_differences

    name = PERCENT_METRICS.get(group.metric, group.metric)
    lines = [
        f"### Power ({name})",
        "",
        f"Standard deviation over seeds of the paired out-of-domain {name} difference to "
        f"{baseline} (points), and the seeds a paired t-test needs to detect a 1-point "
        "difference with 80% power at α = 0.05.",
        "",
        "| Method | seeds | sd of paired OOD difference | seeds needed for 1 point |",
        "|---|---|---|---|",
    ]
    for method, tests in paired_differences(group, baseline).items():
        test = tests[OOD_AVG]  # in points: Group.values reports percent metrics in percent
        if test["diff_sd"] is None:
            continue
        sd = test["diff_sd"]
        lines.append(f"| {method} | {test['n']} | {sd:.2f} | {seeds_needed(sd)} |")
    return [*lines, ""]


def rescored(group: Any, out: Path, metric: str) -> Any:
    """``group`` with every test run's per-domain ``metric`` computed from its saved predictions
    (``out/results/test/<method>/seed<k>/predictions.npz``); runs without predictions are left
    out. Returns a :class:`tram.experiments.report.Group` whose metric is ``metric``."""
    from tram.experiments import metrics
    from tram.experiments.report import Group

    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for method, by_seed in group.runs.items():
        for seed, results in by_seed.items():
            path = out / "results" / "test" / method / f"seed{seed}" / PREDICTIONS_FILE
            if not path.exists():
                continue
            splits = metrics.load_predictions(path)
            domains = {
                d: {metric: metrics.compute(metric, *splits[f"test_{d}"])}
                for d in [group.train_domain, *group.ood_domains]
            }
            ood = [domains[d][metric] for d in group.ood_domains]
            runs.setdefault(method, {})[seed] = {
                **results,
                "metric": metric,
                "domains": domains,
                "in_domain": domains[group.train_domain][metric],
                "ood_average": sum(ood) / len(ood),
            }
    return Group(
        task=group.task,
        model=group.model,
        metric=metric,
        higher_is_better=True,
        train_domain=group.train_domain,
        ood_domains=list(group.ood_domains),
        runs=runs,
    )


TRAM_VARIANTS = ("tram_theta0", "tram_prev", "tram_x", "tram_fisher")


def _verdict_lines(group: Any, baseline: str, margin: float = 1.0) -> list[str]:
    """Per TRAM variant: does it beat ``baseline`` out of domain by ``margin`` points with a
    Holm-adjusted p < 0.05 (over every method compared), or does the 95% CI exclude a gain of
    ``margin``?"""
    from tram.experiments.report import OOD_AVG, PERCENT_METRICS, holm, paired_differences

    tests = paired_differences(group, baseline)
    if not tests:
        return []
    names = list(tests)
    adjusted = dict(zip(names, holm([tests[n][OOD_AVG]["t_p"] for n in names]), strict=True))
    label = PERCENT_METRICS.get(group.metric, group.metric)
    lines = [
        f"### Verdict ({label}, out-of-domain average)",
        "",
        f"Each TRAM variant against {baseline}: a gain of at least {margin:g} point with "
        f"Holm-adjusted p < 0.05 (over the {len(names)} methods compared), or a 95% CI whose "
        f"upper end is below +{margin:g} (a {margin:g}-point gain excluded); otherwise "
        "undecided at these seeds.",
        "",
    ]
    for name in [n for n in TRAM_VARIANTS if n in tests]:
        test = tests[name][OOD_AVG]
        if test["diff"] is None or test["diff_ci"] is None:
            continue
        low, high = test["diff"] - test["diff_ci"], test["diff"] + test["diff_ci"]
        p = adjusted[name]
        # A gain of exactly ``margin`` (30 of 3 x 1,000 examples is 1 point) can come out of the
        # float mean a few ulps short: rounding is allowed as in the tie rule.
        gained = test["diff"] >= margin - 100 * TIE_TOLERANCE
        if gained and p is not None and p < 0.05:
            # The rule tests the difference against 0, not against the margin: the gain's
            # estimate reaches the margin, its interval need not.
            verdict = f"beats {baseline} (mean gain ≥ {margin:g} point, Holm-adjusted p < 0.05)"
        elif high < margin:
            verdict = f"a {margin:g}-point gain is excluded"
        else:
            verdict = "undecided"
        lines.append(
            f"- {name}: {test['diff']:+.2f} points, 95% CI [{low:+.2f}, {high:+.2f}], "
            f"Holm-adjusted p = {'–' if p is None else f'{p:.3f}'}, {test['n']} seeds: "
            f"**{verdict}**."
        )
    return [*lines, ""]


def _metric_spread_lines(group: Any, out: Path, baseline: str) -> list[str]:
    """The spread of each metric's paired OOD difference (the primary-metric criterion)."""
    from statistics import mean

    from tram.experiments import metrics
    from tram.experiments.report import OOD_AVG, PERCENT_METRICS, paired_differences

    rows = []
    for metric in metrics.METRICS:
        scored = rescored(group, out, metric)
        sds = {
            name: tests[OOD_AVG]["diff_sd"]
            for name, tests in paired_differences(scored, baseline).items()
            if tests[OOD_AVG]["diff_sd"] is not None
        }
        if not sds:
            return []
        seed_sd = [
            statistics_sd(list(scored.values(name, OOD_AVG).values())) for name in scored.optimizers
        ]
        rows.append(
            f"| {PERCENT_METRICS[metric]} | {mean(sds.values()):.2f} | "
            + ", ".join(f"{n} {v:.2f}" for n, v in sds.items())
            + f" | {mean(v for v in seed_sd if math.isfinite(v)):.2f} |"
        )
    return [
        "### Metric spread",
        "",
        f"Standard deviation over seeds (points) of each metric's paired OOD difference to "
        f"{baseline}, and of the OOD average itself (mean over methods), from the saved "
        "predictions.",
        "",
        "| Metric | mean sd of paired difference | per method | mean sd over seeds |",
        "|---|---|---|---|",
        *rows,
        "",
    ]


def statistics_sd(values: Sequence[float]) -> float:
    """Sample standard deviation of the finite ``values`` (NaN for fewer than two)."""
    import statistics

    clean = [v for v in values if math.isfinite(v)]
    return statistics.stdev(clean) if len(clean) > 1 else float("nan")


def _curve_lines(out: Path) -> list[str]:
    record_file = out / "curve.json"
    curve_dir = out / "results" / "curve"
    if not curve_dir.exists():
        return []
    from tram.experiments.report import mean_ci

    record = json.loads(record_file.read_text()) if record_file.exists() else {}
    by_steps = _curve_points(out)
    train_examples = batch = None
    for path in sorted(curve_dir.rglob("results.json"))[:1]:
        results = json.loads(path.read_text())
        train_examples = int(results["train_examples"])
        batch = int(results["config"]["train"]["batch_size"])
    lines = [
        "### Learning curve (AdamW, in-domain validation accuracy only)",
        "",
        "Mean ± 95% CI over the tuning seeds; the budget is the fewest steps within "
        f"{record.get('tolerance_points', CURVE_TOLERANCE):g} point of the best mean "
        "(in bold).",
        "",
        "| Steps | epochs | validation accuracy, % | seeds |",
        "|---|---|---|---|",
    ]
    for steps in sorted(by_steps):
        mean, ci = mean_ci(by_steps[steps])
        epochs = steps * (batch or 0) / train_examples if train_examples else float("nan")
        cell = f"{mean:.1f}" + (f" ± {ci:.1f}" if ci is not None else "")
        if record.get("steps") == steps:
            cell = f"**{cell}**"
        lines.append(f"| {steps} | {epochs:.2f} | {cell} | {len(by_steps[steps])} |")
    if record.get("steps"):
        lines += ["", f"Chosen budget: {record['steps']} steps."]
    return [*lines, ""]


def _tuning_in_progress(out: Path, done: Sequence[str]) -> dict[str, dict[float, list[float]]]:
    """Tuning runs of the grid methods not in ``done``: method -> value -> validation
    accuracies, read from the run directories ``tune/<method>_<key><value>/seed<k>``."""
    progress: dict[str, dict[float, list[float]]] = {}
    for method, grid in GRIDS.items():
        if method in done:
            continue
        prefix = f"{method}_{grid.key}"
        for path in sorted((out / "results" / "tune").glob(f"{prefix}*/seed*/results.json")):
            value = float(path.parent.parent.name[len(prefix) :])
            scores = progress.setdefault(method, {}).setdefault(value, [])
            scores.append(float(json.loads(path.read_text())["in_domain_validation"]))
    return progress


def _tuning_lines(out: Path) -> list[str]:
    selection_file = out / "selection.json"
    selection = json.loads(selection_file.read_text()) if selection_file.exists() else {}
    progress = _tuning_in_progress(out, list(selection))
    if not selection and not progress:
        return []
    # The seeds the tuning runs on disk used (round 1 tuned on one seed and recorded none in
    # its selection), together with any a selection records.
    seeds = sorted(
        {s for e in selection.values() for s in e.get("tuning_seeds", [])}
        | {
            int(path.parent.name[len("seed") :])
            for path in (out / "results" / "tune").glob("*/seed*/results.json")
        }
    )
    lines = [
        "### Tuning (in-domain validation only)",
        "",
        f"Seeds {', '.join(map(str, seeds or TUNING_SEEDS))} (not among the evaluation "
        "seeds); mean validation accuracy, %. The chosen value is in bold; a tie keeps the "
        "paper's. A method still being tuned shows its finished runs (n = runs so far).",
        "",
        "| Method | parameter | values (validation accuracy) | chosen | interior | paper |",
        "|---|---|---|---|---|---|",
    ]
    for method, entry in selection.items():
        cells = []
        for value, score in entry["validation"].items():
            cell = f"{value}: {100 * score:.1f}"
            cells.append(f"**{cell}**" if float(value) == entry["value"] else cell)
        tried = [float(v) for v in entry["validation"]]
        interior = entry.get("interior", min(tried) < float(entry["value"]) < max(tried))
        lines.append(
            f"| {method} | {entry['key']} | {', '.join(cells)} | {entry['value']:g} | "
            f"{'yes' if interior else 'no'} | "
            f"{entry['paper_value']:g} |"
        )
    for method, by_value in progress.items():
        cells = [
            f"{v:g}: {100 * sum(r) / len(r):.1f} (n = {len(r)})"
            for v, r in sorted(by_value.items())
        ]
        lines.append(
            f"| {method} | {GRIDS[method].key} | {', '.join(cells)} | in progress | – | "
            f"{GRIDS[method].default:g} |"
        )
    return [*lines, ""]


EXACT_PERMUTATION_SEEDS = 8
"""Up to this many diagnosed seeds the permutation p-value of :func:`mechanism` enumerates every
permutation (8! = 40,320); above, :data:`RANDOM_PERMUTATIONS` drawn with a fixed seed."""
RANDOM_PERMUTATIONS = 10_000


def _seed_permutation_p(
    differences: Mapping[tuple[str, int], float],
    ood_differences: Mapping[tuple[str, int], float],
    observed: float,
) -> float:
    """Two-sided p-value of Spearman's ρ between ``differences`` and ``ood_differences`` (both
    keyed by (method, seed)) by permuting the seeds of the OOD differences, the same permutation
    for every method.

    Every pair of one seed subtracts the same baseline run, so the pairs are not independent:
    the p-value of Spearman's test over the pairs, which assumes they are, came out below 0.05
    in 17% of simulated sweeps without any association (7 methods x 5 seeds; more where the
    baseline's diagnostic and transfer vary together over its seeds). Moving whole seeds keeps
    that dependence in every permuted sweep. Pairs whose permuted partner is missing are left
    out of that permutation's ρ."""
    import itertools
    import random

    from scipy import stats

    seeds = sorted({seed for _, seed in differences})
    orders: Sequence[Sequence[int]]
    if len(seeds) <= EXACT_PERMUTATION_SEEDS:
        orders = list(itertools.permutations(seeds))
    else:
        rng = random.Random(0)
        orders = [seeds] + [rng.sample(seeds, len(seeds)) for _ in range(RANDOM_PERMUTATIONS - 1)]
    reached = 0
    for order in orders:
        moved = dict(zip(seeds, order, strict=True))
        pairs = [
            (x, ood_differences[method, moved[seed]])
            for (method, seed), x in differences.items()
            if (method, moved[seed]) in ood_differences
        ]
        xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
        if len(pairs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
            continue  # no correlation to compare: counts as not reaching the observed one
        rho = float(stats.spearmanr(xs, ys).statistic)
        reached += abs(rho) >= abs(observed) - 1e-12
    return reached / len(orders)


def mechanism(group: Any, primary: Any, baseline: str) -> dict[str, Any]:
    """The diagnosed runs' CKA (in-domain, OOD mean), ε-sharpness and top Hessian eigenvalue:
    per method, the values over seeds and the paired differences to ``baseline``; and, over
    every (method, seed) pair, the Spearman correlation between each diagnostic's paired
    difference and the paired OOD difference of the ``primary`` group's metric, with the p-value
    of a permutation of the seeds (:func:`_seed_permutation_p`)."""
    from tram.experiments.report import OOD_AVG

    def values(results: Mapping[str, Any]) -> dict[str, float] | None:
        diagnostics = results.get("diagnostics")
        if not diagnostics:
            return None
        out: dict[str, float] = {}
        cka = diagnostics.get("cka") or {}
        if cka:
            out["CKA in-domain"] = float(cka[group.train_domain])
            ood = [float(cka[d]) for d in group.ood_domains if d in cka]
            out["CKA OOD"] = sum(ood) / len(ood) if ood else float("nan")
        for key, label in (
            ("epsilon_sharpness", "ε-sharpness"),
            ("top_hessian_eigenvalue", "top Hessian eigenvalue"),
        ):
            if key in diagnostics:
                out[label] = float(diagnostics[key])
        return out

    table: dict[str, dict[int, dict[str, float]]] = {}
    for method in group.optimizers:
        for seed, results in group.runs[method].items():
            measured = values(results)
            if measured:
                table.setdefault(method, {})[seed] = measured
    # label -> (method, seed) -> the diagnostic's paired difference; (method, seed) -> the
    # paired OOD difference of the primary metric.
    differences: dict[str, dict[tuple[str, int], float]] = {}
    ood_differences: dict[tuple[str, int], float] = {}
    if baseline in table and baseline in primary.runs:
        ood_base = primary.values(baseline, OOD_AVG)
        for method, by_seed in table.items():
            if method == baseline or method not in primary.runs:
                continue
            ood = primary.values(method, OOD_AVG)
            for seed, measured in by_seed.items():
                if seed not in table[baseline] or seed not in ood or seed not in ood_base:
                    continue
                ood_difference = ood[seed] - ood_base[seed]
                if not math.isfinite(ood_difference):
                    continue
                ood_differences[method, seed] = ood_difference
                for label, value in measured.items():
                    diff = value - table[baseline][seed].get(label, float("nan"))
                    if math.isfinite(diff):
                        differences.setdefault(label, {})[method, seed] = diff
    correlations: dict[str, tuple[float, float, int]] = {}
    for label, by_pair in differences.items():
        xs = list(by_pair.values())
        ys = [ood_differences[key] for key in by_pair]
        if len(xs) >= 3 and len(set(xs)) > 1 and len(set(ys)) > 1:
            from scipy import stats

            rho = float(stats.spearmanr(xs, ys).statistic)
            p = _seed_permutation_p(by_pair, ood_differences, rho)
            correlations[label] = (rho, p, len(xs))
    return {"values": table, "correlations": correlations}


def _mechanism_lines(group: Any, primary: Any, baseline: str) -> list[str]:
    from tram.experiments.report import mean_ci, paired_tests

    measured = mechanism(group, primary, baseline)
    table = measured["values"]
    if not table:
        return []
    labels = ["CKA in-domain", "CKA OOD", "ε-sharpness", "top Hessian eigenvalue"]
    lines = [
        "### Mechanism (diagnosed evaluation seeds)",
        "",
        "Linear CKA between the pre-trained and the fine-tuned base-model output on each "
        "domain's test examples (higher: closer to the pre-trained model; OOD = mean over the "
        "out-of-domain sets), ε-sharpness and the top Hessian eigenvalue of the in-domain "
        "validation loss (lower: flatter). Mean ± 95% CI over seeds; in parentheses, the "
        f"paired difference to {baseline} (Δ, mean ± 95% CI). The paper (Table 6) reports "
        "TRAM with higher CKA and lower ε-sharpness than Adam.",
        "",
        "| Method | seeds | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for method in [m for m in group.optimizers if m in table]:
        by_seed = table[method]
        cells = []
        for label in labels:
            mean, ci = mean_ci([v.get(label, float("nan")) for v in by_seed.values()])
            cell = "–" if not math.isfinite(mean) else f"{mean:.4g}"
            if ci is not None and math.isfinite(mean):
                cell += f" ± {ci:.2g}"
            if method != baseline and baseline in table:
                test = paired_tests(
                    {s: v.get(label, float("nan")) for s, v in by_seed.items()},
                    {s: v.get(label, float("nan")) for s, v in table[baseline].items()},
                )
                if test["diff"] is not None and test["diff_ci"] is not None:
                    cell += f" (Δ {test['diff']:+.3g} ± {test['diff_ci']:.2g})"
            cells.append(cell)
        lines.append(f"| {method} | {len(by_seed)} | " + " | ".join(cells) + " |")
    lines.append("")
    if measured["correlations"]:
        lines += [
            "Do they go with transfer? Spearman correlation, over every diagnosed (method, "
            f"seed) pair, between a diagnostic's paired difference to {baseline} and the paired "
            "OOD difference of the primary metric. The pairs of one seed share its "
            f"{baseline} run, so p is a permutation p-value: the share of the orderings of the "
            "seeds' OOD differences (every method's moved together) whose |ρ| reaches the "
            "observed one.",
            "",
            "| Diagnostic | Spearman ρ | p | pairs |",
            "|---|---|---|---|",
        ]
        for label, (rho, p, n) in measured["correlations"].items():
            lines.append(f"| {label} | {rho:+.2f} | {p:.3f} | {n} |")
        lines.append("")
    return lines


def _curve_points(out: Path) -> dict[int, list[float]]:
    """Steps -> the curve runs' validation accuracies (%)."""
    points: dict[int, list[float]] = {}
    for path in sorted((out / "results" / "curve").rglob("results.json")):
        results = json.loads(path.read_text())
        steps = int(results["config"]["train"]["max_steps"])
        points.setdefault(steps, []).append(100 * float(results["in_domain_validation"]))
    return points


def _plot_curve(out: Path, path: Path) -> Path | None:
    """AdamW's validation accuracy against the run length, mean ± 95% CI, chosen length
    marked."""
    points = _curve_points(out)
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tram.experiments.report import mean_ci

    steps = sorted(points)
    stats = [mean_ci(points[n]) for n in steps]
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for n in steps:
        ax.scatter([n] * len(points[n]), points[n], color="C0", alpha=0.35, s=12)
    ax.errorbar(steps, [m for m, _ in stats], yerr=[c or 0.0 for _, c in stats], fmt="-o")
    record_file = out / "curve.json"
    if record_file.exists():
        ax.axvline(json.loads(record_file.read_text())["steps"], color="C3", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(n) for n in steps])
    ax.minorticks_off()
    ax.set_xlabel("optimizer steps (log scale)")
    ax.set_ylabel("in-domain validation accuracy (%)")
    ax.set_title("AdamW learning curve (dashed: chosen budget)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_mechanism(group: Any, primary: Any, baseline: str, path: Path) -> Path | None:
    """Per diagnostic, each diagnosed (method, seed): its paired difference to ``baseline``
    against the paired OOD difference of the primary metric."""
    from tram.experiments.report import OOD_AVG, PERCENT_METRICS

    table = mechanism(group, primary, baseline)["values"]
    if baseline not in table or len(table) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["CKA OOD", "ε-sharpness", "top Hessian eigenvalue"]
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.6), squeeze=False)
    ood_base = primary.values(baseline, OOD_AVG) if baseline in primary.runs else {}
    for ax, label in zip(axes[0], labels, strict=True):
        for i, method in enumerate(m for m in group.optimizers if m in table):
            if method == baseline or method not in primary.runs:
                continue
            ood = primary.values(method, OOD_AVG)
            xs, ys = [], []
            for seed, measured in table[method].items():
                reference = table[baseline].get(seed, {})
                if label in measured and label in reference and seed in ood and seed in ood_base:
                    xs.append(measured[label] - reference[label])
                    ys.append(ood[seed] - ood_base[seed])
            ax.scatter(xs, ys, label=method, color=f"C{i % 10}", s=18)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_xlabel(f"{label} − {baseline}")
        ax.set_ylabel(f"OOD {PERCENT_METRICS.get(primary.metric, primary.metric)} − {baseline}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle("Mechanism: paired differences per diagnosed seed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(out: Path, baseline: str = "adamw", primary: str | None = None) -> str:
    """Write ``out/report.md`` and ``out/report.png``; return the Markdown.

    ``primary``: the metric of the main table (default: ``out/protocol.json``'s, else
    accuracy). With saved predictions the report has the primary metric's table and accuracy's,
    each with paired tests, power and the verdict, and the spread of every metric; then the
    learning curve, the tuning, the mechanism and the budget."""
    from tram.experiments import report as tables

    protocol_file = out / "protocol.json"
    protocol = json.loads(protocol_file.read_text()) if protocol_file.exists() else {}
    primary = primary or protocol.get("primary_metric") or "accuracy"
    lines: list[str] = []
    plotted = []
    test_dir = out / "results" / "test"
    groups = tables.collect([test_dir]) if test_dir.exists() else []
    for group in groups:
        scored = rescored(group, out, primary) if group.metric == "accuracy" else group
        # Runs without saved predictions cannot be rescored: say so where the numbers are, never
        # drop them, or put the results files' metric in the primary metric's place, silently.
        primary_name = tables.PERCENT_METRICS.get(primary, primary)
        missing = [
            f"{method} seed {seed}"
            for method, by_seed in group.runs.items()
            for seed in sorted(by_seed)
            if seed not in scored.runs.get(method, {})
        ]
        notes = []
        primary_role = "primary metric"
        if not scored.runs:  # no predictions (round 1): the results files' accuracy
            scored = group
            if primary != group.metric:
                primary_role = f"in place of the primary metric, {primary_name}"
                notes = [
                    f"**No run has saved predictions: {primary_name} cannot be computed; the "
                    f"results files' {group.metric} stands in.**",
                    "",
                ]
        elif missing:
            notes = [
                f"**{len(missing)} of {len(missing) + sum(map(len, scored.runs.values()))} runs "
                "have no saved predictions and are left out of the tables computed from them: "
                f"{', '.join(missing)}.**",
                "",
            ]
        views = [scored]
        if scored.metric != "accuracy":
            accuracy = rescored(group, out, "accuracy")
            views.append(accuracy if accuracy.runs else group)
        for i, view in enumerate(views):
            role = primary_role if i == 0 else "secondary metric"
            name = tables.PERCENT_METRICS.get(view.metric, view.metric)
            lines += [f"# {name} ({role})", "", *(notes if i == 0 else [])]
            lines += [tables.render([view], baseline=baseline).rstrip(), ""]
            lines += _verdict_lines(view, baseline)
            lines += _power_lines(view, baseline)
        plotted.append(scored)
        if scored is not group:
            lines += _metric_spread_lines(group, out, baseline)
        lines += _mechanism_lines(group, scored, baseline)
        if _plot_mechanism(group, scored, baseline, out / "mechanism.png"):
            lines += ["![mechanism](mechanism.png)", ""]
    lines += _curve_lines(out)
    if _plot_curve(out, out / "curve.png"):
        lines += ["![learning curve](curve.png)", ""]
    lines += _tuning_lines(out)
    budget_file = out / "budget.json"
    if budget_file.exists():
        budget = json.loads(budget_file.read_text())
        lines += ["Budget of every run: " + " ".join(f"`{o}`" for o in budget) + ".", ""]
    if not lines:
        lines = ["No results yet.", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    if plotted:
        tables.plot(plotted, out / "report.png", baseline=baseline)
    return text


# ------------------------------------------------------------------------------ command line


def _seeds(text: str) -> list[int]:
    if "-" in text:
        first, last = (int(x) for x in text.split("-", 1))
        return list(range(first, last + 1))
    return [int(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m tram.experiments.generalization`` (``run``, ``report``,
    ``status``); ``status`` parses the recorded ``run`` invocations with it too."""
    parser = argparse.ArgumentParser(
        prog="python -m tram.experiments.generalization", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="tune, then evaluate every method over seeds")
    run_parser.add_argument("--out", required=True, type=Path)
    run_parser.add_argument("--task", choices=sorted(BUDGETS), default="cross_domain")
    run_parser.add_argument("--methods", default="adamw,sam,asam,r3f,tram_x,tram_theta0")
    run_parser.add_argument("--seeds", default="1-8", help="e.g. 1-8 or 1,2,3")
    run_parser.add_argument(
        "--tuning-seeds", default="101", help="seeds of the tuning and the learning curve"
    )
    run_parser.add_argument(
        "--curve",
        default="",
        help="round 2: AdamW learning-curve step counts (e.g. 50,100,200,400); the run length "
        "is chosen from them on validation and the budget is the task's round-2 base",
    )
    run_parser.add_argument(
        "--curve-doublings",
        type=int,
        default=2,
        help="times the curve may double past its end while its longest run is the choice",
    )
    run_parser.add_argument(
        "--diagnose-seeds", default="", help="evaluation seeds that also measure DIAGNOSTICS"
    )
    run_parser.add_argument("--jobs", type=int, default=1, help="runs side by side")
    run_parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)"
    )
    run_parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    report_parser = commands.add_parser("report", help="write report.md and report.png")
    report_parser.add_argument("out", type=Path)
    report_parser.add_argument(
        "--primary", default=None, help="metric of the main table (default: protocol.json's)"
    )
    status_parser = commands.add_parser(
        "status", help="runs done and left, and the core-hours left, of a sweep"
    )
    status_parser.add_argument("out", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "report":
        print(report(args.out, primary=args.primary))
        return 0
    if args.command == "status":
        from tram.experiments.sweep_status import sweep_status

        print(sweep_status(args.out))
        return 0
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    methods = [m for m in args.methods.split(",") if m]
    curve = _seeds(args.curve) if args.curve else []
    if any(n < 1 for n in curve):
        parser.error(f"--curve step counts must be positive, got {args.curve}")
    if args.curve_doublings < 0:
        parser.error(f"--curve-doublings must be at least 0, got {args.curve_doublings}")
    args.out.mkdir(parents=True, exist_ok=True)
    if curve:
        protocol_file = args.out / "protocol.json"
        protocol = json.loads(protocol_file.read_text()) if protocol_file.exists() else {}
        protocol.update(task=args.task, primary_metric=PRIMARY_METRICS[args.task])
        invocation = " ".join(
            ["python -m tram.experiments.generalization", *(argv or sys.argv[1:])]
        )
        # A resumed sweep repeats its invocations; the list keeps each distinct one once, in
        # the order of its latest use, so its last entry stays the one ``status`` reads.
        protocol["invocations"] = [
            *(earlier for earlier in protocol.get("invocations", []) if earlier != invocation),
            invocation,
        ]
        protocol_file.write_text(json.dumps(protocol, indent=2) + "\n")
    failed = run(
        args.out,
        methods=methods,
        seeds=_seeds(args.seeds),
        tuning_seeds=_seeds(args.tuning_seeds),
        jobs=args.jobs,
        extra=args.overrides,
        budget=BASES[args.task] if curve else BUDGETS[args.task],
        threads=args.threads,
        curve=curve,
        curve_doublings=args.curve_doublings,
        diagnose_seeds=_seeds(args.diagnose_seeds) if args.diagnose_seeds else [],
    )
    print(report(args.out))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
