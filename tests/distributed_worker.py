"""One rank of the two-process gloo run behind ``tests/test_distributed.py``.

Launched by the tests, once per rank, as::

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python distributed_worker.py SPEC OUT

``SPEC`` is a ``torch.save`` file written by the tests: the initial weights of a small MLP, every
rank's data shard for every step and the hyperparameters. The worker runs every scenario in one
process group (one launch for the whole test module), records what the tests check and writes
``OUT/rank<r>.pt``. A scenario that raises records its traceback instead of its results, so that
one failing scenario fails its own test and not the others.

Nothing here computes a reference: the tests do that, single-process, with plain tensor maths.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

import tram
from tests.helpers import counting_backend, cross_entropy_closure
from tram.targets import NoisedInputs

Spec = dict[str, Any]
Record = dict[str, Any]


def build_model(spec: Spec) -> nn.Sequential:
    """The MLP of the tests, loaded with the spec's initial weights (identical on every rank)."""
    model = nn.Sequential(
        nn.Linear(spec["in_features"], spec["hidden"]),
        nn.Tanh(),
        nn.Linear(spec["hidden"], spec["classes"]),
    )
    model.load_state_dict(spec["weights"])
    return model


def full(tensor: Tensor) -> Tensor:
    """A detached, full (gathered, for an FSDP2 ``DTensor``) copy of ``tensor``."""
    gather = getattr(tensor, "full_tensor", None)
    value = gather() if callable(gather) else tensor
    return value.detach().clone()


def run_steps(
    spec: Spec,
    rank: int,
    model: nn.Module,
    optimizer: tram.TwoPassOptimizer,
    *,
    micro_batches: int = 1,
    allreduce_counter: dict[str, Any] | None = None,
) -> Record:
    """Run ``spec["steps"]`` steps of ``optimizer.step(closure)`` on this rank's shards."""
    record: Record = {
        "params": [],
        "perturbed": [],
        "norms": [],
        "local_shard_norms": [],
        "losses": [],
        "closure_calls": [],
        "allreduces": [],
    }
    params = list(model.parameters())

    def loss_fn(batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, targets = batch
        return F.cross_entropy(model(inputs), targets)

    for step in range(spec["steps"]):
        x, y = spec["x"][step, rank], spec["y"][step, rank]
        if micro_batches > 1:
            batches = list(zip(x.chunk(micro_batches), y.chunk(micro_batches)))
            inner = tram.accumulating_closure(optimizer, batches, loss_fn, model=model)
        else:

            def inner(x: Tensor = x, y: Tensor = y) -> Tensor:
                optimizer.zero_grad()
                loss = loss_fn((x, y))
                loss.backward()
                return loss

        calls: list[int] = []

        def closure(inner: Callable[[], Tensor] = inner, calls: list[int] = calls) -> Tensor:
            calls.append(len(calls))
            if len(calls) == 2:
                # Called by the wrapper at θ+ε: these are the perturbed weights.
                record["perturbed"].append([full(p) for p in params])
            loss = inner()
            if len(calls) == 1:
                # The gradient norm of this rank's own shard (FSDP2) or replica (DDP).
                local = [g.to_local() if hasattr(g, "to_local") else g for g in _grads(params)]
                record["local_shard_norms"].append(
                    float(torch.sqrt(sum((g.double() ** 2).sum() for g in local)))
                )
            return loss

        before = allreduce_counter["calls"] if allreduce_counter is not None else 0
        loss = optimizer.step(closure)
        if allreduce_counter is not None:
            record["allreduces"].append(allreduce_counter["calls"] - before)
        assert not optimizer.is_perturbed
        record["closure_calls"].append(len(calls))
        record["losses"].append(float(loss.detach()))
        record["norms"].append(optimizer.last_ascent_norm)
        record["params"].append([full(p) for p in params])
    return record


def _grads(params: list[Tensor]) -> list[Tensor]:
    return [p.grad for p in params if p.grad is not None]


class OwnForward(nn.Module):
    """``inner`` behind a forward of its own: dynamo traces it (it skips ``nn.Sequential``'s,
    torch.nn's own code, and would compile nothing)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)


def ddp_scenario(
    spec: Spec,
    rank: int,
    method: str,
    *,
    local_ascent: bool = False,
    micro_batches: int = 1,
    compiled: bool = False,
    zero: bool = False,
) -> Record:
    """DDP with a comm hook that counts the bucket all-reduces; with ``compiled``, the
    ``torch.compile(DDP(model))`` of torch's DDP tutorial (dynamo splits the graph at the
    buckets, whose all-reduces run between the pieces), with ``aot_eager`` so the steps are
    the eager ones bit for bit; with ``zero``, the SGD sharded by ``ZeroRedundancyOptimizer``
    (each rank steps the parameters it owns and broadcasts them)."""
    model: nn.Module = build_model(spec)
    if compiled:
        model = OwnForward(model)
    ddp = DistributedDataParallel(model)
    counter: dict[str, Any] = {"calls": 0, "buckets": set()}

    # No annotations: DDP checks them against the real classes, and this module's are strings.
    def counting_allreduce(state, bucket):  # type: ignore[no-untyped-def]
        state["calls"] += 1
        state["buckets"].add(bucket.index())
        return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]

    ddp.register_comm_hook(counter, counting_allreduce)
    called: nn.Module = ddp
    backend, graphs = counting_backend()
    if compiled:
        torch._dynamo.reset()
        called = torch.compile(ddp, backend=backend)  # type: ignore[assignment]
    base: torch.optim.Optimizer
    if zero:
        base = ZeroRedundancyOptimizer(
            ddp.parameters(),
            optimizer_class=torch.optim.SGD,
            lr=spec["lr"],
            momentum=spec["momentum"],
        )
    else:
        base = torch.optim.SGD(ddp.parameters(), lr=spec["lr"], momentum=spec["momentum"])
    optimizer = make_wrapper(spec, method, base, model=called, local_ascent=local_ascent)
    record = run_steps(
        spec, rank, called, optimizer, micro_batches=micro_batches, allreduce_counter=counter
    )
    record["buckets"] = sorted(counter["buckets"])
    record["graphs"] = len(graphs)
    if zero:  # the parameters this rank's local optimizer steps
        record["owned"] = [p.numel() for g in base.optim.param_groups for p in g["params"]]  # type: ignore[attr-defined]
    return record


def fsdp_model(spec: Spec) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = build_model(spec)
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp_scenario(
    spec: Spec, rank: int, method: str, base_name: str, *, foreach: bool, micro_batches: int = 1
) -> Record:
    model = fsdp_model(spec)
    record_kinds = sorted({type(p).__name__ for p in model.parameters()})
    if base_name == "sgd":
        base: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=spec["lr"], momentum=spec["momentum"]
        )
    else:
        base = torch.optim.AdamW(
            model.parameters(), lr=spec["adam_lr"], weight_decay=spec["weight_decay"]
        )
    optimizer = make_wrapper(spec, method, base, model=model, foreach=foreach)
    record = run_steps(spec, rank, model, optimizer, micro_batches=micro_batches)
    record["param_types"] = record_kinds
    return record


def fsdp_local_ascent_error(spec: Spec, rank: int) -> Record:
    """``local_ascent=True`` on FSDP2 (no ``no_sync``) must raise before touching anything."""
    model = fsdp_model(spec)
    base = torch.optim.SGD(model.parameters(), lr=spec["lr"])
    optimizer = tram.SAM(base, rho=spec["rho"], model=model, local_ascent=True)
    before = [full(p) for p in model.parameters()]
    calls: list[int] = []

    def closure() -> Tensor:
        calls.append(1)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(spec["x"][0, rank]), spec["y"][0, rank])
        loss.backward()
        return loss

    try:
        optimizer.step(closure)
    except ValueError as error:
        message: str | None = str(error)
    else:
        message = None
    after = [full(p) for p in model.parameters()]
    return {
        "message": message,
        "closure_calls": len(calls),
        "unchanged": all(torch.equal(a, b) for a, b in zip(before, after, strict=True)),
    }


def train_steps(
    spec: Spec, rank: int, model: nn.Module, optimizer: tram.TwoPassOptimizer, steps: range
) -> list[list[Tensor]]:
    """``step(closure)`` on this rank's shard of each of ``steps``; the full weights after each."""
    params = []
    for step in steps:
        x, y = spec["x"][step, rank], spec["y"][step, rank]
        optimizer.step(cross_entropy_closure(optimizer, model, x, y))
        params.append([full(p) for p in model.parameters()])
    return params


def fsdp_checkpoint_resume(spec: Spec, rank: int, method: str, layout: str) -> Record:
    """Train a step, checkpoint through ``torch.distributed.checkpoint``'s state-dict functions
    the way accelerate and Lightning do under FSDP2, train on; then a fresh model and optimizer
    load the checkpoint and train the same steps. Records both runs' parameters after every step.

    ``layout``: ``"sharded"`` (every rank writes its shards with ``dcp.save``) or ``"full"``
    (rank 0 ``torch.save``-s the gathered state dict; on load, rank 0 reads it and broadcasts,
    ``broadcast_from_rank0=True``, the other ranks pass an empty dict). SAM runs with
    ``ascent_every=2`` (its step counter decides which steps ascend); TRAM-x ascends every
    step, so the noise generator's state decides its noise."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.tensor import distribute_tensor

    directory = Path(spec["checkpoint_dir"]) / f"{method}-{layout}"
    full_file = directory / "optimizer.pt"

    def build() -> tuple[nn.Module, tram.TwoPassOptimizer]:
        model = fsdp_model(spec)
        base = torch.optim.AdamW(
            model.parameters(), lr=spec["adam_lr"], weight_decay=spec["weight_decay"]
        )
        if method == "TRAM-x":
            noise = NoisedInputs(sigma=spec["sigma"], embeddings=model[0], seed=spec["noise_seed"])
            return model, tram.TRAM(base, model=model, target=noise)
        return model, tram.SAM(base, rho=spec["rho"], model=model, ascent_every=2)

    resume_at = range(1, spec["steps"])
    model, optimizer = build()
    train_steps(spec, rank, model, optimizer, range(1))
    # The model's state is carried by hand (a resumed process would load it the same way);
    # what is under test is the optimizer's.
    weights = [full(p) for p in model.parameters()]
    if layout == "sharded":
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=directory)
    else:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        gathered = get_optimizer_state_dict(model, optimizer, options=options)
        if rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            torch.save(gathered, full_file)
        dist.barrier()
    straight = train_steps(spec, rank, model, optimizer, resume_at)

    model, resumed = build()
    with torch.no_grad():
        for param, value in zip(model.parameters(), weights, strict=True):
            shard = distribute_tensor(value, param.device_mesh, param.placements)
            param.to_local().copy_(shard.to_local())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if layout == "sharded":
            checkpoint = {"optimizer": get_optimizer_state_dict(model, resumed)}
            dcp.load(checkpoint, checkpoint_id=directory)
            set_optimizer_state_dict(model, resumed, checkpoint["optimizer"])
        else:
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            loaded = torch.load(full_file, weights_only=True) if rank == 0 else {}
            set_optimizer_state_dict(model, resumed, loaded, options=options)
    steps_after_load = resumed.steps
    return {
        "straight": straight,
        "resumed": train_steps(spec, rank, model, resumed, resume_at),
        "steps_after_load": steps_after_load,
        "load_warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)],
        "live_group_keys": sorted(resumed.param_groups[0]),
    }


def ddp_with_adamw(
    spec: Spec, weights: dict[str, Tensor] | None = None, *, zero: bool = False
) -> tuple[DistributedDataParallel, torch.optim.Optimizer]:
    """A fresh model (with ``weights`` loaded, if given) in DDP, and an AdamW over it (sharded
    by ``ZeroRedundancyOptimizer`` with ``zero``)."""
    model = build_model(spec)
    if weights is not None:
        model.load_state_dict(weights)
    ddp = DistributedDataParallel(model)
    options = {"lr": spec["adam_lr"], "weight_decay": spec["weight_decay"]}
    if zero:
        sharded = ZeroRedundancyOptimizer(
            ddp.parameters(), optimizer_class=torch.optim.AdamW, **options
        )
        return ddp, sharded
    return ddp, torch.optim.AdamW(ddp.parameters(), **options)


def ddp_checkpoint_resume(spec: Spec, rank: int, method: str, *, zero: bool = False) -> Record:
    """Train a step under DDP, rank 0 ``torch.save``-s the model's and the optimizer's
    ``state_dict()``, train on; then every rank loads that file into a fresh model, DDP and
    optimizer and trains the same steps. Records both runs' parameters after every step.
    SAM runs with ``ascent_every=2`` (the step counter decides which steps ascend); TRAM-x
    ascends every step, so the noise stream's seed and count decide its noise: its seed is
    left out, so it is torch.initial_seed(), alike on every rank in the first run and otherwise
    on each rank in the resumed one, where the checkpoint's seed must win; TRAM-θ0's optimizer
    is built after the model loaded θ1, so only the checkpoint can give back its θ0. With
    ``zero`` the AdamW is sharded by ``ZeroRedundancyOptimizer``, whose state every rank
    consolidates on rank 0 before rank 0 saves."""
    path = Path(spec["checkpoint_dir"]) / f"ddp-{method}{'-zero' if zero else ''}.pt"

    def build(weights: dict[str, Tensor] | None = None) -> tuple[nn.Module, tram.TwoPassOptimizer]:
        ddp, base = ddp_with_adamw(spec, weights, zero=zero)
        if method == "TRAM-x":
            resumed_seed = spec["noise_seed"] + 1 + rank  # a resumed process seeded otherwise
            torch.manual_seed(spec["noise_seed"] if weights is None else resumed_seed)
            noise = NoisedInputs(sigma=spec["sigma"], embeddings=ddp.module[0])
            return ddp, tram.TRAM(base, model=ddp, target=noise)
        if method == "TRAM-θ0":
            return ddp, tram.TRAM(base, model=ddp, trust_region="pretrained")
        return ddp, tram.SAM(base, rho=spec["rho"], model=ddp, ascent_every=2)

    resume_at = range(1, spec["steps"])
    model, optimizer = build()
    train_steps(spec, rank, model, optimizer, range(1))
    if zero:
        optimizer.consolidate_state_dict(to=0)
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict()}, path)
    dist.barrier()
    straight = train_steps(spec, rank, model, optimizer, resume_at)

    checkpoint = torch.load(path, weights_only=True)
    model, resumed = build(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    return {
        "straight": straight,
        "resumed": train_steps(spec, rank, model, resumed, resume_at),
        # ZeroRedundancyOptimizer's load sets the entries of other ranks' parameters to None.
        "checkpoint_intact": all(v is not None for v in checkpoint["optimizer"]["state"].values()),
    }


def ddp_resume_local_reused_radius(spec: Spec, rank: int) -> Record:
    """TRAM-x with ``local_ascent=True`` and ``radius_every=2`` under DDP: each rank measures
    its own d on steps 0 and 2 and reuses it on steps 1 and 3. Rank 0 saves after step 0; every
    rank loads that checkpoint and trains steps 1 to 3 again. Records, after every step of both
    runs, the d each rank used, how many it has measured, and the weights; and the d of steps 0
    and 1 with ``radius_every=1``, which measures step 1 as the resumed run does."""
    path = Path(spec["checkpoint_dir"]) / "ddp-local-reused-radius.pt"

    def build(
        weights: dict[str, Tensor] | None = None, radius_every: int = 2
    ) -> tuple[nn.Module, tram.TRAM]:
        ddp, base = ddp_with_adamw(spec, weights)
        noise = NoisedInputs(sigma=spec["sigma"], embeddings=ddp.module[0], seed=spec["noise_seed"])
        return ddp, tram.TRAM(
            base, model=ddp, target=noise, radius_every=radius_every, local_ascent=True
        )

    def run(model: nn.Module, optimizer: tram.TRAM, steps: range) -> Record:
        record: Record = {"radius": [], "measured": [], "params": []}
        for step in steps:
            record["params"] += train_steps(spec, rank, model, optimizer, range(step, step + 1))
            record["radius"].append(optimizer.last_radius)
            record["measured"].append(len(optimizer.radius_history))
        return record

    model, optimizer = build()
    first = run(model, optimizer, range(1))
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict()}, path)
    dist.barrier()
    straight = run(model, optimizer, range(1, spec["steps"]))
    checkpoint = torch.load(path, weights_only=True)
    model, resumed = build(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    saved = checkpoint["optimizer"]["param_groups"][0]["tram"]
    return {
        "first": first,
        "straight": straight,
        "resumed": run(model, resumed, range(1, spec["steps"])),
        "saved": (saved["last_radius"], saved["last_radius_per_rank"]),
        "every_step": run(*build(radius_every=1), range(2)),
    }


def mixed_precision(spec: Spec, rank: int, dtype: torch.dtype, *, sharded: bool) -> Record:
    """SAM under DDP (or FSDP2 if ``sharded``) with CPU autocast: bf16 through
    ``step(closure)``; fp16 through ``tram.scaled_step`` with ``torch.amp.GradScaler("cpu")``.
    In the fp16 run rank 1's loss at θ+ε of step ``spec["overflow_step"]`` is inf: the
    gradient reduction carries the overflow to every rank, and each must skip that step with
    its weights at θ."""
    ddp = fsdp_model(spec) if sharded else DistributedDataParallel(build_model(spec))
    base = torch.optim.SGD(ddp.parameters(), lr=spec["lr"], momentum=spec["momentum"])
    optimizer = tram.SAM(base, rho=spec["rho"], model=ddp)
    scaler = torch.amp.GradScaler("cpu", init_scale=spec["init_scale"])
    record: Record = {"params": [], "scales": []}
    for step in range(spec["steps"]):
        x, y = spec["x"][step, rank], spec["y"][step, rank]
        calls: list[int] = []

        def loss_fn(x: Tensor = x, y: Tensor = y, step: int = step, calls: list = calls) -> Tensor:
            calls.append(1)
            with torch.autocast("cpu", dtype=dtype):
                loss = F.cross_entropy(ddp(x), y)
            overflow = dtype == torch.float16 and step == spec["overflow_step"]
            return loss * float("inf") if overflow and rank == 1 and len(calls) == 2 else loss

        if dtype == torch.float16:
            tram.scaled_step(optimizer, scaler, loss_fn)
            record["scales"].append(scaler.get_scale())
        else:

            def closure(loss_fn: Callable[[], Tensor] = loss_fn) -> Tensor:
                optimizer.zero_grad()
                loss = loss_fn()
                loss.backward()
                return loss

            optimizer.step(closure)
        record["params"].append([full(p) for p in ddp.parameters()])
    return record


def make_wrapper(
    spec: Spec, method: str, base: torch.optim.Optimizer, **kwargs: Any
) -> tram.TwoPassOptimizer:
    if method == "SAM":
        return tram.SAM(base, rho=spec["rho"], **kwargs)
    if method == "ASAM":
        return tram.ASAM(base, rho=spec["asam_rho"], eta=spec["asam_eta"], **kwargs)
    if method == "FisherSAM":
        return tram.FisherSAM(base, rho=spec["fisher_rho"], eta=spec["fisher_eta"], **kwargs)
    raise ValueError(method)


SCENARIOS: dict[str, Callable[[Spec, int], Record]] = {
    "ddp_sam_sync": lambda spec, rank: ddp_scenario(spec, rank, "SAM"),
    "ddp_asam_sync": lambda spec, rank: ddp_scenario(spec, rank, "ASAM"),
    "ddp_sam_local": lambda spec, rank: ddp_scenario(spec, rank, "SAM", local_ascent=True),
    "ddp_asam_local": lambda spec, rank: ddp_scenario(spec, rank, "ASAM", local_ascent=True),
    "ddp_sam_accumulate": lambda spec, rank: ddp_scenario(spec, rank, "SAM", micro_batches=2),
    "ddp_compiled_sam_sync": lambda spec, rank: ddp_scenario(spec, rank, "SAM", compiled=True),
    "ddp_zero_sam_sync": lambda spec, rank: ddp_scenario(spec, rank, "SAM", zero=True),
    "ddp_compiled_sam_local": lambda spec, rank: ddp_scenario(
        spec, rank, "SAM", local_ascent=True, compiled=True
    ),
    "ddp_compiled_sam_accumulate": lambda spec, rank: ddp_scenario(
        spec, rank, "SAM", micro_batches=2, compiled=True
    ),
    "fsdp_sam_sgd": lambda spec, rank: fsdp_scenario(spec, rank, "SAM", "sgd", foreach=False),
    "fsdp_asam_adamw_foreach": lambda spec, rank: fsdp_scenario(
        spec, rank, "ASAM", "adamw", foreach=True
    ),
    "fsdp_fishersam_sgd_foreach": lambda spec, rank: fsdp_scenario(
        spec, rank, "FisherSAM", "sgd", foreach=True
    ),
    "fsdp_sam_accumulate": lambda spec, rank: fsdp_scenario(
        spec, rank, "SAM", "sgd", foreach=False, micro_batches=2
    ),
    "fsdp_local_ascent_error": fsdp_local_ascent_error,
    "ddp_checkpoint_resume_sam": lambda spec, rank: ddp_checkpoint_resume(spec, rank, "SAM"),
    "ddp_checkpoint_resume_tram_x": lambda spec, rank: ddp_checkpoint_resume(spec, rank, "TRAM-x"),
    "ddp_checkpoint_resume_tram_theta0": lambda spec, rank: ddp_checkpoint_resume(
        spec, rank, "TRAM-θ0"
    ),
    "ddp_checkpoint_resume_zero_sam": lambda spec, rank: ddp_checkpoint_resume(
        spec, rank, "SAM", zero=True
    ),
    "ddp_checkpoint_resume_zero_tram_x": lambda spec, rank: ddp_checkpoint_resume(
        spec, rank, "TRAM-x", zero=True
    ),
    "ddp_resume_local_reused_radius": ddp_resume_local_reused_radius,
    **{
        f"{kind}_sam_{name}": (
            lambda spec, rank, dtype=dtype, kind=kind: mixed_precision(
                spec, rank, dtype, sharded=kind == "fsdp"
            )
        )
        for kind in ("ddp", "fsdp")
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16))
    },
    **{
        f"fsdp_checkpoint_resume_{method.lower().replace('-', '_')}_{layout}": (
            lambda spec, rank, method=method, layout=layout: fsdp_checkpoint_resume(
                spec, rank, method, layout
            )
        )
        for method in ("SAM", "TRAM-x")
        for layout in ("sharded", "full")
    },
}


def main() -> None:
    spec_path, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    spec: Spec = torch.load(spec_path, weights_only=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=spec["timeout_s"]))
    rank = dist.get_rank()
    results: dict[str, Any] = {}
    try:
        for name, scenario in SCENARIOS.items():
            torch.manual_seed(0)
            start = time.perf_counter()
            try:
                results[name] = scenario(spec, rank)
                results[name]["seconds"] = time.perf_counter() - start
            except Exception:
                results[name] = {"error": traceback.format_exc()}
                print(f"[rank {rank}] scenario {name} failed:", file=sys.stderr)
                traceback.print_exc()
            # Keep the ranks in step, so that a failure stays inside its scenario.
            dist.barrier()
    finally:
        torch.save(results, out_dir / f"rank{rank}.pt")
        dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" not in os.environ:
        sys.exit("distributed_worker.py is launched by tests/test_distributed.py")
    main()
