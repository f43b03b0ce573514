"""One rank of the two-process gloo run behind ``tests/test_tram_distributed.py``.

Launched by the test, once per rank, as::

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tram_ddp_worker.py SPEC OUT

``SPEC`` (a ``torch.save`` file written by the test) holds the initial weights of a small
embedding model, each rank's data shard for every step and the hyperparameters. For every
scenario the worker trains a ``DistributedDataParallel`` copy with ``TRAM.step(closure)`` (the
DDP wrapper passed as ``model=``), records the weights before and after every step and the
radius, and writes ``OUT/rank<r>.pt``. A scenario that raises records its traceback instead.

Nothing here computes a reference: the test does that in one process with plain tensor maths.
"""

from __future__ import annotations

import datetime
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import tram

SCENARIOS = {
    "noise": {"trust_region": "noise", "local_ascent": False},
    "pretrained": {"trust_region": "pretrained", "local_ascent": False},
    "noise_local": {"trust_region": "noise", "local_ascent": True},
    "pretrained_local": {"trust_region": "pretrained", "local_ascent": True},
}


class EmbeddingClassifier(nn.Module):
    """Token embedding, mean over positions, a tanh layer and a linear head."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.embed = nn.Embedding(spec["vocab"], spec["width"])
        self.hidden = nn.Linear(spec["width"], spec["hidden"])
        self.head = nn.Linear(spec["hidden"], spec["classes"])

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(ids).mean(dim=1))))


def snapshot(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def run(spec: dict[str, Any], rank: int, options: dict[str, Any]) -> dict[str, Any]:
    model = EmbeddingClassifier(spec)
    model.load_state_dict(spec["weights"])
    ddp = DistributedDataParallel(model)
    base = torch.optim.AdamW(ddp.parameters(), lr=spec["lr"], eps=spec["adam_eps"])
    if options["trust_region"] == "noise":  # the other trust regions take no noise options
        options = {**options, "sigma": spec["sigma"], "seed": spec["seed"]}
    optimizer = tram.TRAM(base, ddp, **options)
    record: dict[str, Any] = {"before": [], "after": [], "radius": []}
    for step in range(spec["steps"]):
        ids, y = spec["ids"][step][rank], spec["labels"][step][rank]

        def closure(ids: Tensor = ids, y: Tensor = y) -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(ddp(ids), y)
            loss.backward()
            return loss

        record["before"].append(snapshot(model))
        optimizer.step(closure)
        record["after"].append(snapshot(model))
        record["radius"].append(optimizer.last_radius)
    return record


def main() -> None:
    spec_path, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    spec: dict[str, Any] = torch.load(spec_path, weights_only=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=spec["timeout_s"]))
    rank = dist.get_rank()
    results: dict[str, Any] = {}
    try:
        for name, options in SCENARIOS.items():
            torch.manual_seed(0)
            try:
                results[name] = run(spec, rank, options)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
                traceback.print_exc()
            dist.barrier()  # a failure stays inside its scenario
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
