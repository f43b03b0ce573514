"""The maths of each method, checked against formulas written here from the papers.

SAM (Foret et al. 2021, Eq. 2), ASAM (Kwon et al. 2021, Eq. 11; Eq. 2 for η = 0) and Fisher
SAM (Kim et al. 2022, with the diagonal Fisher regularised as 1 + η g²). The references work
in float64 with plain tensor arithmetic and never call ``tram._ascent``. The last part unit-tests
the loop and foreach paths of ``tram._ascent`` directly.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tram
from tram._ascent import apply_ascent_, restore_, scaled_squared_norm

EPS = 1e-12


def model_and_grads(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """A two-layer model (2-D weights, 1-D biases) with the gradient of a batch in ``.grad``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).to(dtype)
    x = torch.randn(32, 6, dtype=dtype)
    y = torch.randint(0, 4, (32,))
    F.cross_entropy(model(x), y).backward()
    return model


def perturbation(optimizer: tram.TwoPassOptimizer, params: list[Tensor], **kwargs) -> list[Tensor]:
    """ε = θ+ε − θ for one first_step; the weights are restored afterwards."""
    before = [p.detach().clone() for p in params]
    assert optimizer.first_step(**kwargs)
    epsilon = [p.detach() - b for p, b in zip(params, before)]
    optimizer.restore()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    return epsilon


def reference_ascent(grads: list[Tensor], scales: list[Tensor], rho: float) -> list[Tensor]:
    """ε = ρ T² g / ‖T g‖ for diagonal operators ``scales`` (float64)."""
    grads = [g.double() for g in grads]
    norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(scales, grads)))
    return [rho * t**2 * g / (norm + EPS) for t, g in zip(scales, grads)]


def assert_all_close(actual: list[Tensor], expected: list[Tensor], **tolerances) -> None:
    tolerances = tolerances or {"rtol": 1e-6, "atol": 1e-12}
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.double(), e.double(), **tolerances)


def max_difference(a: list[Tensor], b: list[Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


# ---------------------------------------------------------------------------------- ASAM
def test_asam_exclude_1d_leaves_biases_unscaled() -> None:
    model = model_and_grads()
    params = list(model.parameters())
    grads = [p.grad.clone() for p in params]
    optimizer = tram.ASAM(torch.optim.SGD(params, lr=0.1), rho=0.5, eta=0.01, exclude_1d=True)
    epsilon = perturbation(optimizer, params)

    unit = [torch.ones_like(p) if p.dim() < 2 else p.detach().abs() + 0.01 for p in params]
    assert_all_close(epsilon, reference_ascent(grads, unit, 0.5))
    # The biases really are treated differently from the default ASAM operator.
    scaled = [p.detach().abs() + 0.01 for p in params]
    assert max_difference(epsilon, reference_ascent(grads, scaled, 0.5)) > 1e-3


def test_asam_exclude_1d_per_group() -> None:
    model = model_and_grads()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    base = torch.optim.SGD(
        [{"params": first, "exclude_1d": True}, {"params": second, "eta": 0.1}], lr=0.1
    )
    optimizer = tram.ASAM(base, rho=0.5, eta=0.01)
    assert [g["exclude_1d"] for g in base.param_groups] == [True, False]
    params = first + second
    grads = [p.grad.clone() for p in params]
    epsilon = perturbation(optimizer, params)

    weight0, bias0, weight1, bias1 = (p.detach() for p in params)
    scales = [weight0.abs() + 0.01, torch.ones_like(bias0), weight1.abs() + 0.1, bias1.abs() + 0.1]
    assert_all_close(epsilon, reference_ascent(grads, scales, 0.5))


def test_asam_eta_zero_is_pure_parameter_scaling() -> None:
    """η = 0 is the ASAM paper's Eq. 2, T = |θ|: a weight at exactly zero never moves."""
    model = model_and_grads()
    params = list(model.parameters())
    with torch.no_grad():
        params[0][0, :3] = 0.0
        params[3][1] = 0.0
    grads = [p.grad.clone() for p in params]
    zero = [p.detach() == 0 for p in params]
    assert sum(int(z.sum()) for z in zero) == 4

    optimizer = tram.ASAM(torch.optim.SGD(params, lr=0.1), rho=0.5, eta=0.0)
    epsilon = perturbation(optimizer, params)
    assert_all_close(epsilon, reference_ascent(grads, [p.detach().abs() for p in params], 0.5))
    for e, z in zip(epsilon, zero):
        assert torch.all(e[z] == 0)
        assert torch.all(e[~z] != 0)

    # With the default η the same zero weights do move.
    optimizer = tram.ASAM(torch.optim.SGD(params, lr=0.1), rho=0.5, eta=0.01)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    epsilon = perturbation(optimizer, params)
    assert all(torch.all(e[z] != 0) for e, z in zip(epsilon, zero))


# ---------------------------------------------------------------------------------- SAM
def test_sam_perturbation_has_norm_rho_across_groups_along_the_gradient() -> None:
    model = model_and_grads()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    optimizer = tram.SAM(torch.optim.SGD([{"params": first}, {"params": second}], lr=0.1), rho=0.05)
    params = first + second
    grads = [p.grad.clone() for p in params]
    epsilon = perturbation(optimizer, params)

    flat_epsilon = torch.cat([e.flatten() for e in epsilon])
    flat_grad = torch.cat([g.flatten() for g in grads])
    assert flat_epsilon.norm().item() == pytest.approx(0.05, rel=1e-6)
    cosine = F.cosine_similarity(flat_epsilon, flat_grad, dim=0).item()
    assert cosine == pytest.approx(1.0, abs=1e-12)
    assert_all_close(epsilon, [0.05 * g / flat_grad.norm() for g in grads])
    # The norm is global: each group's share is below rho, in proportion to its gradient.
    first_share = torch.cat([e.flatten() for e in epsilon[:2]]).norm().item()
    first_grad = torch.cat([g.flatten() for g in grads[:2]]).norm().item()
    assert first_share == pytest.approx(0.05 * first_grad / flat_grad.norm().item(), rel=1e-6)
    assert first_share < 0.05 * (1 - 1e-3)


# ---------------------------------------------------------------------------------- Fisher SAM
def fisher_reference(grads: list[Tensor], rho: float, eta: float) -> list[Tensor]:
    """ε = ρ (g / (1 + η g²)) / sqrt(Σ g² / (1 + η g²))."""
    grads = [g.double() for g in grads]
    denominator = torch.sqrt(sum((g**2 / (1 + eta * g**2)).sum() for g in grads))
    return [rho * (g / (1 + eta * g**2)) / (denominator + EPS) for g in grads]


def test_fisher_sam_with_a_large_eta_follows_the_fisher_formula() -> None:
    model = model_and_grads()
    params = list(model.parameters())
    grads = [p.grad.clone() for p in params]
    # The regime matters: η g² must be of order one somewhere, or Fisher SAM is SAM.
    assert max((100.0 * g**2).max().item() for g in grads) > 0.5

    fisher = perturbation(
        tram.FisherSAM(torch.optim.SGD(params, lr=0.1), rho=0.1, eta=100.0), params
    )
    assert_all_close(fisher, fisher_reference(grads, 0.1, 100.0))
    flat = torch.cat([e.flatten() for e in fisher])
    assert flat.norm().item() < 0.1  # the ellipsoid is inside the ball

    for p, g in zip(params, grads):
        p.grad = g.clone()
    sam = perturbation(tram.SAM(torch.optim.SGD(params, lr=0.1), rho=0.1), params)
    assert max_difference(fisher, sam) > 1e-3
    cosine = F.cosine_similarity(flat, torch.cat([e.flatten() for e in sam]), dim=0).item()
    assert cosine < 0.999


def test_fisher_sam_with_eta_zero_is_sam() -> None:
    model = model_and_grads()
    params = list(model.parameters())
    grads = [p.grad.clone() for p in params]
    fisher = perturbation(tram.FisherSAM(torch.optim.SGD(params, lr=0.1), rho=0.1, eta=0.0), params)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    sam = perturbation(tram.SAM(torch.optim.SGD(params, lr=0.1), rho=0.1), params)
    assert_all_close(fisher, sam, rtol=1e-12, atol=0.0)


# ---------------------------------------------------------------------------------- loss scale
WRAPPERS = {
    "SAM": (lambda base: tram.SAM(base, rho=0.05), lambda p, g: torch.ones_like(g)),
    "ASAM": (lambda base: tram.ASAM(base, rho=0.5, eta=0.01), lambda p, g: p.abs() + 0.01),
    "FisherSAM": (
        lambda base: tram.FisherSAM(base, rho=0.1, eta=10.0),
        lambda p, g: (1 + 10.0 * g**2).rsqrt(),
    ),
}


def ascent_with_grads(name: str, grads: list[Tensor], **kwargs) -> tuple[list[Tensor], float]:
    """ε and ``last_ascent_norm`` of a fresh wrapper on ``model_and_grads()`` with ``grads``."""
    model = model_and_grads()
    params = list(model.parameters())
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimizer = WRAPPERS[name][0](torch.optim.SGD(params, lr=0.1))
    epsilon = perturbation(optimizer, params, **kwargs)
    return epsilon, optimizer.last_ascent_norm


@pytest.mark.parametrize("name", list(WRAPPERS))
@pytest.mark.parametrize("scale", [4096.0, 1000.0])
def test_ascent_is_invariant_to_the_loss_scale_given_grad_scale(name: str, scale: float) -> None:
    model = model_and_grads()
    params = [p.detach() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    operator = WRAPPERS[name][1]
    expected_norm = math.sqrt(
        sum(((operator(p, g) * g) ** 2).sum().item() for p, g in zip(params, grads))
    )

    plain, plain_norm = ascent_with_grads(name, grads)
    scaled, scaled_norm = ascent_with_grads(name, [g * scale for g in grads], grad_scale=scale)
    assert_all_close(scaled, plain, rtol=1e-6, atol=1e-12)
    # ``last_ascent_norm`` is the unscaled ‖T g‖ in both cases.
    assert plain_norm == pytest.approx(expected_norm, rel=1e-6)
    assert scaled_norm == pytest.approx(expected_norm, rel=1e-6)

    unscaled, unscaled_norm = ascent_with_grads(name, [g * scale for g in grads])
    if name == "FisherSAM":
        # Without grad_scale the Fisher operator sees s·g: a different ellipsoid.
        assert max_difference(unscaled, plain) > 1e-3
    else:
        # SAM and ASAM directions are scale-invariant; only the logged norm carries s.
        assert_all_close(unscaled, plain, rtol=1e-6, atol=1e-12)
        assert unscaled_norm == pytest.approx(scale * expected_norm, rel=1e-6)


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_last_ascent_norm_is_the_norm_of_the_scaled_gradient(name: str) -> None:
    model = model_and_grads(seed=3, dtype=torch.float32)
    params = list(model.parameters())
    expected = math.sqrt(
        sum(
            ((WRAPPERS[name][1](p.detach().double(), p.grad.double()) * p.grad.double()) ** 2)
            .sum()
            .item()
            for p in params
        )
    )
    optimizer = WRAPPERS[name][0](torch.optim.SGD(params, lr=0.1))
    assert optimizer.last_ascent_norm is None
    assert optimizer.first_step()
    optimizer.restore()
    assert optimizer.last_ascent_norm == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------- closed form
@pytest.mark.parametrize("form", ["closure", "explicit"])
def test_sam_on_a_quadratic_matches_the_closed_form(form: str) -> None:
    """L = ½‖w‖²: g = w, ε = ρ w/‖w‖, the second-pass gradient is w (1 + ρ/‖w‖)."""
    torch.manual_seed(0)
    weights = [
        nn.Parameter(torch.randn(3, 4, dtype=torch.float64)),
        nn.Parameter(torch.randn(5, dtype=torch.float64)),
    ]
    w = [p.detach().clone() for p in weights]
    norm = torch.sqrt(sum((v**2).sum() for v in w))
    rho, lr = 0.3, 0.1
    factor = 1 + rho / norm
    optimizer = tram.SAM(torch.optim.SGD(weights, lr=lr), rho=rho)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = 0.5 * sum((p**2).sum() for p in weights)
        loss.backward()
        return loss

    if form == "closure":
        loss = optimizer.step(closure)
        assert loss.item() == pytest.approx(0.5 * norm.item() ** 2, rel=1e-12)
    else:
        closure()
        assert optimizer.first_step()
        assert_all_close(
            [p.detach() for p in weights], [v * factor for v in w], rtol=1e-12, atol=1e-15
        )
        closure()
        assert_all_close([p.grad for p in weights], [v * factor for v in w], rtol=1e-12, atol=1e-15)
        optimizer.second_step()
    # w ← w − lr · w (1 + ρ/‖w‖)
    assert_all_close(
        [p.detach() for p in weights], [v * (1 - lr * factor) for v in w], rtol=1e-12, atol=1e-15
    )


def test_asam_on_a_quadratic_matches_the_closed_form() -> None:
    """L = ½‖w‖², T = |w| + η: ε = ρ T² w/‖T w‖, the second-pass gradient is w + ε."""
    torch.manual_seed(1)
    weight = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    w = weight.detach().clone()
    rho, eta, lr = 0.5, 0.01, 0.2
    t = w.abs() + eta
    epsilon = rho * t**2 * w / torch.linalg.vector_norm(t * w)
    optimizer = tram.ASAM(torch.optim.SGD([weight], lr=lr), rho=rho, eta=eta)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = 0.5 * (weight**2).sum()
        loss.backward()
        return loss

    closure()
    assert optimizer.first_step()
    torch.testing.assert_close(weight.detach(), w + epsilon, rtol=1e-12, atol=1e-12)
    closure()
    torch.testing.assert_close(weight.grad, w + epsilon, rtol=1e-12, atol=1e-12)
    optimizer.second_step()
    torch.testing.assert_close(weight.detach(), w - lr * (w + epsilon), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------- tram._ascent
SHAPES = [(7,), (3, 4), (2, 3, 5), (1,), ()]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
OPERATORS = [("identity", 0.0), ("adaptive", 0.01), ("adaptive", 0.0), ("fisher", 0.1)]
TOLERANCE = {
    torch.float32: {"rtol": 1e-6, "atol": 1e-7},
    torch.float64: {"rtol": 1e-6, "atol": 1e-12},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
}
PATHS_AGREE = {
    # The loop and foreach paths may round bf16 intermediates differently (a Python scalar is
    # rounded to bf16 first by the foreach ops, not by Tensor.mul_), within bf16's precision.
    torch.float32: {"rtol": 1e-6, "atol": 1e-7},
    torch.float64: {"rtol": 1e-12, "atol": 1e-15},
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2},
}


def random_tensors(dtype: torch.dtype, seed: int) -> tuple[list[Tensor], list[Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    params = [
        torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in SHAPES
    ]
    grads = [
        torch.randn(shape, generator=generator, dtype=torch.float64).mul(3).to(dtype)
        for shape in SHAPES
    ]
    return params, grads


def operator_of(scaling: str, eta: float, p: Tensor, g: Tensor, inverse_scale: float) -> Tensor:
    p, g = p.double(), g.double() * inverse_scale
    if scaling == "identity":
        return torch.ones_like(p)
    if scaling == "adaptive":
        return p.abs() + eta
    return (1 + eta * g**2).rsqrt()


CASES = list(itertools.product(DTYPES, OPERATORS, [1.0, 0.125]))


def case_id(case: tuple) -> str:
    dtype, (scaling, eta), inverse_scale = case
    return f"{str(dtype)[6:]}-{scaling}-eta{eta}-inv{inverse_scale}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_scaled_squared_norm_loop_and_foreach_agree_with_the_formula(case: tuple) -> None:
    dtype, (scaling, eta), inverse_scale = case
    params, grads = random_tensors(dtype, seed=7)
    originals = [t.clone() for t in (*params, *grads)]
    results = {}
    for foreach in (False, True):
        scratch = [torch.full_like(p, float("nan")) for p in params]
        results[foreach] = scaled_squared_norm(
            params,
            grads,
            scratch,
            scaling=scaling,
            eta=eta,
            inverse_scale=inverse_scale,
            foreach=foreach,
        )
        assert results[foreach].dim() == 0
        for t, o in zip((*params, *grads), originals):
            assert torch.equal(t, o)
    assert results[False].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(results[True], results[False], **PATHS_AGREE[dtype])
    # The value: ‖T g‖² of the *stored* (possibly scaled) gradients with T from g·inverse_scale.
    expected = sum(
        ((operator_of(scaling, eta, p, g, inverse_scale) * g.double()) ** 2).sum()
        for p, g in zip(params, grads)
    )
    torch.testing.assert_close(results[False].double(), expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_scaled_squared_norm_of_dtensors_is_the_plain_tensors_one(
    case: tuple, one_process_group: None
) -> None:
    """FSDP2 hands the wrappers ``DTensor`` parameters and gradients; both paths give the norm
    they give the same values as plain tensors. The fused norm is given no dtype it does not
    need: with one, torch 2.14's sharding rule for ``_foreach_norm`` on ``DTensor`` raises
    ``TypeError`` (it reads the dtype as a dimension), which broke every FSDP2 step on CUDA,
    where the fused path is the default; torch 2.12 has no such rule for ``_foreach_rsqrt_``
    (the Fisher operator), which takes the per-tensor ``rsqrt_`` there."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dtype, (scaling, eta), inverse_scale = case
    mesh = init_device_mesh("cpu", (1,))
    params, grads = random_tensors(dtype, seed=5)

    def sharded(tensors: list[Tensor]) -> list[Tensor]:
        return [distribute_tensor(t, mesh, [Shard(0) if t.dim() else Replicate()]) for t in tensors]

    for foreach in (False, True):
        plain = scaled_squared_norm(
            params,
            grads,
            [torch.empty_like(p) for p in params],
            scaling=scaling,
            eta=eta,
            inverse_scale=inverse_scale,
            foreach=foreach,
        )
        distributed = scaled_squared_norm(
            sharded(params),
            sharded(grads),
            sharded([torch.empty_like(p) for p in params]),
            scaling=scaling,
            eta=eta,
            inverse_scale=inverse_scale,
            foreach=foreach,
        )
        assert type(distributed).__name__ == "DTensor"
        torch.testing.assert_close(distributed.full_tensor(), plain, **PATHS_AGREE[dtype])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_apply_ascent_and_restore_loop_and_foreach_agree(case: tuple) -> None:
    dtype, (scaling, eta), inverse_scale = case
    params, grads = random_tensors(dtype, seed=11)
    originals = [p.clone() for p in params]
    coefficient = 0.05
    outcome = {}
    for foreach in (False, True):
        p_copy = [p.clone() for p in params]
        g_copy = [g.clone() for g in grads]
        backups = [torch.full_like(p, float("nan")) for p in params]
        # The first phase leaves T g in the backups; the second reuses it.
        scaled_squared_norm(
            p_copy,
            g_copy,
            backups,
            scaling=scaling,
            eta=eta,
            inverse_scale=inverse_scale,
            foreach=foreach,
        )
        apply_ascent_(
            p_copy,
            g_copy,
            backups,
            scaling=scaling,
            eta=eta,
            coefficient=coefficient,
            inverse_scale=inverse_scale,
            foreach=foreach,
        )
        for b, o in zip(backups, originals):
            assert torch.equal(b, o)
        outcome[foreach] = ([p.clone() for p in p_copy], g_copy)
        # Against the formula: g ← T² g and θ ← θ + c T² g.
        for p, g, o, g0 in zip(p_copy, g_copy, originals, grads):
            t = operator_of(scaling, eta, o, g0, inverse_scale)
            direction = t**2 * g0.double()
            torch.testing.assert_close(g.double(), direction, **TOLERANCE[dtype])
            expected = o.double() + coefficient * direction
            torch.testing.assert_close(p.double(), expected, **TOLERANCE[dtype])
        restore_(p_copy, backups, foreach=foreach)
        for p, o in zip(p_copy, originals):
            assert torch.equal(p, o)
    for a, b in zip(outcome[False][0] + outcome[False][1], outcome[True][0] + outcome[True][1]):
        torch.testing.assert_close(a, b, **PATHS_AGREE[dtype])


@pytest.mark.parametrize("eta", [0.0, 0.01])
@pytest.mark.parametrize("foreach", [False, True])
def test_adaptive_ascent_gives_the_bits_of_the_direct_product(foreach: bool, eta: float) -> None:
    """T (T g) from the reused T g equals (g T) T computed directly, bit for bit."""
    params, grads = random_tensors(torch.float32, seed=3)
    operators = [p.abs() + eta if eta else p.abs() for p in params]
    expected_directions = [g * t * t for g, t in zip(grads, operators)]
    expected_params = [torch.add(p, d, alpha=0.05) for p, d in zip(params, expected_directions)]
    backups = [torch.empty_like(p) for p in params]
    scaled_squared_norm(params, grads, backups, scaling="adaptive", eta=eta, foreach=foreach)
    apply_ascent_(
        params, grads, backups, scaling="adaptive", eta=eta, coefficient=0.05, foreach=foreach
    )
    assert all(torch.equal(g, d) for g, d in zip(grads, expected_directions))
    assert all(torch.equal(p, e) for p, e in zip(params, expected_params))


@pytest.mark.parametrize("foreach", [False, True])
def test_restore_copies_exactly_in_bfloat16(foreach: bool) -> None:
    params, grads = random_tensors(torch.bfloat16, seed=5)
    originals = [p.clone() for p in params]
    backups = [torch.empty_like(p) for p in params]
    apply_ascent_(
        params, grads, backups, scaling="identity", eta=0.0, coefficient=1e-3, foreach=foreach
    )
    # Subtracting the step back is not exact in bf16; the copy is.
    assert any(not torch.equal(p, o) for p, o in zip(params, originals))
    restore_(params, backups, foreach=foreach)
    assert all(torch.equal(p, o) for p, o in zip(params, originals))


def test_ascent_function_errors() -> None:
    with pytest.raises(ValueError, match="needs at least one tensor"):
        scaled_squared_norm([], [], [], scaling="identity", eta=0.0)
    p, g = torch.ones(2), torch.ones(2)
    with pytest.raises(ValueError, match="Invalid scaling: 'diagonal'"):
        scaled_squared_norm([p], [g], [torch.empty(2)], scaling="diagonal", eta=0.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("foreach", [False, True])
def test_adaptive_ascent_without_eta_keeps_the_bits_of_abs_theta(foreach: bool) -> None:
    """With η = 0 the ascent works with θ in place of |θ|: the norm, T² g and the moved weights
    must be the bits (signed zeros included) of the |θ| form."""
    params, grads = random_tensors(torch.float32, seed=13)
    params[0].view(-1)[:4] = torch.tensor([0.0, -0.0, -0.0, 0.0])
    grads[0].view(-1)[:4] = torch.tensor([-1.5, 2.0, -0.0, 0.0])
    grads[1].view(-1)[:2] = torch.tensor([-0.0, 0.0])
    expected_norm = sum(((p.abs() * g).double() ** 2).sum() for p, g in zip(params, grads))
    expected_directions = [p.abs() * (p.abs() * g) for p, g in zip(params, grads)]
    expected_params = [torch.add(p, d, alpha=0.03) for p, d in zip(params, expected_directions)]
    backups = [torch.empty_like(p) for p in params]
    squared = scaled_squared_norm(
        params, grads, backups, scaling="adaptive", eta=0.0, foreach=foreach
    )
    direct = [p.abs() * g for p, g in zip(params, grads)]
    direct_norms = torch.stack([torch.linalg.vector_norm(t) for t in direct])
    assert torch.equal(squared, (direct_norms * direct_norms).sum())
    torch.testing.assert_close(squared.double(), expected_norm)
    apply_ascent_(
        params, grads, backups, scaling="adaptive", eta=0.0, coefficient=0.03, foreach=foreach
    )

    def bits(tensors: list[Tensor]) -> list[Tensor]:
        return [t.view(torch.int32) for t in tensors]

    assert all(torch.equal(a, b) for a, b in zip(bits(grads), bits(expected_directions)))
    assert all(torch.equal(a, b) for a, b in zip(bits(params), bits(expected_params)))


# ----------------------------------------------------------------------------- complex weights
COMPLEX_CASES = {
    "SAM": (lambda base, foreach: tram.SAM(base, rho=0.3, foreach=foreach), "identity", 0.0),
    "ASAM-eta0": (
        lambda base, foreach: tram.ASAM(base, rho=0.3, eta=0.0, foreach=foreach),
        "adaptive",
        0.0,
    ),
    "ASAM": (
        lambda base, foreach: tram.ASAM(base, rho=0.3, eta=0.07, foreach=foreach),
        "adaptive",
        0.07,
    ),
    "FisherSAM": (
        lambda base, foreach: tram.FisherSAM(base, rho=0.3, eta=0.6, foreach=foreach),
        "fisher",
        0.6,
    ),
}


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("name", list(COMPLEX_CASES))
def test_complex_weights_take_the_ascent_of_their_magnitudes(name: str, foreach: bool) -> None:
    """A complex weight beside a real one: ε = ρ T² g / ‖T g‖ over both, with T = |θ| + η
    (ASAM) or (1 + η |g|²)^(-1/2) (Fisher SAM), by hand in complex128. ASAM's η = 0 shortcut
    (θ (θ g) for |θ| (|θ| g)) would rotate a complex ε by twice θ's phase; Fisher's g² would not
    be |g|². The base step's check of the second pass's gradient takes the norm over both (it
    used to ask a real tensor for a complex norm and raise)."""
    make, scaling, eta = COMPLEX_CASES[name]
    generator = torch.Generator().manual_seed(5)
    z = torch.randn(6, dtype=torch.complex64, generator=generator).requires_grad_()
    r = torch.randn(3, generator=generator).requires_grad_()
    x = torch.randn(6, dtype=torch.complex64, generator=generator)
    optimizer = make(torch.optim.SGD([z, r], lr=0.1), foreach)
    ((z * x).abs().square().sum() + (r * r.sin()).sum()).backward()
    weights = [z.detach().to(torch.complex128), r.detach().double()]
    grads = [z.grad.to(torch.complex128), r.grad.double()]
    if scaling == "identity":
        scales = [torch.ones_like(w.real) for w in weights]
    elif scaling == "adaptive":
        scales = [w.abs() + eta for w in weights]
    else:
        scales = [(1 + eta * g.abs().square()).rsqrt() for g in grads]
    norm = torch.sqrt(sum(((t * g).abs().square()).sum() for t, g in zip(scales, grads)))
    expected = [0.3 * t * t * g / (norm + 1e-12) for t, g in zip(scales, grads)]
    assert optimizer.first_step()
    for param, weight, epsilon in zip((z, r), weights, expected, strict=True):
        moved = param.detach().to(weight.dtype) - weight
        torch.testing.assert_close(moved, epsilon, rtol=1e-4, atol=1e-6)
    ((z * x).abs().square().sum() + (r * r.sin()).sum()).backward()
    second = [z.grad.to(torch.complex128), r.grad.double()]
    optimizer.second_step()
    assert optimizer.steps == 1
    for param, weight, grad in zip((z, r), weights, second, strict=True):
        torch.testing.assert_close(param.detach().to(weight.dtype), weight - 0.1 * grad)


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_fisher_operator_of_float16_gradients_above_256(foreach: bool) -> None:
    """Pure float16 weights (``model.half()``): g² overflows float16 above |g| = 256, which made
    T = (1 + η g²)^(-1/2) zero there, dropping those components from ε and inflating the rest
    (‖T g‖ 4× too small). T is small there, not zero: ε and ‖T g‖ as in float64, to float16's
    rounding."""
    weight = torch.zeros(4, dtype=torch.float16, requires_grad=True)
    optimizer = tram.FisherSAM(torch.optim.SGD([weight], lr=0.1), rho=0.3, eta=0.6, foreach=foreach)
    weight.grad = torch.tensor([300.0, -1.5, 0.5, 1000.0], dtype=torch.float16)
    grad = weight.grad.double()
    scale = (1 + 0.6 * grad.square()).rsqrt()
    norm = (scale * grad).norm()
    assert optimizer.first_step()
    torch.testing.assert_close(
        weight.detach().double(), 0.3 * scale.square() * grad / norm, rtol=5e-3, atol=0.0
    )
    assert optimizer.last_ascent_norm == pytest.approx(float(norm), rel=2e-3)
