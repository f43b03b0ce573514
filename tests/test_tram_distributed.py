"""TRAM under DistributedDataParallel and FSDP2: two gloo processes on CPU.

One launch of ``tests/tram_distributed_worker.py`` (two ranks, started here as two processes)
trains a DDP-wrapped embedding model with ``TRAM.step(closure)`` for TRAM-x (``"noise"``) and
TRAM-θ0 (``"pretrained"``), with the synchronised ascent and with ``local_ascent=True``, an FSDP2
(``fully_shard``) one with TRAM-x (synchronised: FSDP2 has no ``no_sync``), and both with
TRAM-Fisher (synchronised). The test checks what the ranks saw against a single-process
reference written here with plain tensor maths:

- synchronised: one ascent for the global batch, along the all-reduced gradient, with the radius
  d = the mean over ranks of each rank's d on its own shard (TRAM all-reduces it);
- local: each rank ascends along its own gradient with its own d; the update averages the
  ranks' gradients at their own θ + ε.

Every rank's weights must be bit-identical after every step in both modes. Under FSDP2 the
weight targets (θ0, θt−1, EMA) are refused on every rank: a sharded model's forward gathers its
live weights over substituted ones.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from tests.helpers import NoiseDraws, launch_workers
from tests.helpers import scenario_records as records_of
from tests.tram_distributed_worker import WEIGHT_TARGETS, EmbeddingClassifier

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="torch.distributed with the gloo backend is not available",
    ),
]

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "tram_distributed_worker.py"
WORLD_SIZE = 2
LAUNCH_TIMEOUT_S = 120.0
SPEC: dict[str, Any] = {
    "steps": 3,
    "batch_per_rank": 8,
    "length": 5,
    "vocab": 50,
    "width": 8,
    "hidden": 16,
    "classes": 3,
    "lr": 0.05,
    # AdamW's first steps move an element by lr·g/(|g| + eps): a larger eps than the default
    # keeps round-off in tiny gradients from being amplified into visible differences.
    "adam_eps": 1e-3,
    "sigma": 0.3,
    "seed": 0,
    # TRAM-Fisher's ascent: eta large enough that 1 + eta g² departs from 1 (|g| ~ 0.1 to 0.5).
    "fisher_rho": 0.07,
    "fisher_eta": 3.0,
    "timeout_s": 60,
}
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def make_spec() -> dict[str, Any]:
    spec = dict(SPEC)
    torch.manual_seed(0)
    spec["weights"] = {k: v.clone() for k, v in EmbeddingClassifier(spec).state_dict().items()}
    g = torch.Generator().manual_seed(1234)
    shape = (spec["steps"], WORLD_SIZE, spec["batch_per_rank"])
    spec["ids"] = torch.randint(0, spec["vocab"], (*shape, spec["length"]), generator=g)
    spec["labels"] = torch.randint(0, spec["classes"], shape, generator=g)
    return spec


# ----------------------------------------------------------------------------- the reference
def build(spec: dict[str, Any], weights: list[Tensor] | None = None) -> nn.Module:
    model = EmbeddingClassifier(spec)
    model.load_state_dict(spec["weights"])
    if weights is not None:
        with torch.no_grad():
            for p, w in zip(model.parameters(), weights, strict=True):
                p.copy_(w)
    return model


def mean_forward_kl(target: Tensor, current: Tensor) -> float:
    log_p, log_q = F.log_softmax(target, dim=-1), F.log_softmax(current, dim=-1)
    return float(F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean())


def radius_on_shard(
    trust_region: str, model: nn.Module, pretrained: nn.Module, ids: Tensor, z: Tensor
) -> float:
    """d on one rank's shard: KL(target || current), per example, averaged."""
    with torch.no_grad():
        current = model(ids)
        if trust_region == "noise":
            noised = model.head(torch.tanh(model.hidden((model.embed(ids) + z).mean(dim=1))))
            return mean_forward_kl(noised, current)
        return mean_forward_kl(pretrained(ids), current)


def gradient(model: nn.Module, ids: Tensor, y: Tensor) -> list[Tensor]:
    model.zero_grad()
    F.cross_entropy(model(ids), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def ascent(model: nn.Module, grads: list[Tensor], d: float) -> list[Tensor]:
    """Eq. 7: ε = d |θ|² g / ‖|θ| g‖."""
    params = [p.detach() for p in model.parameters()]
    norm = torch.sqrt(sum(((p.abs() * g) ** 2).sum() for p, g in zip(params, grads)))
    return [d * p.abs() ** 2 * g / (norm + 1e-12) for p, g in zip(params, grads)]


def gradient_at(model: nn.Module, epsilon: list[Tensor], ids: Tensor, y: Tensor) -> list[Tensor]:
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p, e in zip(moved.parameters(), epsilon):
            p.add_(e)
    return gradient(moved, ids, y)


def radius_over_micro_batches(
    trust_region: str, model: nn.Module, pretrained: nn.Module, ids: Tensor, zs: list[Tensor]
) -> float:
    """d on one rank's shard run as ``len(zs)`` equal micro-batches, each with its own noise:
    the mean of the micro-batches' d (they hold as many examples each)."""
    chunks = ids.chunk(len(zs))
    return sum(
        radius_on_shard(trust_region, model, pretrained, chunk, z)
        for chunk, z in zip(chunks, zs, strict=True)
    ) / len(zs)


def reference(
    spec: dict[str, Any],
    trust_region: str,
    local: bool,
    *,
    micro_batches: int = 1,
    joined_after: int | None = None,
) -> dict[str, list[Any]]:
    """TRAM over two data shards in one process; returns the weights after every step and d.

    With ``micro_batches`` > 1 each rank accumulates its shard in that many micro-batches: the
    gradient is the shard's, and each micro-batch has its own noise draw. With
    ``joined_after=k`` rank 1 stops after k steps, as under ``DistributedDataParallel.join()``:
    rank 0 goes on alone, and DDP still divides the summed gradient by the world size it was
    built with (``divide_by_initial_world_size``, the joined rank adding zeros)."""
    model = build(spec)
    pretrained = build(spec)
    base = torch.optim.AdamW(model.parameters(), lr=spec["lr"], eps=spec["adam_eps"])
    # Each rank's own stream: one draw per micro-batch, the ranks in lockstep.
    draws = [NoiseDraws(spec["seed"], rank=rank) for rank in range(WORLD_SIZE)]
    out: dict[str, list[Any]] = {"after": [], "radius": []}
    for step in range(spec["steps"]):
        ranks = range(WORLD_SIZE if joined_after is None or step < joined_after else 1)
        shards = [(spec["ids"][step][r], spec["labels"][step][r]) for r in ranks]
        shape = (spec["batch_per_rank"] // micro_batches, spec["length"], spec["width"])
        zs = [
            [
                torch.randn(shape, generator=rank.next()) * spec["sigma"]
                for _ in range(micro_batches)
            ]
            for rank in draws[: len(ranks)]
        ]
        radii = [
            radius_over_micro_batches(trust_region, model, pretrained, ids, z)
            for (ids, _), z in zip(shards, zs, strict=True)
        ]
        grads = [gradient(model, ids, y) for ids, y in shards]
        if local:
            epsilons = [ascent(model, g, d) for g, d in zip(grads, radii)]
            out["radius"].append(radii)
        else:
            assert joined_after is None, "the synchronised ascent refuses a joined rank"
            mean_grad = [sum(gs) / WORLD_SIZE for gs in zip(*grads)]
            d = sum(radii) / WORLD_SIZE
            epsilons = [ascent(model, mean_grad, d)] * WORLD_SIZE
            out["radius"].append([d] * WORLD_SIZE)
        second = [gradient_at(model, e, ids, y) for e, (ids, y) in zip(epsilons, shards)]
        base.zero_grad()
        for p, gs in zip(model.parameters(), zip(*second)):
            p.grad = sum(gs) / WORLD_SIZE
        base.step()
        out["after"].append([p.detach().clone() for p in model.parameters()])
    return out


def noised_gradient(model: nn.Module, ids: Tensor, y: Tensor, z: Tensor) -> list[Tensor]:
    """∇ of the cross-entropy with ``z`` added to the token embeddings."""
    model.zero_grad()
    hidden = torch.tanh(model.hidden((model.embed(ids) + z).mean(dim=1)))
    F.cross_entropy(model.head(hidden), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def fisher_reference(spec: dict[str, Any], sigma: float) -> list[list[Tensor]]:
    """TRAM-Fisher (Algorithm 2) over two data shards in one process: the all-reduced gradient
    on noised inputs g gives ε = ρ (g / (1 + η g²)) / √(Σ g² / (1 + η g²)); the update averages
    the shards' clean gradients at θ + ε. Returns the weights after every step."""
    model = build(spec)
    base = torch.optim.AdamW(model.parameters(), lr=spec["lr"], eps=spec["adam_eps"])
    draws = [NoiseDraws(spec["seed"], rank=rank) for rank in range(WORLD_SIZE)]
    rho, eta = spec["fisher_rho"], spec["fisher_eta"]
    shape = (spec["batch_per_rank"], spec["length"], spec["width"])
    out = []
    for step in range(spec["steps"]):
        shards = [(spec["ids"][step][r], spec["labels"][step][r]) for r in range(WORLD_SIZE)]
        # Each rank's own draw, the ranks in lockstep.
        zs = [torch.randn(shape, generator=rank.next()) * sigma for rank in draws]
        grads = [noised_gradient(model, ids, y, z) for (ids, y), z in zip(shards, zs, strict=True)]
        mean = [sum(gs) / WORLD_SIZE for gs in zip(*grads)]
        norm = torch.sqrt(sum((g * g / (1 + eta * g * g)).sum() for g in mean))
        epsilon = [rho * g / (1 + eta * g * g) / (norm + 1e-12) for g in mean]
        second = [gradient_at(model, epsilon, ids, y) for ids, y in shards]
        base.zero_grad()
        for p, gs in zip(model.parameters(), zip(*second)):
            p.grad = sum(gs) / WORLD_SIZE
        base.step()
        out.append([p.detach().clone() for p in model.parameters()])
    return out


# ----------------------------------------------------------------------------- the launch
@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return make_spec()


@pytest.fixture(scope="module")
def results(spec: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    directory = tmp_path_factory.mktemp("tram_ddp")
    spec_path = directory / "spec.pt"
    torch.save(spec, spec_path)
    launch_workers(
        WORKER, spec_path, directory, directory, world_size=WORLD_SIZE, timeout_s=LAUNCH_TIMEOUT_S
    )
    return [
        torch.load(directory / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)
    ]


def assert_trajectory(got: list[list[Tensor]], want: list[list[Tensor]]) -> None:
    for step, (mine, theirs) in enumerate(zip(got, want, strict=True)):
        for p, q in zip(mine, theirs, strict=True):
            torch.testing.assert_close(p, q, **TOLERANCE, msg=lambda m, s=step: f"step {s}: {m}")


def assert_replicas_identical(records: list[dict]) -> None:
    for key in ("before", "after"):
        for step, (mine, other) in enumerate(zip(records[0][key], records[1][key], strict=True)):
            for p, q in zip(mine, other, strict=True):
                assert torch.equal(p, q), f"{key} step {step}: {(p - q).abs().max()}"


def radii_from_recorded_weights(
    spec: dict[str, Any], records: list[dict], trust_region: str
) -> list[list[float]]:
    """Each rank's d on its own shard, from the weights the ranks had before each step."""
    pretrained = build(spec)
    draws = [NoiseDraws(spec["seed"], rank=rank) for rank in range(WORLD_SIZE)]
    shape = (spec["batch_per_rank"], spec["length"], spec["width"])
    out = []
    for step in range(spec["steps"]):
        zs = [torch.randn(shape, generator=rank.next()) * spec["sigma"] for rank in draws]
        model = build(spec, records[0]["before"][step])
        ids = spec["ids"][step]
        out.append(
            [
                radius_on_shard(trust_region, model, pretrained, ids[r], zs[r])
                for r in range(WORLD_SIZE)
            ]
        )
    return out


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("trust_region", ["noise", "pretrained"])
def test_synchronised_ascent(spec: dict[str, Any], results: list[dict], trust_region: str) -> None:
    records = records_of(results, trust_region)
    assert_replicas_identical(records)
    # The radius is all-reduced: the same number on both ranks, the mean of the ranks' d.
    assert records[0]["radius"] == records[1]["radius"]
    per_rank = radii_from_recorded_weights(spec, records, trust_region)
    expected = [sum(d) / WORLD_SIZE for d in per_rank]
    assert records[0]["radius"] == pytest.approx(expected, rel=1e-5, abs=1e-9)
    if trust_region == "pretrained":
        assert records[0]["radius"][0] == 0.0  # θ = θ0 at the first step
    # d grows like sigma^2: at sigma = 0.3 it is near 1e-3, a hundred thousand times the
    # tolerance above.
    assert min(records[0]["radius"][1:]) > 1e-4
    # The mean is neither rank's d (they differ by a hundred times the tolerance).
    assert all(abs(a - b) > 1e-3 * max(a, b) for a, b in per_rank[1:])
    # The whole trajectory equals TRAM on the global batch with that radius.
    ref = reference(spec, trust_region, local=False)
    assert records[0]["radius"] == pytest.approx([r[0] for r in ref["radius"]], rel=1e-5)
    for step, (got, want) in enumerate(zip(records[0]["after"], ref["after"], strict=True)):
        for p, q in zip(got, want, strict=True):
            torch.testing.assert_close(p, q, **TOLERANCE, msg=lambda m, s=step: f"step {s}: {m}")


@pytest.mark.parametrize("trust_region", ["noise", "pretrained"])
def test_local_ascent(spec: dict[str, Any], results: list[dict], trust_region: str) -> None:
    records = records_of(results, f"{trust_region}_local")
    assert_replicas_identical(records)
    per_rank = radii_from_recorded_weights(spec, records, trust_region)
    for rank in range(WORLD_SIZE):
        got = records[rank]["radius"]
        assert got == pytest.approx([d[rank] for d in per_rank], rel=1e-5, abs=1e-9)
    first = 0 if trust_region == "noise" else 1
    for step in range(first, spec["steps"]):
        a, b = records[0]["radius"][step], records[1]["radius"][step]
        assert abs(a - b) > 1e-3 * max(a, b)  # a hundred times the tolerance
    ref = reference(spec, trust_region, local=True)
    for step, (got, want) in enumerate(zip(records[0]["after"], ref["after"], strict=True)):
        for p, q in zip(got, want, strict=True):
            torch.testing.assert_close(p, q, **TOLERANCE, msg=lambda m, s=step: f"step {s}: {m}")
    # Local and synchronised ascents are different algorithms: the weights differ.
    synchronised = records_of(results, trust_region)[0]["after"][-1]
    assert (
        max(float((p - q).abs().max()) for p, q in zip(records[0]["after"][-1], synchronised))
        > 3e-5  # d ~ sigma^2 is small at sigma = 0.3; still 30 times TOLERANCE's atol
    )


# ----------------------------------------------------------------------------- uneven inputs
def test_local_ascent_under_join_is_exact_with_uneven_inputs(
    spec: dict[str, Any], results: list[dict]
) -> None:
    """``DistributedDataParallel.join()`` with rank 1 out of batches after one step: the local
    ascent has no collective of its own, so DDP's shadowing of the joined rank covers both
    passes. Rank 0 goes on with its own d and gradient, the update is DDP's (the joined rank adds
    zeros, the sum is divided by the world size), and the join ends with the ranks alike."""
    records = records_of(results, "noise_local_join")
    assert [len(r["after"]) for r in records] == [spec["steps"], 1]
    ref = reference(spec, "noise", local=True, joined_after=1)
    assert_trajectory(records[0]["after"], ref["after"])
    assert records[0]["radius"] == pytest.approx([r[0] for r in ref["radius"]], rel=5e-5)
    assert records[1]["radius"] == pytest.approx(ref["radius"][0][1:], rel=5e-5)
    for p, q in zip(records[1]["final"], records[0]["final"], strict=True):
        assert torch.equal(p, q)
    # Rank 0's later steps are not those of the even run: its gradient is halved.
    even = reference(spec, "noise", local=True)["after"][-1]
    assert max(float((p - q).abs().max()) for p, q in zip(ref["after"][-1], even)) > 1e-3


def test_synchronised_ascent_under_join_is_refused_with_the_fix(results: list[dict]) -> None:
    """TRAM's all-reduce of d has no twin on a rank that has joined (Join shadows DDP's
    collectives only): before, it waited forever on gloo. Rank 0 now raises at the first
    measured step after rank 1 joined, naming the three fixes, with its weights at θ."""
    record = results[0]["noise_join"]
    message = record["message"]
    assert message is not None, "the synchronised ascent ran under Join with a joined rank"
    assert message.startswith(
        "TRAM's synchronised ascent all-reduces d over every rank, but 1 of the 2 ranks "
        "stopped stepping"
    )
    for fix in ("drop_last=True", "even_batches=True", "local_ascent=True"):
        assert fix in message
    assert "throw_on_early_termination=True" in message
    # One step with both ranks, then the refused one: no ascent and no update on rank 0.
    assert (len(record["before"]), len(record["after"])) == (2, 1)
    for p, q in zip(record["final"], record["before"][1], strict=True):
        assert torch.equal(p, q)
    # Rank 1, inside Join when rank 0 left, fails in gloo instead of waiting.
    assert results[1]["noise_join"]["message"] is not None


# ----------------------------------------------------------------------------- FSDP2
def test_fsdp2_tram_x_is_global_batch_tram(spec: dict[str, Any], results: list[dict]) -> None:
    """TRAM-x on a fully_shard model (DTensor parameters, d measured in first_step) takes the
    steps of TRAM on the global batch: the noise reaches the sharded embedding, d is the mean
    of the ranks' d, the ascent norm is the model's (not a shard's)."""
    records = records_of(results, "fsdp2_noise")
    assert all(r["param_types"] == ["DTensor"] for r in records)
    assert_replicas_identical(records)
    assert records[0]["radius"] == records[1]["radius"]
    per_rank = radii_from_recorded_weights(spec, records, "noise")
    assert records[0]["radius"] == pytest.approx([sum(d) / WORLD_SIZE for d in per_rank], rel=1e-5)
    assert all(abs(a - b) > 1e-3 * max(a, b) for a, b in per_rank)  # neither rank's own d
    assert_trajectory(records[0]["after"], reference(spec, "noise", local=False)["after"])
    # The same steps as DDP's (the ranks gather the shards; DDP holds whole replicas).
    assert_trajectory(records[0]["after"], records_of(results, "noise")[0]["after"])


@pytest.mark.parametrize(
    "name", ["noise_accumulate", "fsdp2_noise_accumulate"], ids=["DDP", "FSDP2"]
)
def test_accumulating_closure_is_global_batch_tram(
    spec: dict[str, Any], results: list[dict], name: str
) -> None:
    """TRAM-x with tram.accumulating_closure, two micro-batches per rank: d is the mean over every
    rank's micro-batches (under FSDP2 measured in first_step, each recorded forward replayed
    with its own noise draw, in order), the step TRAM's on the global batch."""
    records = records_of(results, name)
    assert_replicas_identical(records)
    ref = reference(spec, "noise", local=False, micro_batches=2)
    assert records[0]["radius"] == records[1]["radius"]
    # d is a small KL (about 1e-3), so the float32 round-off of two steps' weights (DDP sums
    # the ranks' gradients in another order than the reference) moves it by up to 2e-5 of it.
    assert records[0]["radius"] == pytest.approx([r[0] for r in ref["radius"]], rel=5e-5)
    assert_trajectory(records[0]["after"], ref["after"])


@pytest.mark.parametrize("name", ["fisher", "fsdp2_fisher"], ids=["DDP", "FSDP2"])
def test_tram_fisher_is_global_batch_tram_fisher(
    spec: dict[str, Any], results: list[dict], name: str
) -> None:
    """TRAM-Fisher's first pass on noised embeddings (each rank's own draw, in lockstep), its
    Fisher ascent from the reduced gradient, under DDP and FSDP2."""
    records = records_of(results, name)
    kind = "DTensor" if name.startswith("fsdp2") else "Parameter"
    assert all(r["param_types"] == [kind] for r in records)
    assert_replicas_identical(records)
    assert all(r["radius"] == [None] * spec["steps"] for r in records)
    expected = fisher_reference(spec, spec["sigma"])
    assert_trajectory(records[0]["after"], expected)
    # The noise counts: without it (Fisher SAM) the weights differ by 30 times the atol.
    clean = fisher_reference(spec, 0.0)[-1]
    assert max(float((p - q).abs().max()) for p, q in zip(expected[-1], clean)) > 3e-5


def test_fsdp2_weight_targets_are_refused_on_every_rank(results: list[dict]) -> None:
    """The reference forward of θ0, θt−1 or the EMA would run the live weights under FSDP2
    (d = 0 at every step): each rank refuses them when TRAM is built."""
    for rank, record in enumerate(records_of(results, "fsdp2_weight_targets")):
        for trust_region in WEIGHT_TARGETS:
            message = record["messages"][trust_region]
            assert message is not None, f"rank {rank}: trust_region={trust_region!r} was built"
            assert "parameters are sharded (FSDP, FSDP2 or DeepSpeed)" in message
            assert "use the noise target (trust_region='noise') or TRAM-Fisher" in message
