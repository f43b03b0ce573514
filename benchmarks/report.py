"""Summarise a step-cost run: ratios of step times and of memory, checked against issue 6's targets.

Usage::

    python benchmarks/report.py [benchmarks/results/step_cost.json]

reads the pytest-benchmark JSON of ``make bench`` and writes ``step_cost_summary.json`` and
``step_cost.md`` beside it, then prints the Markdown. The benchmark run calls it itself at the end.

Times are per optimizer step: a round of an ``ascent_every=4`` method runs 4 steps and is divided
by 4. Ratios are of medians over every round of every interleaved block (ratios of minima are in
the JSON). On a CPU run with one intra-op thread the targets are checked on process CPU time,
which competing processes disturb far less than wall-clock time; both are reported. Memory:
``held`` is what the wrapper keeps between steps, ``extra`` is held + the step's peak transient
allocation − AdamW's peak transient allocation, both over the trainable parameters' bytes.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

# (name, numerator method, denominator method or "P" for parameter bytes, quantity, limit);
# a limit of None is a ratio shown for information.
TARGETS: list[tuple[str, str, str, str, float | None]] = [
    ("SAM step / AdamW step", "sam", "adamw", "time", 2.05),
    ("SAM step / pytorch_optimizer.SAM step", "sam", "peer_sam", "time", 1.00),
    ("TRAM-x step / SAM step", "tram_x", "sam", "time", 1.20),
    ("TRAM-θ0 step / SAM step", "tram_theta0", "sam", "time", 1.20),
    ("TRAM-θt−1 step / SAM step", "tram_previous", "sam", "time", 1.20),
    ("TRAM-x step / ASAM step (the same ascent form)", "tram_x", "asam", "time", None),
    ("TRAM-θ0 step / ASAM step (the same ascent form)", "tram_theta0", "asam", "time", None),
    ("ASAM step / SAM step", "asam", "sam", "time", None),
    ("TRAM-x radius_every=4 step / SAM step", "tram_x_radius4", "sam", "time", 1.05),
    ("TRAM-θ0 radius_every=4 step / SAM step", "tram_theta0_radius4", "sam", "time", 1.05),
    ("TRAM-x radius_every=8 step / SAM step", "tram_x_radius8", "sam", "time", 1.05),
    ("TRAM-θ0 radius_every=8 step / SAM step", "tram_theta0_radius8", "sam", "time", 1.05),
    ("SAM ascent_every=4 step / AdamW step", "sam_every4", "adamw", "time", 1.35),
    ("TRAM-x ascent_every=4 step / AdamW step", "tram_x_every4", "adamw", "time", 1.35),
    ("SAM extra memory / parameter bytes", "sam", "P", "extra", 1.05),
    ("TRAM-x extra memory / parameter bytes", "tram_x", "P", "extra", 1.05),
    (
        "TRAM-θ0 (bf16 reference) extra memory / parameter bytes",
        "tram_theta0_bf16",
        "P",
        "extra",
        1.6,
    ),
]

# LoRA fine-tuning (``small_llama_lora``): the amortised TRAM against SAM and SAM against AdamW.
# Memory is shown over the adapters' bytes for information only: the logits TRAM keeps for d do
# not shrink with the number of trainable weights.
LORA_TARGETS: list[tuple[str, str, str, str, float | None]] = [
    ("SAM step / AdamW step", "sam", "adamw", "time", 2.05),
    ("TRAM-x radius_every=4 step / SAM step", "tram_x_radius4", "sam", "time", 1.15),
    ("TRAM-θ0 radius_every=4 step / SAM step", "tram_theta0_radius4", "sam", "time", 1.15),
    ("TRAM-x radius_every=8 step / SAM step", "tram_x_radius8", "sam", "time", 1.15),
    ("TRAM-θ0 radius_every=8 step / SAM step", "tram_theta0_radius8", "sam", "time", 1.15),
    (
        "TRAM-θ0 (adapter off) radius_every=4 step / SAM step",
        "tram_adapter_off_radius4",
        "sam",
        "time",
        1.15,
    ),
    ("TRAM-x step / SAM step", "tram_x", "sam", "time", None),
    ("TRAM-θ0 step / SAM step", "tram_theta0", "sam", "time", None),
    ("TRAM-θ0 (adapter off) step / SAM step", "tram_adapter_off", "sam", "time", None),
    ("ASAM step / SAM step", "asam", "sam", "time", None),
    ("TRAM-x radius_every=4 step / ASAM step", "tram_x_radius4", "asam", "time", None),
    ("SAM extra memory / trainable bytes", "sam", "P", "extra", None),
    ("TRAM-x extra memory / trainable bytes", "tram_x", "P", "extra", None),
]


def targets_for(model: str) -> list[tuple[str, str, str, str, float | None]]:
    """The targets a model's rows are checked against: LoRA models have their own."""
    return LORA_TARGETS if model.endswith("_lora") else TARGETS


WRAPPERS = (
    "sam",
    "asam",
    "fisher_sam",
    "tram_x",
    "tram_theta0",
    "tram_theta0_bf16",
    "tram_previous",
    "tram_fisher",
    "tram_x_radius4",
    "tram_theta0_radius4",
    "tram_x_radius8",
    "tram_theta0_radius8",
    "sam_every4",
    "tram_x_every4",
    "tram_adapter_off",
    "tram_adapter_off_radius4",
)


CLOCKS = ("cpu", "wall", "device")
CLOCK_NAMES = {"cpu": "process CPU time", "wall": "wall-clock time", "device": "CUDA-event time"}


def primary_clock(machine: dict[str, Any]) -> str:
    """The CUDA-event time on CUDA; process CPU time on a CPU run with one intra-op thread;
    wall-clock time otherwise.

    With one thread, the CPU time of the process is the work of the step, and it is far less
    disturbed than the wall-clock time when other processes compete for the cores. On a GPU the
    host's CPU time is not the work; the CUDA events around the round measure the device's.
    """
    clock = machine.get("clock")
    if clock in CLOCKS:
        return str(clock)
    if str(machine.get("device", "")).startswith("cuda"):
        return "device"
    return "cpu" if machine.get("device") == "cpu" and machine.get("torch_threads") == 1 else "wall"


def beside_clock(clock: str) -> str:
    """The clock shown in brackets beside the primary one."""
    return "cpu" if clock == "wall" else "wall"


def summarize(bench_json: dict[str, Any]) -> dict[str, Any]:
    """The per-model summary: times, ratios, memory and the targets."""
    machine = dict(bench_json.get("step_cost_machine", {}))
    machine["clock"] = primary_clock(machine)
    if not machine.get("device_name"):
        cpu = bench_json.get("machine_info", {}).get("cpu", {})
        machine["device_name"] = cpu.get("brand_raw") or None
    times: dict[str, dict[str, dict[str, list[float]]]] = {}
    memory: dict[str, dict[str, dict[str, Any]]] = {}
    for bench in bench_json.get("benchmarks", []):
        info = bench.get("extra_info", {})
        model, method = info.get("model"), info.get("method")
        if model is None or method is None:
            continue
        if info.get("kind") == "time":
            steps = info.get("steps_per_round", 1)
            rounds = {
                "wall": bench["stats"].get("data") or info.get("wall_s", []),
                "cpu": info.get("cpu_s", []),
                "device": info.get("device_s", []),
            }
            for clock, data in rounds.items():
                series = times.setdefault(model, {}).setdefault(clock, {}).setdefault(method, [])
                series.extend(t / steps for t in data)
        elif info.get("kind") == "memory":
            memory.setdefault(model, {})[method] = info
    models: dict[str, Any] = {}
    for model in sorted(set(times) | set(memory), key=_model_order):
        models[model] = _summarize_model(
            times.get(model, {}), memory.get(model, {}), machine["clock"], targets_for(model)
        )
    return {"machine": machine, "models": models}


def _model_order(name: str) -> tuple[int, str]:
    return (0 if "bert" in name else 1, name)


def _summarize_model(
    times: dict[str, dict[str, list[float]]],
    memory: dict[str, dict[str, Any]],
    clock: str,
    model_targets: list[tuple[str, str, str, str, float | None]],
) -> dict[str, Any]:
    medians = {
        c: {m: statistics.median(v) for m, v in times.get(c, {}).items() if v} for c in CLOCKS
    }
    minima = {c: {m: min(v) for m, v in times.get(c, {}).items() if v} for c in CLOCKS}
    parameter_bytes = next((info["parameter_bytes"] for info in memory.values()), None)
    base_peak = memory.get("adamw", {}).get("peak_transient_bytes")
    base_first = memory.get("adamw", {}).get("first_step_net_bytes")
    names = [*medians[clock], *(m for m in memory if m not in medians[clock])]
    methods: dict[str, Any] = {}
    for method in names:
        entry: dict[str, Any] = {"label": memory.get(method, {}).get("label", method)}
        for c in CLOCKS:
            if method in medians[c]:
                entry[c] = {
                    "rounds": len(times[c][method]),
                    "median_s": medians[c][method],
                    "min_s": minima[c][method],
                    "ratio_adamw": _ratio(medians[c], method, "adamw"),
                    "ratio_sam": _ratio(medians[c], method, "sam"),
                    "ratio_adamw_of_minima": _ratio(minima[c], method, "adamw"),
                    "ratio_sam_of_minima": _ratio(minima[c], method, "sam"),
                }
        info = memory.get(method)
        if info is not None and parameter_bytes:
            held = info["held_bytes"]
            entry.update(
                held_bytes=held,
                held_by_attribute=info["held_by_attribute"],
                held_ratio=held / parameter_bytes,
                peak_transient_bytes=info["peak_transient_bytes"],
                steady_step_net_bytes=info["steady_step_net_bytes"],
            )
            if base_peak is not None:
                extra = held + info["peak_transient_bytes"] - base_peak
                entry.update(extra_bytes=extra, extra_ratio=extra / parameter_bytes)
            if base_first is not None and info.get("first_step_net_bytes") is not None:
                growth = info["first_step_net_bytes"] - base_first
                entry.update(first_step_growth_bytes=growth, growth_ratio=growth / parameter_bytes)
            allocations = info.get("allocations")
            if allocations is not None:
                entry["allocations"] = allocations
                peak = allocations.get("divergence_peak_bytes")
                if peak is not None:
                    entry["divergence_peak_ratio"] = peak / parameter_bytes
                    if allocations.get("logits_bytes"):
                        entry["divergence_peak_per_logits"] = peak / allocations["logits_bytes"]
        methods[method] = entry
    targets = []
    other = beside_clock(clock)
    for name, numerator, denominator, quantity, limit in model_targets:
        value = other_value = None
        if quantity == "time":
            value = _ratio(medians[clock], numerator, denominator)
            other_value = _ratio(medians[other], numerator, denominator)
        elif quantity == "extra":
            value = methods.get(numerator, {}).get("extra_ratio")
        targets.append(
            {
                "target": name,
                "value": value,
                f"value_{other}_clock": other_value,
                "limit": limit,
                "pass": None if value is None or limit is None else value <= limit,
            }
        )
    checked = [m for m in WRAPPERS if "allocations" in methods.get(m, {})]
    if checked:
        offenders = [m for m in checked if methods[m]["allocations"]["wrapper_large"]]
        targets.append(
            {
                "target": "allocations ≥ 64 KiB in a wrapper's own code after the first step",
                "value": sum(len(methods[m]["allocations"]["wrapper_large"]) for m in checked),
                "limit": 0,
                "pass": not offenders,
                "offenders": offenders,
            }
        )
    return {"parameter_bytes": parameter_bytes, "methods": methods, "targets": targets}


def _ratio(values: dict[str, float], numerator: str, denominator: str) -> float | None:
    if numerator not in values or denominator not in values or not values[denominator]:
        return None
    return values[numerator] / values[denominator]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _bytes(value: float) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def render_markdown(summary: dict[str, Any]) -> str:
    """The tables of ``step_cost.md``."""
    machine = summary.get("machine", {})
    clock = machine.get("clock", "wall")
    other = beside_clock(clock)
    clock_name = CLOCK_NAMES
    lines = ["# Step cost of the tram optimizers", ""]
    if machine:
        lines += [
            f"Machine: {machine.get('device')} ({machine.get('device_name') or 'unknown'}), "
            f"{machine.get('cpu_count')} CPUs, torch {machine.get('torch')} with "
            f"{machine.get('torch_threads')} intra-op thread(s). Load average (1, 5, 15 min) "
            f"{machine.get('loadavg_start')} at the start and {machine.get('loadavg_end')} at "
            f"the end; the run took {machine.get('seconds')} s.",
            "",
        ]
    lines += [
        f"Batch 8 x 64 tokens. Times are per optimizer step (both passes and TRAM's reference "
        f"forward included), medians over all interleaved rounds; ratios are of medians, in "
        f"{clock_name[clock]} (targets) and in {clock_name[other]} (beside, in brackets). "
        "Memory is over the trainable parameters' bytes P: *held* between steps, *extra* = held "
        "+ the peak transient allocation of a step − AdamW's. *Own allocs* are the wrapper's own "
        "allocations per step after the first (its model forwards, the divergence, the closure "
        "and the base step excluded).",
        "",
    ]
    for model, data in summary.get("models", {}).items():
        p_bytes = data.get("parameter_bytes")
        size = f", {p_bytes / 4 / 1e6:.2f}M trainable fp32 parameters" if p_bytes else ""
        lines += [f"## {model}{size}", ""]
        lines += [
            f"| method | {clock} s/step | × AdamW | × SAM | held / P | extra / P "
            "| own allocs/step | largest own alloc |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for entry in data["methods"].values():
            main, beside = entry.get(clock, {}), entry.get(other, {})
            allocations = entry.get("allocations")
            own = largest = "–"
            if allocations is not None:
                region = allocations["regions"].get("wrapper")
                steps = allocations["steps"]
                own = f"{allocations['wrapper_count'] / steps:.0f} "
                own += f"({_bytes(allocations['wrapper_bytes'] / steps)})"
                largest = _bytes(region["largest"]) if region else "–"
            lines.append(
                f"| {entry['label']} | {_fmt(main.get('median_s'), 3)} "
                f"| {_fmt(main.get('ratio_adamw'))} [{_fmt(beside.get('ratio_adamw'))}] "
                f"| {_fmt(main.get('ratio_sam'))} [{_fmt(beside.get('ratio_sam'))}] "
                f"| {_fmt(entry.get('held_ratio'))} | {_fmt(entry.get('extra_ratio'))} "
                f"| {own} | {largest} |"
            )
        notes = [
            f"- {entry['label']}: one call of the divergence (d) peaks at "
            f"{_bytes(entry['allocations']['divergence_peak_bytes'])} above its inputs, "
            f"{entry['divergence_peak_ratio']:.2f} × P"
            + (
                f", {entry['divergence_peak_per_logits']:.1f} × the fp32 logits"
                if "divergence_peak_per_logits" in entry
                else ""
            )
            + "."
            for entry in data["methods"].values()
            if "divergence_peak_ratio" in entry
        ]
        if notes:
            lines += ["", "Transient memory of TRAM's divergence (part of *extra*):", "", *notes]
        lines += ["", "| target | measured | limit | result |", "|---|---:|---:|---|"]
        for target in data["targets"]:
            value = target["value"]
            shown = str(value) if isinstance(value, int) else _fmt(value, 3)
            beside_value = target.get(f"value_{other}_clock")
            if beside_value is not None:
                shown = f"{shown} [{_fmt(beside_value, 3)}]"
            result = {True: "pass", False: "**miss**", None: "not measured"}[target["pass"]]
            limit = "–" if target["limit"] is None else f"≤ {target['limit']}"
            if target["limit"] is None and target["value"] is not None:
                result = "information"
            if target.get("offenders"):
                result += f" ({', '.join(target['offenders'])})"
            lines.append(f"| {target['target']} | {shown} | {limit} | {result} |")
        lines.append("")
    return "\n".join(lines)


def write_outputs(summary: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_cost_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "step_cost.md").write_text(render_markdown(summary))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else Path(__file__).resolve().parent / "results/step_cost.json"
    summary = summarize(json.loads(path.read_text()))
    write_outputs(summary, path.parent)
    print(render_markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
