"""TRAM-θ0 on a LoRA model: the adapter-off reference against the copied reference.

    python benchmarks/peft_reference.py [--steps 10] [--threads 1] [--out benchmarks/results]

The two models of the step-cost benchmark (``benchmarks/conftest.py``: a MiniLM-sized BERT and a
small Llama, built from their configs, one seeded 8 x 64 batch), and with ``--models smollm2`` the
real SmolLM2-135M (offline asset, a 4 x 64 batch; results in ``peft_reference_smollm2.*``), get
LoRA adapters (r = 8,
alpha = 16, dropout 0.05, on the attention's query and value projections; the BERT's classifier
is trained as ``modules_to_save``). Each is trained with ``tram.TRAM(AdamW(lr=2e-5),
trust_region="pretrained")`` twice, with the reference TRAM copies (``Pretrained``) and
with the target :class:`tram.adapters.AdapterOff`. Reported per model and reference:

- ``reference bytes``: what the reference holds (the copied trainable weights, or nothing);
- ``construction peak``: bytes allocated while the target is bound to the model (allocator
  events);
- ``step peak``: peak bytes above the starting level during one ``step(closure)``;
- ``step time``: median process CPU time of a step (and the wall clock beside it), the two
  references interleaved step by step, after one warm-up step each.

Writes ``peft_reference.json`` and ``peft_reference.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import build_model, pick_device, traced_allocations

import tram
from tram.adapters import AdapterOff
from tram.targets import Pretrained

TARGETS = {
    "minilm_bert": ["query", "value"],
    "small_llama": ["q_proj", "v_proj"],
    "smollm2": ["q_proj", "v_proj"],
}
TASKS = {"minilm_bert": "SEQ_CLS", "small_llama": "CAUSAL_LM", "smollm2": "CAUSAL_LM"}


def smollm2(device: torch.device) -> tuple[nn.Module, dict[str, Tensor]]:
    """The real SmolLM2-135M-Instruct (offline asset), dropout 0, a seeded 4 x 64 batch."""
    from transformers import AutoModelForCausalLM

    from tram.experiments.assets import smollm2_path

    torch.manual_seed(0)  # the LoRA initialisation below: the same for both references
    model = AutoModelForCausalLM.from_pretrained(smollm2_path()).to(device).train()
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, model.config.vocab_size, (4, 64), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 48:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return model, {key: value.to(device) for key, value in batch.items()}


def lora_model(name: str, device: torch.device) -> tuple[nn.Module, dict[str, Tensor]]:
    import peft

    model, batch = smollm2(device) if name == "smollm2" else build_model(name, device)
    model.zero_grad(set_to_none=True)
    config = peft.LoraConfig(
        task_type=TASKS[name], r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS[name]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config).train(), batch


def build_optimizer(model: nn.Module, reference: str) -> tram.TRAM:
    trainable = [p for p in model.parameters() if p.requires_grad]
    base = torch.optim.AdamW(trainable, lr=2e-5, weight_decay=0.01)
    return tram.TRAM(base, model, target="pretrained" if reference == "copied" else AdapterOff())


def reference_bytes(optimizer: tram.TRAM) -> int:
    tensors = optimizer.target.state_dict().get("reference", {}).values()
    return sum(t.numel() * t.element_size() for t in tensors)


def bind(target: Any, model: nn.Module) -> Any:
    target.bind(model)
    return target


def measure(name: str, steps: int, device: torch.device) -> dict[str, Any]:
    models: dict[str, nn.Module] = {}
    optimizers: dict[str, tram.TRAM] = {}
    batch: dict[str, Tensor] = {}
    result: dict[str, Any] = {}
    for reference in ("copied", "adapter_off"):
        model, batch = lora_model(name, device)
        kind = Pretrained if reference == "copied" else AdapterOff
        built: list[Any] = []

        def construct(kind: Any = kind, model: nn.Module = model, built: list[Any] = built) -> None:
            built.append(bind(kind(), model))

        construction = traced_allocations(device, construct)
        built.clear()
        models[reference] = model
        optimizers[reference] = build_optimizer(model, reference)
        result[reference] = {
            "reference_bytes": reference_bytes(optimizers[reference]),
            "construction_peak_bytes": construction["peak"],
            "trainable_bytes": sum(
                p.numel() * p.element_size() for p in model.parameters() if p.requires_grad
            ),
        }

    def closure_for(reference: str) -> Any:
        model, optimizer = models[reference], optimizers[reference]

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            return loss

        return closure

    # Each step of both runs starts from the same seed: the same LoRA dropout masks, so the two
    # runs take the same steps and their radii can be compared.
    for reference, optimizer in optimizers.items():  # warm-up step: state allocated
        torch.manual_seed(0)
        optimizer.step(closure_for(reference))
    for reference, optimizer in optimizers.items():
        closure = closure_for(reference)
        torch.manual_seed(1)
        step = traced_allocations(device, lambda: optimizer.step(closure))  # noqa: B023
        result[reference]["step_peak_bytes"] = step["peak"]
    cpu: dict[str, list[float]] = {key: [] for key in optimizers}
    wall: dict[str, list[float]] = {key: [] for key in optimizers}
    for index in range(steps):
        for reference, optimizer in optimizers.items():
            closure = closure_for(reference)
            torch.manual_seed(2 + index)
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            optimizer.step(closure)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            cpu[reference].append(time.process_time() - start_cpu)
            wall[reference].append(time.perf_counter() - start_wall)
    for reference in optimizers:
        result[reference]["step_cpu_s"] = statistics.median(cpu[reference])
        result[reference]["step_wall_s"] = statistics.median(wall[reference])
        result[reference]["radius_history"] = optimizers[reference].radius_history
    same = optimizers["copied"].radius_history == optimizers["adapter_off"].radius_history
    result["same_radii"] = same
    return result


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# TRAM-θ0 on LoRA: adapter-off reference vs copied reference",
        "",
        f"{meta['device']}, {meta['threads']} thread(s), {meta['steps']} timed steps per "
        f"reference (median), torch {meta['torch']}, peft {meta['peft']}. LoRA r=8, alpha=16, "
        "dropout 0.05 on the attention's query/value; a batch of 8 x 64 tokens (SmolLM2: 4 x 64).",
        "",
        "| model | reference | reference holds | construction peak | step peak | step CPU s "
        "| step wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        for reference in ("copied", "adapter_off"):
            r = result[reference]
            lines.append(
                f"| {name} | {reference} | {r['reference_bytes'] / 2**20:.2f} MiB "
                f"| {r['construction_peak_bytes'] / 2**20:.2f} MiB "
                f"| {r['step_peak_bytes'] / 2**20:.1f} MiB | {r['step_cpu_s']:.3f} "
                f"| {r['step_wall_s']:.3f} |"
            )
    lines.append("")
    for name, result in results.items():
        lines.append(f"- {name}: radii of the two runs identical: {result['same_radii']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--models", nargs="*", default=["minilm_bert", "small_llama"], choices=list(TARGETS)
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device()
    import peft

    meta = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": args.threads,
        "steps": args.steps,
        "torch": torch.__version__,
        "peft": peft.__version__,
    }
    results = {name: measure(name, args.steps, device) for name in args.models}
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if device.type == "cpu" else "_cuda"
    if args.models != ["minilm_bert", "small_llama"]:
        suffix += "_" + "_".join(args.models)
    (args.out / f"peft_reference{suffix}.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2)
    )
    text = markdown(results, meta)
    (args.out / f"peft_reference{suffix}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
