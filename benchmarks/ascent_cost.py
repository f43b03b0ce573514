"""The cost of the ascent alone: SAM's against the ASAM form's (TRAM's default), pass by pass.

    python benchmarks/ascent_cost.py [--model small_llama] [--rounds 30] [--foreach]
        [--against OLD_ASCENT.py] [--out DIR]

What ``TwoPassOptimizer.first_step`` and ``restore`` do to the weights of one step of the
step-cost benchmark's model (``benchmarks/conftest.py``, its real parameters and the gradients of
one backward), timed without the forwards and backwards that hide it in a whole step: the
functions of ``tram/_ascent.py`` (``scaled_squared_norm``, the norm read back to the host,
``apply_ascent_``), the gradients zeroed as ``first_step`` does, and ``restore_``. Three
operators: identity (SAM), adaptive with η = 0.01 (``tram.ASAM``'s default) and adaptive with
η = 0 (``tram.TRAM``'s default). ``--against`` loads another implementation of ``_ascent.py``
from a file (e.g. ``git show <commit>:tram/_ascent.py > /tmp/old_ascent.py``) and times it in
the same rounds, interleaved, so that the two can be compared side by side. The gradients are
restored from a copy before every round (not timed). One intra-op thread; process CPU time,
medians over the rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import build_model, pick_device

from tram import _ascent

CASES: dict[str, tuple[str, float]] = {
    "SAM (identity)": ("identity", 0.0),
    "ASAM (adaptive, η = 0.01)": ("adaptive", 0.01),
    "TRAM (adaptive, η = 0)": ("adaptive", 0.0),
}


def load_implementation(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("tram_ascent_against", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_ascent(
    module: Any,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    backups: list[torch.Tensor],
    scaling: str,
    eta: float,
    foreach: bool,
) -> None:
    """The weight-side work of first_step() and restore(), as tram/_wrapper.py does it."""
    total = module.scaled_squared_norm(
        params, grads, backups, scaling=scaling, eta=eta, foreach=foreach
    )
    norm = float(total) ** 0.5
    module.apply_ascent_(
        params,
        grads,
        backups,
        scaling=scaling,
        eta=eta,
        coefficient=0.05 / (norm + module.NORM_EPSILON),
        foreach=foreach,
    )
    if foreach:
        torch._foreach_zero_(grads)
    else:
        for grad in grads:
            grad.zero_()
    module.restore_(params, backups, foreach=foreach)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device()
    model, _ = build_model(args.model, device)
    params = [p.detach() for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    saved = [g.clone() for g in grads]  # type: ignore[union-attr]
    backups = [torch.empty_like(p) for p in params]
    implementations: dict[str, Any] = {"current": _ascent}
    if args.against is not None:
        implementations["against"] = load_implementation(args.against)
    times: dict[str, dict[str, list[float]]] = {
        impl: {case: [] for case in CASES} for impl in implementations
    }
    for round_index in range(args.rounds + 1):  # round 0 warms up
        for case, (scaling, eta) in CASES.items():
            for impl, module in implementations.items():
                torch._foreach_copy_(grads, saved)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.process_time()
                one_ascent(module, params, grads, backups, scaling, eta, args.foreach)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if round_index:
                    times[impl][case].append(time.process_time() - start)
    medians = {
        impl: {case: statistics.median(v) for case, v in cases.items()}
        for impl, cases in times.items()
    }
    return {
        "model": args.model,
        "parameters": sum(p.numel() for p in params),
        "tensors": len(params),
        "foreach": args.foreach,
        "rounds": args.rounds,
        "device": str(device),
        "torch": torch.__version__,
        "against": str(args.against) if args.against else None,
        "median_s": medians,
    }


def markdown(result: dict[str, Any]) -> str:
    impls = list(result["median_s"])
    sam = "SAM (identity)"
    lines = [
        f"# Ascent cost on {result['model']} ({result['parameters'] / 1e6:.1f}M parameters in "
        f"{result['tensors']} tensors)",
        "",
        f"{result['device']}, torch {result['torch']}, one thread, "
        f"{'foreach' if result['foreach'] else 'loop'} path, {result['rounds']} rounds, median "
        "process CPU time of norm + apply_ascent_ + zeroing the gradients + restore_.",
        "",
        "| operator | " + " | ".join(f"{i} ms | {i} × SAM" for i in impls) + " |",
        "|---|" + "---:|---:|" * len(impls),
    ]
    for case in CASES:
        cells = []
        for impl in impls:
            value = result["median_s"][impl][case]
            cells.append(f"{value * 1e3:.1f} | {value / result['median_s'][impl][sam]:.2f}")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    if result["against"]:
        lines += ["", f"`against`: {result['against']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_llama", choices=["minilm_bert", "small_llama"])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--foreach", action="store_true", help="the torch._foreach_* path")
    parser.add_argument("--against", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write ascent_cost.json/.md here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = measure(args)
    text = markdown(result)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        suffix = "_foreach" if args.foreach else ""
        (args.out / f"ascent_cost{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"ascent_cost{suffix}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
