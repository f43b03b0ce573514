"""Tests for tram.diagnostics: problems with known answers."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from tram.diagnostics import (
    collect_features,
    epsilon_sharpness,
    linear_cka,
    top_hessian_eigenvalue,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_close(actual: Tensor, expected: Tensor) -> None:
    # torch.allclose, not torch.testing.assert_close: the latter's first call costs seconds.
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-6)


def _orthogonal(d: int, seed: int) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=torch.float64))
    return q


# --------------------------------------------------------------------------- linear CKA


def test_cka_of_x_with_itself_is_one() -> None:
    x = torch.randn(50, 7, generator=_gen(1))
    assert abs(linear_cka(x, x).item() - 1.0) < 1e-10


def test_cka_invariant_to_orthogonal_transform_and_scaling() -> None:
    x = torch.randn(60, 6, generator=_gen(2), dtype=torch.float64)
    q = _orthogonal(6, 3)
    assert abs(linear_cka(x, x @ q).item() - 1.0) < 1e-10
    y = torch.randn(60, 4, generator=_gen(4), dtype=torch.float64)
    base = linear_cka(x, y).item()
    assert 0.0 < base < 1.0
    assert abs(linear_cka(17.0 * x, 0.01 * y).item() - base) < 1e-12
    assert abs(linear_cka(x @ q, y).item() - base) < 1e-12


def test_cka_of_independent_features_is_small() -> None:
    x = torch.randn(2000, 5, generator=_gen(5))
    y = torch.randn(2000, 5, generator=_gen(6))
    assert linear_cka(x, y).item() < 0.1


def test_cka_tiny_example_by_hand() -> None:
    # Centred X = [[1, 0], [0, 1], [-1, -1]], centred Y = [[1], [-1], [0]]:
    # XᵀX = [[2, 1], [1, 2]] -> ‖·‖_F = √10; YᵀY = [[2]] -> 2; YᵀX = [1, -1] -> ‖·‖_F² = 2.
    # CKA = 2 / (2√10) = 1/√10. Offsets are added so that the centring is exercised.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]) + torch.tensor([3.0, -2.0])
    y = torch.tensor([[1.0], [-1.0], [0.0]]) + 5.0
    out = linear_cka(x, y)
    assert out.dtype == torch.float64
    assert abs(out.item() - 1.0 / math.sqrt(10.0)) < 1e-12


def test_cka_gram_form_matches_feature_form() -> None:
    # n < d takes the n x n Gram path; compare with the feature-space formula written out.
    x = torch.randn(10, 30, generator=_gen(7), dtype=torch.float64)
    y = torch.randn(10, 25, generator=_gen(8), dtype=torch.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = torch.linalg.norm(yc.T @ xc) ** 2 / (
        torch.linalg.norm(xc.T @ xc) * torch.linalg.norm(yc.T @ yc)
    )
    assert abs(linear_cka(x, y).item() - expected.item()) < 1e-12


def test_cka_errors() -> None:
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match=r"\(10, 3\) and \(9, 3\)"):
        linear_cka(x, torch.randn(9, 3))
    with pytest.raises(ValueError, match="at least 2 examples"):
        linear_cka(x[:1], x[:1])
    with pytest.raises(ValueError, match="2-D"):
        linear_cka(torch.randn(10, 3, 2), x)
    with pytest.raises(ValueError, match=r"^y is constant"):
        linear_cka(x, torch.full((10, 4), 0.1))
    with pytest.raises(ValueError, match=r"^x is constant"):
        linear_cka(torch.zeros(10, 2), x)
    # One constant column among varying ones is fine: it adds nothing after centring.
    assert abs(linear_cka(torch.cat([x, torch.ones(10, 1)], dim=1), x).item() - 1.0) < 1e-10


# --------------------------------------------------------------------------- top Hessian eigenvalue


def _quadratic(eigenvalues: list[float], seed: int) -> tuple[Tensor, Tensor]:
    q = _orthogonal(len(eigenvalues), seed)
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    return (a + a.T) / 2, q


@pytest.mark.parametrize(
    "eigenvalues", [[5.0, -2.0, 1.0, 0.5, 0.1, -0.3], [-4.0, 1.5, 1.0, 0.2, -0.7, 0.0]]
)
def test_hessian_eigenvalue_of_quadratic(eigenvalues: list[float]) -> None:
    # The top (largest) eigenvalue, also where a negative one is larger in magnitude (second
    # case: 1.5, not -4; power iteration alone finds -4).
    a, q = _quadratic(eigenvalues, seed=9)
    w = torch.randn(len(eigenvalues), generator=_gen(10), dtype=torch.float64, requires_grad=True)
    top = max(range(len(eigenvalues)), key=lambda i: eigenvalues[i])
    value, vec = top_hessian_eigenvalue(lambda: 0.5 * w @ a @ w, [w], generator=_gen(11))
    # The shifted run converges at (1.0 + 4) / (1.5 + 4), slower than the plain one's 2 / 5: the
    # default stopping rule leaves it 0.2% short (a Rayleigh quotient never overshoots).
    assert abs(value - eigenvalues[top]) < (1e-3 if eigenvalues[top] == 5.0 else 1e-2) * abs(
        eigenvalues[top]
    )
    assert value <= eigenvalues[top] + 1e-12
    # The vector converges more slowly than the Rayleigh quotient: ask for a tight tolerance.
    value, vec = top_hessian_eigenvalue(
        lambda: 0.5 * w @ a @ w, [w], iterations=500, tolerance=1e-12, generator=_gen(11)
    )
    assert abs(value - eigenvalues[top]) < 1e-10 * abs(eigenvalues[top])
    assert abs(torch.linalg.norm(vec[0]).item() - 1.0) < 1e-12
    assert abs(abs(torch.dot(vec[0], q[:, top]).item()) - 1.0) < 1e-8
    assert w.grad is None


def test_hessian_eigenvalue_with_params_split_across_tensors() -> None:
    # Linear regression L(w, b) = mean((Xw + b - t)²): H = 2 [X 1]ᵀ[X 1] / n, written out here.
    n = 40
    x = torch.randn(n, 3, generator=_gen(12), dtype=torch.float64)
    t = torch.randn(n, generator=_gen(13), dtype=torch.float64)
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    xa = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    evals, evecs = torch.linalg.eigh(2.0 * xa.T @ xa / n)

    def loss() -> Tensor:
        return ((x @ w + b - t) ** 2).mean()

    value, vec = top_hessian_eigenvalue(
        loss, [w, b], iterations=1000, tolerance=1e-12, generator=_gen(14)
    )
    assert [tuple(v.shape) for v in vec] == [(3,), (1,)]
    assert abs(value - evals[-1].item()) < 1e-3 * evals[-1].item()
    flat = torch.cat(vec)
    assert abs(torch.linalg.norm(flat).item() - 1.0) < 1e-12
    assert abs(abs(torch.dot(flat, evecs[:, -1]).item()) - 1.0) < 1e-6
    assert w.grad is None
    assert b.grad is None


def _mlp_loss(seed: int) -> tuple[list[Tensor], Callable[[], Tensor], Tensor]:
    """A 3-4-3 tanh classifier at weights drawn from ``seed`` (away from a minimum: the Hessian
    has negative eigenvalues), its loss, and its explicit Hessian over the 31 parameters."""
    x = torch.randn(11, 3, generator=_gen(0), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1])
    flat = 2.0 * torch.randn(31, generator=_gen(seed), dtype=torch.float64)
    shapes = [(4, 3), (4,), (3, 4), (3,)]

    def loss_at(vector: Tensor) -> Tensor:
        parts, start = [], 0
        for shape in shapes:
            size = math.prod(shape)
            parts.append(vector[start : start + size].reshape(shape))
            start += size
        w1, b1, w2, b2 = parts
        return nn.functional.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)

    hessian = torch.autograd.functional.hessian(loss_at, flat)
    params = [t.clone().requires_grad_() for t in torch.split(flat, [12, 4, 12, 3])]
    return params, lambda: loss_at(torch.cat([p.reshape(-1) for p in params])), hessian


@pytest.mark.parametrize("seed", [30, 3])
def test_hessian_eigenvalue_of_small_network_matches_explicit_hessian(seed: int) -> None:
    # Brute force: the eigenvalues of the Hessian written out by torch.autograd.functional.
    # Seed 30: the most negative eigenvalue (-5.69) is larger in magnitude than the top one
    # (1.75); seed 3: the top one dominates.
    params, loss, hessian = _mlp_loss(seed)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    low, high = eigenvalues[0].item(), eigenvalues[-1].item()
    assert (-low > 3 * high > 0) if seed == 30 else (high > -low > 0)
    value, vec = top_hessian_eigenvalue(
        loss, params, iterations=500, tolerance=1e-12, generator=_gen(1)
    )
    assert abs(value - high) < 1e-8 * high
    flat = torch.cat([v.reshape(-1) for v in vec])
    assert abs(torch.linalg.norm(flat).item() - 1.0) < 1e-12
    residual = hessian @ flat - high * flat  # an eigenvector of the top eigenvalue
    assert torch.linalg.norm(residual).item() < 1e-4
    # Fewer iterations never overshoot: the Rayleigh quotient is at most the top eigenvalue.
    few, _ = top_hessian_eigenvalue(loss, params, iterations=3, generator=_gen(1))
    assert low < few <= high + 1e-12


def test_hessian_eigenvalue_of_linear_loss_is_zero() -> None:
    w = torch.ones(4, requires_grad=True)
    value, vec = top_hessian_eigenvalue(lambda: 3.0 * w.sum(), [w], generator=_gen(0))
    assert value == 0.0
    assert abs(torch.linalg.norm(vec[0]).item() - 1.0) < 1e-6


def test_hessian_eigenvalue_errors() -> None:
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"^Invalid iterations: 0$"):
        top_hessian_eigenvalue(lambda: w.sum(), [w], iterations=0)
    with pytest.raises(ValueError, match=r"^Invalid tolerance: 0.0$"):
        top_hessian_eigenvalue(lambda: w.sum(), [w], tolerance=0.0)
    with pytest.raises(ValueError, match="empty"):
        top_hessian_eigenvalue(lambda: w.sum(), [])
    with pytest.raises(ValueError, match=r"params\[0\] does not require grad"):
        top_hessian_eigenvalue(lambda: w.sum(), [torch.ones(2)])


# --------------------------------------------------------------------------- ε-sharpness


def _params(seed: int) -> list[Tensor]:
    g = _gen(seed)
    return [
        torch.randn(3, 2, generator=g, dtype=torch.float64).requires_grad_(),
        torch.randn(4, generator=g, dtype=torch.float64).requires_grad_(),
    ]


def test_sharpness_of_linear_loss_is_closed_form() -> None:
    # L(x) = cᵀx + b: the max over the box is Σ|c_i| ε(|x_i| + 1), reached at a corner.
    params = _params(20)
    coefs = [
        torch.randn(p.shape, generator=_gen(21 + i), dtype=torch.float64)
        for i, p in enumerate(params)
    ]

    def loss() -> Tensor:
        return sum((c * p).sum() for c, p in zip(coefs, params, strict=True)) + 10.0

    eps = 1e-3
    base = loss().item()
    gain = sum(
        (c.abs() * eps * (p.detach().abs() + 1)).sum().item()
        for c, p in zip(coefs, params, strict=True)
    )
    expected = gain / (1.0 + base) * 100.0
    assert base > 0
    for steps in (1, 5):
        phi = epsilon_sharpness(loss, params, epsilon=eps, steps=steps)
        assert abs(phi - expected) < 1e-6 * expected


def test_sharpness_with_lr_uses_plain_gradient_steps() -> None:
    # Constant gradient c, box too large to bind: y_k = k·lr·c, so the gain is steps·lr·‖c‖².
    x = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    c = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    lr, steps = 1e-3, 4
    phi = epsilon_sharpness(lambda: c @ x + 1.0, [x], epsilon=1.0, steps=steps, lr=lr)
    expected = steps * lr * (c @ c).item() / 2.0 * 100.0
    assert abs(phi - expected) < 1e-9 * expected
    # A small box binds: every coordinate with c_i != 0 stops at ±ε(|x_i| + 1) = ±ε.
    phi = epsilon_sharpness(lambda: c @ x + 1.0, [x], epsilon=1e-4, steps=steps, lr=lr)
    assert abs(phi - 1e-4 * c.abs().sum().item() / 2.0 * 100.0) < 1e-9


def test_sharpness_of_diagonal_quadratic_is_closed_form() -> None:
    # L = ½ Σ h_i (x_i - m_i)²: the max over the box is at y_i = sign(x_i - m_i) ε(|x_i| + 1).
    x = torch.randn(8, generator=_gen(30), dtype=torch.float64).requires_grad_()
    m = torch.randn(8, generator=_gen(31), dtype=torch.float64)
    h = torch.rand(8, generator=_gen(32), dtype=torch.float64) + 0.5

    def loss(z: Tensor = x) -> Tensor:
        return 0.5 * (h * (z - m) ** 2).sum()

    eps = 1e-2
    xd = x.detach()
    corner = xd + torch.sign(xd - m) * eps * (xd.abs() + 1)
    base = loss().item()
    expected = (loss(corner).item() - base) / (1 + base) * 100
    assert abs(epsilon_sharpness(loss, [x], epsilon=eps) - expected) < 1e-9 * expected


def test_sharpness_of_convex_quadratic_beats_random_feasible_points() -> None:
    g = _gen(40)
    d = 6
    b = torch.randn(d, d, generator=g, dtype=torch.float64)
    a = b @ b.T / d + torch.eye(d, dtype=torch.float64)
    m = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(d, generator=g, dtype=torch.float64).requires_grad_()

    def loss(z: Tensor = x) -> Tensor:
        return 0.5 * (z - m) @ a @ (z - m)

    eps = 0.05
    phi = epsilon_sharpness(loss, [x], epsilon=eps, steps=10)
    xd = x.detach()
    width = eps * (xd.abs() + 1)
    base = loss().item()
    ys = (2 * torch.rand(2000, d, generator=g, dtype=torch.float64) - 1) * width
    corners = torch.sign(torch.randn(2000, d, generator=g, dtype=torch.float64)) * width
    for y in torch.cat([ys, corners]):
        assert phi >= (loss(xd + y).item() - base) / (1 + base) * 100 - 1e-12
    assert phi > 0


def test_sharpness_restores_params_and_grads_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).eval()
    inputs, target = torch.randn(16, 4), torch.randn(16, 2)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]

    def loss() -> Tensor:
        return nn.functional.mse_loss(model(inputs), target)

    phi = epsilon_sharpness(loss, params, epsilon=1e-2, steps=5)
    assert math.isfinite(phi)
    assert phi > 0
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))
    assert all(p.grad is None for p in params)

    # Existing .grad survives a loss_fn that clears it (a closure calling zero_grad), and a
    # loss_fn that raises on its 3rd call leaves params intact.
    for p in params:
        p.grad = torch.full_like(p, 7.0)
    calls = 0

    def flaky() -> Tensor:
        nonlocal calls
        calls += 1
        model.zero_grad(set_to_none=True)
        if calls == 3:
            raise RuntimeError("boom")
        return loss()

    with pytest.raises(RuntimeError, match="boom"):
        epsilon_sharpness(flaky, params, epsilon=1e-2, steps=5)
    assert calls == 3
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))
    assert all(p.grad is not None and bool((p.grad == 7.0).all()) for p in params)


def test_sharpness_errors() -> None:
    w = torch.ones(2, requires_grad=True)
    for eps in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match=r"^Invalid epsilon value"):
            epsilon_sharpness(lambda: w.sum(), [w], epsilon=eps)
    with pytest.raises(ValueError, match=r"^Invalid steps: 0$"):
        epsilon_sharpness(lambda: w.sum(), [w], steps=0)
    with pytest.raises(ValueError, match=r"^Invalid lr value: 0.0$"):
        epsilon_sharpness(lambda: w.sum(), [w], lr=0.0)
    with pytest.raises(ValueError, match="empty"):
        epsilon_sharpness(lambda: w.sum(), [])
    with pytest.raises(ValueError, match="not finite"):
        epsilon_sharpness(lambda: w.sum() * math.inf, [w])
    with pytest.raises(ValueError, match="scalar"):
        epsilon_sharpness(lambda: w * 2, [w])
    assert torch.equal(w, torch.ones(2))


# --------------------------------------------------------------------------- collect_features


@dataclass
class _Output:
    last_hidden_state: Tensor
    logits: Tensor


class _TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.encoder = nn.Linear(4, 4)
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(4, 3)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> _Output:
        hidden = self.dropout(self.encoder(self.embed(input_ids)))
        return _Output(last_hidden_state=hidden, logits=self.head(hidden[:, 0]))


def _batches() -> list[dict[str, Tensor]]:
    g = _gen(50)
    out = []
    for lengths in ([3, 5], [1, 4, 2]):
        ids = torch.randint(0, 10, (len(lengths), 5), generator=g)
        mask = (torch.arange(5) < torch.tensor(lengths)[:, None]).long()
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_collect_features_mean_pooling_over_mask() -> None:
    torch.manual_seed(0)
    model = _TinyEncoder()
    batches = _batches()
    feats = collect_features(model, batches)
    assert feats.shape == (5, 4)
    assert feats.dtype == torch.float32
    rows = []
    with torch.no_grad():
        for batch in batches:
            hidden = model.encoder(model.embed(batch["input_ids"]))  # eval: no dropout
            for h, m in zip(hidden, batch["attention_mask"], strict=True):
                rows.append(h[m.bool()].mean(dim=0))
    _assert_close(feats, torch.stack(rows))
    # Same features through the submodule, by name or by object.
    _assert_close(collect_features(model, batches, module="encoder"), feats)
    _assert_close(collect_features(model, batches, module=model.encoder), feats)
    first = collect_features(model, batches, pool="first")
    _assert_close(first, torch.stack([r[0] for r in _hidden(model, batches)]))


def _hidden(model: _TinyEncoder, batches: list[dict[str, Tensor]]) -> list[Tensor]:
    with torch.no_grad():
        return [h for b in batches for h in model.encoder(model.embed(b["input_ids"]))]


def test_collect_features_takes_logits_tuples_and_tensors() -> None:
    torch.manual_seed(0)
    model = _TinyEncoder()
    batches = _batches()
    feats = collect_features(model, batches, module="head")  # a plain [B, 3] tensor
    assert feats.shape == (5, 3)

    class TupleModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return self.lin(x), x

    tm = TupleModel()
    xs = [torch.randn(3, 6, 4, generator=_gen(60)), torch.randn(2, 6, 4, generator=_gen(61))]
    out = collect_features(tm, xs)  # tensor batches, tuple output, unmasked mean
    with torch.no_grad():
        _assert_close(out, torch.cat([tm.lin(x).mean(dim=1) for x in xs]))
    out = collect_features(tm, [(x,) for x in xs], pool="first")  # tuple batches
    with torch.no_grad():
        _assert_close(out, torch.cat([tm.lin(x)[:, 0] for x in xs]))


def test_collect_features_restores_modes_and_removes_hook() -> None:
    model = _TinyEncoder().train()
    model.encoder.eval()  # a mixed state must come back module by module
    modes = {name: m.training for name, m in model.named_modules()}
    collect_features(model, _batches(), module="encoder")
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert not model.encoder._forward_hooks
    assert not model._forward_hooks

    bad = [*_batches(), {"input_ids": torch.tensor([[42]])}]  # index out of range: raises
    with pytest.raises(IndexError):
        collect_features(model, bad, module="encoder")
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert not model.encoder._forward_hooks


def test_collect_features_errors() -> None:
    model = _TinyEncoder()
    with pytest.raises(ValueError, match="Invalid pool"):
        collect_features(model, _batches(), pool="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        collect_features(model, [])
    with pytest.raises(ValueError, match="did not run"):
        collect_features(model, _batches(), module=nn.Linear(4, 4))
    batch = _batches()[0]
    batch["attention_mask"] = batch["attention_mask"] * 0
    with pytest.raises(ValueError, match="no tokens"):
        collect_features(model, [batch])
    assert not model._forward_hooks
