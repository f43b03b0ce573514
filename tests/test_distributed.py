"""Distributed training with the wrappers: DDP and FSDP2, two processes on CPU with gloo.

One launch of ``tests/distributed_worker.py`` (two ranks, started here as two processes with
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``) runs every scenario and saves what it
saw; the tests below compare it with single-process references written here with plain tensor
maths (autograd for the gradients, the ascent and the base optimizers by hand, not the library):

- synchronised ascent (the default): SAM over the global batch, the exact algorithm;
- ``local_ascent=True``: each worker ascends along its own shard's gradient, the update averages
  the workers' gradients at their own θ+ε (the SAM paper's m-sharpness, m = per-worker batch);
- gradient accumulation with ``tram.accumulating_closure`` under DDP and FSDP2;
- FSDP2 (``fully_shard``, ``DTensor`` parameters): the ascent norm must be global, not a shard's;
- checkpoints: a resume bit-equal to the uninterrupted run, under FSDP2 (``torch.distributed.
  checkpoint``) and DDP (rank 0's ``state_dict()`` loaded on every rank);
- mixed precision under DDP: bf16 autocast, and fp16 with ``tram.scaled_step`` and a CPU
  ``GradScaler``, against the same run in one process on the global batch (there the reference
  is the library's own single-process step, which the non-distributed tests check by hand).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import tram
from tests.distributed_worker import build_model
from tests.helpers import launch_workers
from tests.helpers import scenario_records as scenario

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
WORLD_SIZE = 2
LAUNCH_TIMEOUT_S = 150.0
SPEC: dict[str, Any] = {
    "steps": 4,
    "world_size": WORLD_SIZE,
    "batch_per_rank": 8,
    "in_features": 5,
    "hidden": 8,
    "classes": 3,
    "lr": 0.1,
    "momentum": 0.9,
    "rho": 0.2,
    "asam_rho": 0.5,
    "asam_eta": 0.01,
    "fisher_rho": 0.1,
    "fisher_eta": 5.0,
    "adam_lr": 0.01,
    "weight_decay": 0.01,
    "sigma": 0.3,
    "noise_seed": 7,
    "init_scale": 4096.0,
    "overflow_step": 2,
    "timeout_s": 60,
}
# The per-step tolerance against the references: float32 round-off only (measured ~3e-8).
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def _fsdp2_available() -> bool:
    try:
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this build",
)
needs_fsdp2 = pytest.mark.skipif(
    not _fsdp2_available(), reason="torch.distributed.fsdp.fully_shard (FSDP2) is not available"
)


# ---------------------------------------------------------------------------- the inputs
def make_spec() -> dict[str, Any]:
    spec = dict(SPEC)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(spec["in_features"], spec["hidden"]),
        nn.Tanh(),
        nn.Linear(spec["hidden"], spec["classes"]),
    )
    spec["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1234)
    shape = (spec["steps"], WORLD_SIZE, spec["batch_per_rank"])
    spec["x"] = torch.randn(*shape, spec["in_features"], generator=generator)
    spec["y"] = torch.randint(0, spec["classes"], shape, generator=generator)
    return spec


# ---------------------------------------------------------------------------- the references
def forward(params: list[Tensor], x: Tensor) -> Tensor:
    w1, b1, w2, b2 = params
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def gradient(params: list[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
    """∇ of the mean cross-entropy of the batch (x, y) at ``params``."""
    leaves = [p.detach().clone().requires_grad_() for p in params]
    loss = F.cross_entropy(forward(leaves, x), y)
    return list(torch.autograd.grad(loss, leaves))


def ascent(
    spec: dict[str, Any], method: str, params: list[Tensor], grads: list[Tensor]
) -> tuple[list[Tensor], float]:
    """ε = ρ T² g / (‖T g‖ + 1e-12); returns ε and ‖T g‖.

    T = 1 (SAM), |θ| + η (ASAM) or (1 + η g²)^(-1/2) (Fisher SAM).
    """
    if method == "SAM":
        rho, scales = spec["rho"], [torch.ones_like(p) for p in params]
    elif method == "ASAM":
        rho, scales = spec["asam_rho"], [p.abs() + spec["asam_eta"] for p in params]
    else:
        rho = spec["fisher_rho"]
        scales = [1 / torch.sqrt(1 + spec["fisher_eta"] * g * g) for g in grads]
    norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(scales, grads)))
    return [rho * t * t * g / (norm + 1e-12) for t, g in zip(scales, grads)], float(norm)


class SGDByHand:
    """torch.optim.SGD with momentum, no dampening, no weight decay."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.lr, self.momentum = spec["lr"], spec["momentum"]
        self.buffers: list[Tensor] | None = None

    def step(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        if self.buffers is None:
            self.buffers = [g.clone() for g in grads]
        else:
            self.buffers = [self.momentum * b + g for b, g in zip(self.buffers, grads)]
        return [p - self.lr * b for p, b in zip(params, self.buffers)]


class AdamWByHand:
    """torch.optim.AdamW with its defaults (betas 0.9/0.999, eps 1e-8), decoupled decay."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.lr, self.decay = spec["adam_lr"], spec["weight_decay"]
        self.t = 0
        self.m: list[Tensor] = []
        self.v: list[Tensor] = []

    def step(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        if self.t == 0:
            self.m = [torch.zeros_like(g) for g in grads]
            self.v = [torch.zeros_like(g) for g in grads]
        self.t += 1
        self.m = [beta1 * m + (1 - beta1) * g for m, g in zip(self.m, grads)]
        self.v = [beta2 * v + (1 - beta2) * g * g for v, g in zip(self.v, grads)]
        correction1, correction2 = 1 - beta1**self.t, 1 - beta2**self.t
        return [
            p * (1 - self.lr * self.decay)
            - (self.lr / correction1) * m / ((v / correction2).sqrt() + eps)
            for p, m, v in zip(params, self.m, self.v)
        ]


def reference(
    spec: dict[str, Any], method: str, *, local: bool = False, base: str = "sgd"
) -> dict[str, list[Any]]:
    """SAM/ASAM by hand in one process, on the global batch or per worker shard.

    Returns, per step: ``params`` after the step, ``perturbed`` (θ+ε, one list per worker) and
    ``norms`` (‖T g‖, one per worker).
    """
    params = [spec["weights"][k].clone() for k in ("0.weight", "0.bias", "2.weight", "2.bias")]
    optimizer = SGDByHand(spec) if base == "sgd" else AdamWByHand(spec)
    out: dict[str, list[Any]] = {"params": [], "perturbed": [], "norms": []}
    for step in range(spec["steps"]):
        xs, ys = spec["x"][step], spec["y"][step]
        if local:
            shards = [(xs[k], ys[k]) for k in range(WORLD_SIZE)]
        else:
            shards = [(xs.flatten(0, 1), ys.flatten(0, 1))] * WORLD_SIZE
        perturbed, norms, second = [], [], []
        for x, y in shards:
            epsilon, norm = ascent(spec, method, params, gradient(params, x, y))
            moved = [p + e for p, e in zip(params, epsilon)]
            perturbed.append(moved)
            norms.append(norm)
            second.append(gradient(moved, x, y))
        update = [sum(gs) / WORLD_SIZE for gs in zip(*second)]
        params = optimizer.step(params, update)
        out["params"].append(params)
        out["perturbed"].append(perturbed)
        out["norms"].append(norms)
    return out


def no_ascent_reference(spec: dict[str, Any]) -> list[Tensor]:
    """Plain SGD on the global batch: what the wrappers must differ from."""
    params = [spec["weights"][k].clone() for k in ("0.weight", "0.bias", "2.weight", "2.bias")]
    optimizer = SGDByHand(spec)
    for step in range(spec["steps"]):
        x, y = spec["x"][step].flatten(0, 1), spec["y"][step].flatten(0, 1)
        params = optimizer.step(params, gradient(params, x, y))
    return params


def max_difference(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a, b, strict=True))


# ---------------------------------------------------------------------------- the launch
@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return make_spec()


@pytest.fixture(scope="module")
def results(spec: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The records of every scenario, one dict per rank, from a single two-process launch."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    directory = tmp_path_factory.mktemp("distributed")
    spec_path = directory / "spec.pt"
    torch.save({**spec, "checkpoint_dir": str(directory / "checkpoints")}, spec_path)
    elapsed = launch_workers(
        WORKER, spec_path, directory, directory, world_size=WORLD_SIZE, timeout_s=LAUNCH_TIMEOUT_S
    )
    print(f"distributed worker: {elapsed:.1f}s for {WORLD_SIZE} ranks")
    return [
        torch.load(directory / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)
    ]


def assert_replicas_identical(records: list[dict], key: str = "params") -> None:
    for step, (mine, other) in enumerate(zip(records[0][key], records[1][key], strict=True)):
        for p, q in zip(mine, other, strict=True):
            assert torch.equal(p, q), (
                f"{key} differ across ranks at step {step}: {(p - q).abs().max()}"
            )


def assert_matches(actual: list[list[Tensor]], expected: list[list[Tensor]], what: str) -> None:
    assert len(actual) == len(expected) == SPEC["steps"]
    for step, (mine, theirs) in enumerate(zip(actual, expected, strict=True)):
        for index, (p, q) in enumerate(zip(mine, theirs, strict=True)):
            torch.testing.assert_close(
                p,
                q,
                **TOLERANCE,
                msg=lambda m, s=step, i=index: f"{what}, step {s}, tensor {i}: {m}",
            )


# ---------------------------------------------------------------------------- in-process checks
def test_references_are_discriminative(spec: dict[str, Any]) -> None:
    """The references differ from each other far beyond the tolerance, so the tests can fail."""
    sync = reference(spec, "SAM")
    local = reference(spec, "SAM", local=True)
    assert max_difference(sync["params"][-1], no_ascent_reference(spec)) > 1e-3
    assert max_difference(sync["params"][-1], local["params"][-1]) > 1e-3
    assert max_difference(sync["params"][-1], reference(spec, "ASAM")["params"][-1]) > 1e-3
    # Per-worker perturbations differ, synchronised ones are one.
    assert max_difference(*local["perturbed"][0]) > 1e-3
    assert max_difference(*sync["perturbed"][0]) == 0


def test_reference_optimizers_match_torch(spec: dict[str, Any]) -> None:
    """The hand-written base optimizers of the references are torch's SGD and AdamW."""
    params = [spec["weights"][k].clone() for k in ("0.weight", "0.bias", "2.weight", "2.bias")]
    for by_hand, make in [
        (SGDByHand(spec), lambda ps: torch.optim.SGD(ps, lr=spec["lr"], momentum=spec["momentum"])),
        (
            AdamWByHand(spec),
            lambda ps: torch.optim.AdamW(ps, lr=spec["adam_lr"], weight_decay=spec["weight_decay"]),
        ),
    ]:
        leaves = [nn.Parameter(p.clone()) for p in params]
        torch_optimizer = make(leaves)
        mine = params
        for step in range(3):
            x, y = spec["x"][step].flatten(0, 1), spec["y"][step].flatten(0, 1)
            grads = gradient(mine, x, y)
            mine = by_hand.step(mine, grads)
            for leaf, g in zip(leaves, gradient([leaf.detach() for leaf in leaves], x, y)):
                leaf.grad = g
            torch_optimizer.step()
        for p, q in zip(mine, leaves):
            torch.testing.assert_close(p, q.detach(), **TOLERANCE)


def test_local_ascent_without_no_sync_raises() -> None:
    model = nn.Linear(3, 2)
    optimizer = tram.SAM(
        torch.optim.SGD(model.parameters(), lr=0.1), model=model, local_ascent=True
    )
    before = [p.detach().clone() for p in model.parameters()]

    def closure() -> Tensor:
        loss = model(torch.ones(4, 3)).sum()
        loss.backward()
        return loss

    with pytest.raises(ValueError, match=r"local_ascent=True needs model= with a no_sync\(\)"):
        optimizer.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# ---------------------------------------------------------------------------- DDP


@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize(
    ("name", "method"),
    [
        ("ddp_sam_sync", "SAM"),
        ("ddp_asam_sync", "ASAM"),
        ("ddp_compiled_sam_sync", "SAM"),
        ("ddp_zero_sam_sync", "SAM"),
    ],
    ids=["SAM", "ASAM", "SAM-torch.compile(DDP(model))", "SAM-ZeroRedundancyOptimizer(SGD)"],
)
def test_ddp_synchronised_ascent_is_global_batch_sam(
    results: list[dict], spec: dict[str, Any], name: str, method: str
) -> None:
    records = scenario(results, name)
    assert all((record["graphs"] > 0) == ("compiled" in name) for record in records)
    expected = reference(spec, method)
    assert_replicas_identical(records)
    assert_replicas_identical(records, "perturbed")
    for rank, record in enumerate(records):
        assert record["closure_calls"] == [2] * spec["steps"]
        assert_matches(record["params"], expected["params"], f"rank {rank} parameters")
        assert_matches(
            record["perturbed"], [p[rank] for p in expected["perturbed"]], f"rank {rank} θ+ε"
        )
        assert record["norms"] == pytest.approx([n[rank] for n in expected["norms"]], rel=1e-5)
        # One bucket; it is all-reduced in both passes.
        assert record["buckets"] == [0]
        assert record["allreduces"] == [2] * spec["steps"]
    if "zero" in name:  # each rank stepped a shard of the parameters, together all of them
        owned = [record["owned"] for record in records]
        assert all(owned)
        every = sorted(p.numel() for p in spec["weights"].values())
        assert sorted(numel for shard in owned for numel in shard) == every


@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize(
    ("name", "method"),
    [("ddp_sam_local", "SAM"), ("ddp_asam_local", "ASAM"), ("ddp_compiled_sam_local", "SAM")],
    ids=["SAM", "ASAM", "SAM-torch.compile(DDP(model))"],
)
def test_ddp_local_ascent_is_per_worker_sam(
    results: list[dict], spec: dict[str, Any], name: str, method: str
) -> None:
    records = scenario(results, name)
    assert all((record["graphs"] > 0) == ("compiled" in name) for record in records)
    expected = reference(spec, method, local=True)
    assert_replicas_identical(records)
    for step in range(spec["steps"]):
        spread = max_difference(records[0]["perturbed"][step], records[1]["perturbed"][step])
        assert spread > 1e-4, f"step {step}: the workers' perturbations are the same ({spread})"
    for rank, record in enumerate(records):
        assert record["closure_calls"] == [2] * spec["steps"]
        assert_matches(record["params"], expected["params"], f"rank {rank} parameters")
        assert_matches(
            record["perturbed"], [p[rank] for p in expected["perturbed"]], f"rank {rank} θ+ε"
        )
        assert record["norms"] == pytest.approx([n[rank] for n in expected["norms"]], rel=1e-5)
        # The first pass runs under no_sync: one all-reduce per step, the second pass's.
        assert record["buckets"] == [0]
        assert record["allreduces"] == [1] * spec["steps"]


@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize(
    "name",
    ["ddp_sam_accumulate", "ddp_compiled_sam_accumulate"],
    ids=["SAM", "SAM-torch.compile(DDP(model))"],
)
def test_ddp_gradient_accumulation_is_large_batch_sam(
    results: list[dict], spec: dict[str, Any], name: str
) -> None:
    records = scenario(results, name)
    assert all((record["graphs"] > 0) == ("compiled" in name) for record in records)
    expected = reference(spec, "SAM")
    assert_replicas_identical(records)
    assert_replicas_identical(records, "perturbed")
    for rank, record in enumerate(records):
        assert record["closure_calls"] == [2] * spec["steps"]
        assert_matches(record["params"], expected["params"], f"rank {rank} parameters")
        assert_matches(
            record["perturbed"], [p[rank] for p in expected["perturbed"]], f"rank {rank} θ+ε"
        )
        # Two micro-batches per pass, all but the last under no_sync: one all-reduce per pass.
        assert record["allreduces"] == [2] * spec["steps"]


# ---------------------------------------------------------------------------- FSDP2
@pytest.mark.distributed
@needs_gloo
@needs_fsdp2
@pytest.mark.parametrize(
    ("name", "method", "base"),
    [
        ("fsdp_sam_sgd", "SAM", "sgd"),
        ("fsdp_asam_adamw_foreach", "ASAM", "adamw"),
        ("fsdp_fishersam_sgd_foreach", "FisherSAM", "sgd"),
    ],
    ids=["SAM-SGD-loop", "ASAM-AdamW-foreach", "FisherSAM-SGD-foreach"],
)
def test_fsdp2_synchronised_ascent_is_global_batch_sam(
    results: list[dict], spec: dict[str, Any], name: str, method: str, base: str
) -> None:
    records = scenario(results, name)
    expected = reference(spec, method, base=base)
    for rank, record in enumerate(records):
        assert record["param_types"] == ["DTensor"]
        assert record["closure_calls"] == [2] * spec["steps"]
        # The ascent norm is the global one on every rank, not the norm of the local shard.
        global_norms = [n[rank] for n in expected["norms"]]
        assert record["norms"] == pytest.approx(global_norms, rel=1e-5)
        for step, (local, norm) in enumerate(zip(record["local_shard_norms"], global_norms)):
            assert abs(local - norm) > 1e-3 * norm, f"rank {rank} step {step}: a shard's norm"
        assert_matches(
            record["perturbed"], [p[rank] for p in expected["perturbed"]], f"rank {rank} θ+ε"
        )
        assert_matches(record["params"], expected["params"], f"rank {rank} parameters")
    if method == "SAM":
        # The shards partition the global gradient: their squared norms add up to its square.
        for step in range(spec["steps"]):
            shards = sum(r["local_shard_norms"][step] ** 2 for r in records)
            assert shards == pytest.approx(records[0]["norms"][step] ** 2, rel=1e-5)


@pytest.mark.distributed
@needs_gloo
@needs_fsdp2
def test_fsdp2_local_ascent_raises(results: list[dict]) -> None:
    for record in scenario(results, "fsdp_local_ascent_error"):
        assert record["message"] is not None, "local_ascent=True on FSDP2 did not raise"
        assert "local_ascent=True needs model= with a no_sync() context" in record["message"]
        assert "FSDP2 supports the synchronised ascent only" in record["message"]
        assert record["closure_calls"] == 0
        assert record["unchanged"]


@pytest.mark.distributed
@needs_gloo
@needs_fsdp2
@pytest.mark.parametrize("layout", ["sharded", "full"])
@pytest.mark.parametrize("method", ["sam", "tram_x"])
def test_fsdp2_distributed_checkpoint_resume_is_exact(
    results: list[dict], method: str, layout: str
) -> None:
    """A resume through torch.distributed.checkpoint's get/set_optimizer_state_dict (how
    accelerate and Lightning checkpoint under FSDP2), sharded with dcp.save or gathered to rank 0
    and broadcast back, takes the steps the uninterrupted run took, bit for bit: the step
    counter (SAM with ascent_every=2) and TRAM-x's noise generator travel in the first param
    group, which those functions keep."""
    name = f"fsdp_checkpoint_resume_{method}_{layout}"
    for rank, record in enumerate(scenario(results, name)):
        for step, (straight, resumed) in enumerate(
            zip(record["straight"], record["resumed"], strict=True), start=1
        ):
            for index, (a, b) in enumerate(zip(straight, resumed, strict=True)):
                assert torch.equal(a, b), f"rank {rank}, step {step}, parameter {index}"
        assert record["steps_after_load"] == 1
        assert record["load_warnings"] == [], f"rank {rank}: {record['load_warnings']}"
        assert "tram" not in record["live_group_keys"]


@pytest.mark.distributed
@needs_gloo
@needs_fsdp2
def test_fsdp2_gradient_accumulation_is_large_batch_sam(
    results: list[dict], spec: dict[str, Any]
) -> None:
    """tram.accumulating_closure on an FSDP2 model (two micro-batches per rank): FSDP2 has no
    no_sync, so every micro-batch's backward reduce-scatters and the shards accumulate the sum,
    which is the large batch's gradient."""
    records = scenario(results, "fsdp_sam_accumulate")
    expected = reference(spec, "SAM")
    assert_replicas_identical(records)
    assert_replicas_identical(records, "perturbed")
    for rank, record in enumerate(records):
        assert record["param_types"] == ["DTensor"]
        assert record["closure_calls"] == [2] * spec["steps"]
        assert record["norms"] == pytest.approx([n[rank] for n in expected["norms"]], rel=1e-5)
        assert_matches(record["params"], expected["params"], f"rank {rank} parameters")
        assert_matches(
            record["perturbed"], [p[rank] for p in expected["perturbed"]], f"rank {rank} θ+ε"
        )


# ---------------------------------------------------------------------------- DDP: resume
@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("method", ["sam", "tram_x", "tram_theta0", "zero_sam", "zero_tram_x"])
def test_ddp_checkpoint_resume_is_exact(results: list[dict], method: str) -> None:
    """Rank 0's model and optimizer state_dict(), loaded on every rank into a fresh model, DDP
    and optimizer, takes the steps the uninterrupted run took, bit for bit (SAM's step counter
    with ascent_every=2, TRAM-x's noise stream, whose seed was left out and the resumed ranks
    seeded otherwise, TRAM-θ0's reference weights); also with the AdamW sharded by
    ZeroRedundancyOptimizer, its state consolidated on rank 0 for the save."""
    for rank, record in enumerate(scenario(results, f"ddp_checkpoint_resume_{method}")):
        assert record["checkpoint_intact"], "load_state_dict() changed the caller's state dict"
        for step, (straight, resumed) in enumerate(
            zip(record["straight"], record["resumed"], strict=True), start=1
        ):
            for index, (a, b) in enumerate(zip(straight, resumed, strict=True)):
                assert torch.equal(a, b), f"rank {rank}, step {step}, parameter {index}"


@pytest.mark.distributed
@needs_gloo
def test_a_resumed_local_ascent_measures_each_ranks_own_radius(results: list[dict]) -> None:
    """With ``local_ascent=True`` and ``radius_every=2`` each rank reuses its own d, and rank
    0's checkpoint holds rank 0's. Resumed in the group, every rank measures d afresh at its
    first ascent (before, rank 1 reused rank 0's d), then on the schedule (step 2)."""
    records = scenario(results, "ddp_resume_local_reused_radius")
    own_first = [record["first"]["radius"][0] for record in records]
    assert abs(own_first[0] - own_first[1]) > 1e-3 * max(own_first)  # each rank's own d
    for rank, record in enumerate(records):
        assert record["saved"] == (own_first[0], True)
        straight, resumed = record["straight"], record["resumed"]
        assert straight["measured"] == [1, 2, 2]  # steps 1 and 3 reuse the d of 0 and 2
        assert straight["radius"][0] == own_first[rank]
        assert resumed["measured"] == [1, 2, 2]  # step 1 measured afresh, then the schedule
        assert resumed["radius"][0] not in own_first
        # The rank's own d of step 1: its shard, θ1 and its noise draw, as measured by a run
        # that measures every step.
        assert record["every_step"]["radius"][0] == own_first[rank]
        assert resumed["radius"][0] == record["every_step"]["radius"][1]
        assert resumed["radius"][2] == resumed["radius"][1]
    assert records[0]["resumed"]["radius"][0] != records[1]["resumed"]["radius"][0]
    for run in ("straight", "resumed"):  # DDP keeps the replicas equal
        for a, b in zip(records[0][run]["params"], records[1][run]["params"], strict=True):
            assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


# ---------------------------------------------------------------------------- DDP: precision
def one_process_mixed_precision(spec: dict[str, Any], dtype: torch.dtype) -> dict[str, list]:
    """The run of ``ddp_mixed_precision`` in one process on the global batch: its loss is the
    mean of the two shards' losses, each shard's forward in an autocast region of its own, as a
    rank runs it.

    Neither of the two simpler references is the same computation in low precision: one
    forward of the concatenated batch rounds its bf16/fp16 matmuls over 16 rows instead of 8
    (measured here: 4.6e-4 away from DDP after 4 bf16 steps, more than DDP's own 3.8e-4
    departure from float32), and both shards in one autocast region share its cached
    low-precision copy of each weight, so autograd sums their gradients in bf16/fp16 before
    the cast back (2.8e-4 away). With the shards apart, the only difference left is the float32
    sum of the two shards' gradients (the all-reduce's g0/2 + g1/2 against autograd's
    accumulation), and the runs were measured bit-equal.
    """
    model = build_model(spec)
    base = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=spec["momentum"])
    optimizer = tram.SAM(base, rho=spec["rho"], model=model)
    scaler = torch.amp.GradScaler("cpu", init_scale=spec["init_scale"])
    out: dict[str, list] = {"params": [], "scales": []}
    for step in range(spec["steps"]):
        calls: list[int] = []

        def loss_fn(step: int = step, calls: list = calls) -> Tensor:
            calls.append(1)
            losses = []
            for rank in range(WORLD_SIZE):
                with torch.autocast("cpu", dtype=dtype):
                    losses.append(
                        F.cross_entropy(model(spec["x"][step, rank]), spec["y"][step, rank])
                    )
            loss = sum(losses) / WORLD_SIZE
            overflow = dtype == torch.float16 and step == spec["overflow_step"]
            return loss * float("inf") if overflow and len(calls) == 2 else loss

        if dtype == torch.float16:
            tram.scaled_step(optimizer, scaler, loss_fn)
            out["scales"].append(scaler.get_scale())
        else:

            def closure(loss_fn: Any = loss_fn) -> Tensor:
                optimizer.zero_grad()
                loss = loss_fn()
                loss.backward()
                return loss

            optimizer.step(closure)
        out["params"].append([p.detach().clone() for p in model.parameters()])
    return out


@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_ddp_mixed_precision_equals_one_process_global_batch(
    results: list[dict], spec: dict[str, Any], dtype: torch.dtype
) -> None:
    check_mixed_precision(results, spec, dtype, "ddp")


@pytest.mark.distributed
@needs_gloo
@needs_fsdp2
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fsdp2_mixed_precision_equals_one_process_global_batch(
    results: list[dict], spec: dict[str, Any], dtype: torch.dtype
) -> None:
    """As under DDP: the gradients are reduce-scattered in float32 (the parameters are float32,
    autocast casts them per op), GradScaler unscales the DTensor shards, and an overflow in a
    shard is an overflow on every rank."""
    check_mixed_precision(results, spec, dtype, "fsdp")


def check_mixed_precision(
    results: list[dict], spec: dict[str, Any], dtype: torch.dtype, kind: str
) -> None:
    """SAM under DDP with CPU autocast, bf16 through step(closure) and fp16 through
    tram.scaled_step with a CPU GradScaler, equals the same run in one process on the global
    batch to float32 round-off (TOLERANCE; measured bit-equal). In fp16, rank 1's overflow at θ+ε
    reaches every rank through the all-reduce: all skip that step with their weights at θ and
    back the scale off, as the one-process run does."""
    name = f"{kind}_sam_{'bf16' if dtype == torch.bfloat16 else 'fp16'}"
    records = scenario(results, name)
    assert_replicas_identical(records)
    expected = one_process_mixed_precision(spec, dtype)
    for rank, record in enumerate(records):
        assert_matches(record["params"], expected["params"], f"rank {rank} parameters")
    # The one-process run is SAM by hand (float32) up to the low precision's rounding: a step
    # moves a weight by lr·|g| ~ 0.05, rounded at 2^-8 relative in bf16 and 2^-11 in fp16
    # (measured after two steps: 1.6e-4 and 1.8e-5). And autocast ran: that departure is
    # beyond the tolerance.
    fp32 = reference(spec, "SAM")["params"]
    bound = 1e-3 if dtype == torch.bfloat16 else 1e-4
    departures = [max_difference(expected["params"][step], fp32[step]) for step in range(2)]
    assert max(departures) < bound, departures
    assert departures[1] > 1e-5, departures
    if dtype == torch.float16:
        overflow = spec["overflow_step"]
        init = spec["init_scale"]
        for record in records:
            assert record["scales"] == expected["scales"]
            assert record["scales"][overflow - 1 : overflow + 1] == [init, init / 2]
            skipped, previous = record["params"][overflow], record["params"][overflow - 1]
            assert all(torch.equal(a, b) for a, b in zip(skipped, previous, strict=True))
