"""How far a generalization sweep has come, and roughly how much compute it has left.

    python -m tram.experiments.generalization status DIR

reads ``DIR/protocol.json`` (the last ``run`` invocation: methods, seeds, tuning seeds, jobs) and
the results files under ``DIR/results``, and prints the runs done and left per phase and
method, and an estimate of the core-hours left: each run left costs the median
``train_time_s + eval_time_s`` of its method's finished runs (the median of the two-pass
methods' for a method with none yet, the median of every finished run without any two-pass
one), plus the median ``diagnostics_time_s`` on diagnosed seeds once one has been measured.
The recorded times depend on what ran beside each run, so the estimate is a rough one; the
tuning left counts the grid values known now (an extension past an edge adds three runs).
"""

from __future__ import annotations

import json
import shlex
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["sweep_status"]

TWO_PASS = ("sam", "asam", "tram_x", "tram_theta0", "tram_prev", "tram_fisher")


def _results(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _median(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def sweep_status(out: Path) -> str:
    """The status lines of the sweep in ``out`` (see the module docstring)."""
    from tram.experiments import generalization as g

    protocol_file = out / "protocol.json"
    if not protocol_file.exists():
        raise FileNotFoundError(
            f"{protocol_file} does not exist: status reads the run invocations that "
            "`run --curve ...` records there"
        )
    protocol = json.loads(protocol_file.read_text())
    invocation = shlex.split(protocol["invocations"][-1])
    args = g.build_parser().parse_args(invocation[invocation.index("run") :])
    methods = [m for m in args.methods.split(",") if m]
    seeds = g._seeds(args.seeds)
    tuning_seeds = g._seeds(args.tuning_seeds)
    diagnosed = set(g._seeds(args.diagnose_seeds)) if args.diagnose_seeds else set()

    jobs: list[g.Job] = []
    curve_file = out / "curve.json"
    if curve_file.exists():
        curve = json.loads(curve_file.read_text())
        jobs += [
            g.Job("curve", "adamw", s, float(steps))
            for steps in sorted(int(n) for n in curve["curve"])
            for s in tuning_seeds
        ]
    for method in methods:
        if method in g.GRIDS:
            values, _ = g.tuning_values(out, method, tuning_seeds)
            jobs += [g.Job("tune", method, s, v) for v in values for s in tuning_seeds]
    jobs += [g.Job("test", method, seed) for seed in seeds for method in methods]
    finished = {id(job): _results(g._results(out, job)) for job in jobs}

    def run_cost(results: dict[str, Any]) -> float:
        return float(results.get("train_time_s", 0.0)) + float(results.get("eval_time_s", 0.0))

    budget_steps = {
        int(results["steps"])
        for job in jobs
        if job.phase != "curve" and (results := finished[id(job)]) is not None
    }
    costs: dict[str, list[float]] = {}
    diagnostics: list[float] = []
    for job in jobs:
        results = finished[id(job)]
        # A curve point costs what a run of its length does: only the budget's length counts.
        if job.phase == "curve" and results and int(results["steps"]) not in budget_steps:
            continue
        if results is not None:
            costs.setdefault(job.method, []).append(run_cost(results))
            if "diagnostics_time_s" in results:
                diagnostics.append(float(results["diagnostics_time_s"]))
    two_pass = _median(c for m in TWO_PASS for c in costs.get(m, []))
    anything = _median(c for values in costs.values() for c in values)
    assumed = two_pass if two_pass is not None else anything

    lines = [f"{out}: {protocol.get('task', '?')}, last run with --jobs {args.jobs}"]
    left_seconds = 0.0
    estimated = True
    per_run: list[str] = []
    for method in methods:
        own = _median(costs.get(method, []))
        cost = own if own is not None else assumed
        if cost is None:
            estimated = False
        per_run.append(
            f"{method} {own:.0f} s"
            if own is not None
            else f"{method} ~{cost or 0:.0f} s (none yet)"
        )
        for phase in ("curve", "tune", "test"):
            mine = [j for j in jobs if j.method == method and j.phase == phase]
            if not mine:
                continue
            done = sum(finished[id(j)] is not None for j in mine)
            lines.append(f"  {phase:5} {method:12} {done:3} of {len(mine):3} runs")
            for job in mine:
                if finished[id(job)] is None and phase != "curve":
                    left_seconds += cost or 0.0
                    if phase == "test" and job.seed in diagnosed and diagnostics:
                        left_seconds += statistics.median(diagnostics)
    done_all = sum(r is not None for r in finished.values())
    lines.append(f"  all: {done_all} of {len(jobs)} runs")
    lines.append("  per run (median of finished runs): " + ", ".join(per_run))
    if not diagnostics and diagnosed:
        lines.append("  diagnostics: none measured yet, not in the estimate")
    if estimated:
        hours = left_seconds / 3600
        lines.append(
            f"  left: about {hours:.1f} core-hours, {hours / max(args.jobs, 1):.1f} h at "
            f"--jobs {args.jobs}"
        )
    else:
        lines.append("  left: no finished run to estimate from")
    return "\n".join(lines)
