"""One rank of the two-process gloo run behind ``tests/test_tram_distributed.py``.

Launched by the test, once per rank, as::

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p \
        python tram_distributed_worker.py SPEC OUT

``SPEC`` (a ``torch.save`` file written by the test) holds the initial weights of a small
embedding model, each rank's data shard for every step and the hyperparameters. For every
scenario the worker trains a ``DistributedDataParallel`` copy, or an FSDP2 (``fully_shard``)
one, with ``TRAM.step(closure)`` or ``TRAMFisher.step(closure)`` (the wrapped model passed as
``model=``), records the full weights before and after every step and the radius, and writes
``OUT/rank<r>.pt``. A scenario that raises records its traceback instead; the scenarios that
must raise record the message.

Nothing here computes a reference: the test does that in one process with plain tensor maths.
"""

from __future__ import annotations

import contextlib
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
    "fisher": {"trust_region": "fisher"},
    "noise_accumulate": {"trust_region": "noise", "micro_batches": 2},
    "fsdp2_noise_accumulate": {"trust_region": "noise", "sharded": True, "micro_batches": 2},
    "fsdp2_noise": {"trust_region": "noise", "sharded": True},
    "fsdp2_fisher": {"trust_region": "fisher", "sharded": True},
    # Uneven inputs under DistributedDataParallel.join(): rank 1 has one batch, rank 0 all.
    "noise_local_join": {"trust_region": "noise", "local_ascent": True, "joined_after": 1},
}
UNEVEN_SYNCHRONISED = {"trust_region": "noise", "local_ascent": False, "joined_after": 1}
"""Refused once rank 1 has joined; run last: the refusal leaves rank 1 inside ``Join``'s
collectives, and the process group cannot be used after it."""
WEIGHT_TARGETS = ("pretrained", "previous", "ema")
"""The targets that keep reference weights, which FSDP2's sharded parameters cannot serve."""


class EmbeddingClassifier(nn.Module):
    """Token embedding, mean over positions, a tanh layer and a linear head."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.embed = nn.Embedding(spec["vocab"], spec["width"])
        self.hidden = nn.Linear(spec["width"], spec["hidden"])
        self.head = nn.Linear(spec["hidden"], spec["classes"])

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(ids).mean(dim=1))))


def full(tensor: Tensor) -> Tensor:
    """A detached copy of ``tensor``, gathered first when it is an FSDP2 ``DTensor``."""
    gather = getattr(tensor, "full_tensor", None)
    return (gather() if callable(gather) else tensor).detach().clone()


def snapshot(model: nn.Module) -> list[Tensor]:
    return [full(p) for p in model.parameters()]


def fully_sharded(spec: dict[str, Any]) -> nn.Module:
    """The model with every layer and the root under FSDP2's ``fully_shard``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = EmbeddingClassifier(spec)
    model.load_state_dict(spec["weights"])
    for layer in (model.embed, model.hidden, model.head, model):
        fully_shard(layer, mesh=mesh)
    return model


def make_optimizer(
    spec: dict[str, Any], model: nn.Module, wrapped: nn.Module, options: dict[str, Any]
) -> tram.TwoPassOptimizer:
    base = torch.optim.AdamW(wrapped.parameters(), lr=spec["lr"], eps=spec["adam_eps"])
    if options["trust_region"] == "fisher":
        return tram.TRAMFisher(
            base,
            wrapped,
            sigma=spec["sigma"],
            seed=spec["seed"],
            embeddings=model.embed,
            rho=spec["fisher_rho"],
            eta=spec["fisher_eta"],
        )
    if options["trust_region"] == "noise":  # the other trust regions take no noise options
        options = {**options, "sigma": spec["sigma"], "seed": spec["seed"]}
    return tram.TRAM(base, wrapped, **options)


def run(
    spec: dict[str, Any], rank: int, options: dict[str, Any], record: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train ``spec["steps"]`` steps, or, with ``joined_after=k``, train inside
    ``DistributedDataParallel.join()`` where rank 1 runs out of batches after k steps. The
    record is filled as the steps go (a step that raises leaves the ones before it)."""
    options = dict(options)
    micro_batches = options.pop("micro_batches", 1)
    joined_after = options.pop("joined_after", None)
    if options.pop("sharded", False):
        model = wrapped = fully_sharded(spec)
    else:
        model = EmbeddingClassifier(spec)
        model.load_state_dict(spec["weights"])
        wrapped = DistributedDataParallel(model)
    optimizer = make_optimizer(spec, model, wrapped, options)
    record = {} if record is None else record
    record |= {"before": [], "after": [], "radius": []}
    record["param_types"] = sorted({type(p).__name__ for p in model.parameters()})
    steps = spec["steps"] if joined_after is None or rank == 0 else joined_after
    join: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if joined_after is not None:
        assert isinstance(wrapped, DistributedDataParallel), "Join is DDP's"
        join = wrapped.join()
    try:
        with join:
            train(spec, rank, steps, wrapped, optimizer, micro_batches, record)
    finally:
        # After Join's post-hook, which gives every rank the last joiner's weights; after a
        # step that raised, the weights it left.
        record["final"] = snapshot(model)
    return record


def train(
    spec: dict[str, Any],
    rank: int,
    steps: int,
    wrapped: nn.Module,
    optimizer: tram.TwoPassOptimizer,
    micro_batches: int,
    record: dict[str, Any],
) -> None:
    model = wrapped.module if isinstance(wrapped, DistributedDataParallel) else wrapped
    for step in range(steps):
        ids, y = spec["ids"][step][rank], spec["labels"][step][rank]

        def closure(ids: Tensor = ids, y: Tensor = y) -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(wrapped(ids), y)
            loss.backward()
            return loss

        if micro_batches > 1:
            closure = tram.accumulating_closure(
                optimizer,
                list(zip(ids.chunk(micro_batches), y.chunk(micro_batches), strict=True)),
                lambda batch: F.cross_entropy(wrapped(batch[0]), batch[1]),
                model=wrapped,
            )

        record["before"].append(snapshot(model))
        optimizer.step(closure)
        record["after"].append(snapshot(model))
        record["radius"].append(optimizer.last_radius)


def uneven_synchronised_refusal(spec: dict[str, Any], rank: int) -> dict[str, Any]:
    """TRAM's synchronised ascent under ``join()`` once rank 1 has joined: rank 0's error, and
    its weights before and after the refused step (rank 1 fails in gloo when rank 0 exits)."""
    record: dict[str, Any] = {"message": None}
    try:
        run(spec, rank, UNEVEN_SYNCHRONISED, record)
    except RuntimeError as error:
        record["message"] = str(error)
    return record


def weight_target_refusals(spec: dict[str, Any], rank: int) -> dict[str, Any]:
    """Build TRAM with each weight target on an FSDP2 model; record each rank's error."""
    model = fully_sharded(spec)
    messages: dict[str, str | None] = {}
    for trust_region in WEIGHT_TARGETS:
        base = torch.optim.AdamW(model.parameters(), lr=spec["lr"])
        try:
            tram.TRAM(base, model, trust_region=trust_region)
        except ValueError as error:
            messages[trust_region] = str(error)
        else:
            messages[trust_region] = None
    return {"messages": messages}


def main() -> None:
    spec_path, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    spec: dict[str, Any] = torch.load(spec_path, weights_only=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=spec["timeout_s"]))
    rank = dist.get_rank()
    results: dict[str, Any] = {}
    try:
        runs: dict[str, Any] = {
            name: lambda spec, rank, options=options: run(spec, rank, options)
            for name, options in SCENARIOS.items()
        }
        runs["fsdp2_weight_targets"] = weight_target_refusals
        for name, scenario in runs.items():
            torch.manual_seed(0)
            try:
                results[name] = scenario(spec, rank)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
                traceback.print_exc()
            dist.barrier()  # a failure stays inside its scenario
        # Last: rank 0 refuses while rank 1 waits in Join's collectives, which fail in gloo
        # once rank 0's process has exited; nothing can run on the group after it.
        results["noise_join"] = uneven_synchronised_refusal(spec, rank)
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
