"""Gradient accumulation with ``tram.accumulating_closure``.

One ascent per optimizer step from the gradient of the whole effective batch, then every
micro-batch replayed at θ+ε: with a mean-reduced loss this equals SAM on the concatenated batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tram

Batch = tuple[Tensor, Tensor]

WRAPPERS = {
    "SAM": lambda base: tram.SAM(base, rho=0.05),
    "ASAM": lambda base: tram.ASAM(base, rho=0.5, eta=0.01),
}
BASES = {
    "SGD": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "AdamW": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01),
}


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def big_batch(step: int, size: int = 32) -> Batch:
    generator = torch.Generator().manual_seed(500 + step)
    return torch.randn(size, 6, generator=generator), torch.randint(
        0, 3, (size,), generator=generator
    )


def split(batch: Batch, sizes: list[int]) -> list[Batch]:
    xs, ys = batch[0].split(sizes), batch[1].split(sizes)
    return list(zip(xs, ys))


def loss_fn_for(model: nn.Module, visits: list[int] | None = None) -> Callable[[Batch], Tensor]:
    def loss_fn(batch: Batch) -> Tensor:
        if visits is not None:
            visits.append(len(batch[0]))
        return F.cross_entropy(model(batch[0]), batch[1])

    return loss_fn


def run_big_batch(wrapper: str, base: str, steps: int) -> nn.Module:
    model = make_model()
    optimizer = WRAPPERS[wrapper](BASES[base](model.parameters()))
    for step in range(steps):
        x, y = big_batch(step)

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
    return model


def run_accumulated(
    wrapper: str, base: str, steps: int, sizes: list[int], *, weighted: bool = False
) -> tuple[nn.Module, list[Tensor]]:
    model = make_model()
    optimizer = WRAPPERS[wrapper](BASES[base](model.parameters()))
    losses = []
    for step in range(steps):
        micro_batches = split(big_batch(step), sizes)
        weights = [size / sum(sizes) for size in sizes] if weighted else None
        closure = tram.accumulating_closure(
            optimizer, micro_batches, loss_fn_for(model), weights=weights
        )
        losses.append(optimizer.step(closure))
    return model, losses


def assert_close_models(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        # Only the summation order of the gradient differs: a few float32 ulps.
        torch.testing.assert_close(p, q, rtol=1e-6, atol=2e-7)


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_equal_micro_batches_equal_the_concatenated_batch(wrapper: str, base: str) -> None:
    big = run_big_batch(wrapper, base, steps=3)
    accumulated, losses = run_accumulated(wrapper, base, steps=3, sizes=[8, 8, 8, 8])
    assert_close_models(accumulated, big)
    assert all(not loss.requires_grad for loss in losses)  # detached
    # The perturbation matters: a plain base optimizer ends elsewhere.
    plain = make_model()
    plain_base = BASES[base](plain.parameters())
    for step in range(3):
        x, y = big_batch(step)
        plain_base.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        plain_base.step()
    assert any(
        not torch.allclose(p, q, atol=1e-5)
        for p, q in zip(accumulated.parameters(), plain.parameters())
    )


def test_returned_loss_is_the_mean_over_the_effective_batch() -> None:
    model = make_model()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = big_batch(0)
    expected = F.cross_entropy(model(x), y).item()
    closure = tram.accumulating_closure(optimizer, split((x, y), [8] * 4), loss_fn_for(model))
    assert optimizer.step(closure).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_unequal_micro_batches_with_size_weights_equal_the_concatenated_batch(wrapper: str) -> None:
    big = run_big_batch(wrapper, "AdamW", steps=3)
    accumulated, _ = run_accumulated(wrapper, "AdamW", steps=3, sizes=[5, 11, 16], weighted=True)
    assert_close_models(accumulated, big)
    # Without the weights the small micro-batch counts as much as the large one: not equal.
    unweighted, _ = run_accumulated(wrapper, "AdamW", steps=3, sizes=[5, 11, 16])
    assert any(
        not torch.allclose(p, q, atol=1e-4)
        for p, q in zip(unweighted.parameters(), big.parameters())
    )


def test_the_closure_is_called_twice_and_visits_every_micro_batch_once_per_call() -> None:
    model = make_model()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    visits: list[int] = []
    closure = tram.accumulating_closure(
        optimizer,
        split(big_batch(0), [3, 5, 7, 17]),
        loss_fn_for(model, visits),
        weights=[0.25] * 4,
    )
    calls = []

    def counted() -> Tensor:
        calls.append(1)
        return closure()

    optimizer.step(counted)
    assert len(calls) == 2
    assert visits == [3, 5, 7, 17, 3, 5, 7, 17]


def test_all_but_the_last_backward_run_under_no_sync() -> None:
    class FakeDDP(nn.Module):
        """A module with DDP's ``no_sync``, recording when gradients would be synchronised."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = make_model()
            self.syncing = True
            self.synced_backwards: list[bool] = []

        def forward(self, x: Tensor) -> Tensor:
            out = self.inner(x)
            out.register_hook(self._record)
            return out

        def _record(self, grad: Tensor) -> None:
            self.synced_backwards.append(self.syncing)

        @contextlib.contextmanager
        def no_sync(self) -> Iterator[None]:
            self.syncing = False
            try:
                yield
            finally:
                self.syncing = True

    model = FakeDDP()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    closure = tram.accumulating_closure(
        optimizer, split(big_batch(0), [8] * 4), loss_fn_for(model), model=model
    )
    optimizer.step(closure)
    assert model.synced_backwards == [False, False, False, True] * 2


@pytest.mark.parametrize(
    ("micro_batches", "weights", "message"),
    [
        ([], None, "micro_batches is empty"),
        ([1, 2, 3], [0.5, 0.5], "weights has 2 entries but micro_batches has 3"),
        ([1], [0.5, 0.25, 0.25], "weights has 3 entries but micro_batches has 1"),
    ],
)
def test_errors(micro_batches: list, weights: list | None, message: str) -> None:
    model = make_model()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=message):
        tram.accumulating_closure(optimizer, micro_batches, loss_fn_for(model), weights=weights)


def test_the_naive_per_micro_batch_ascent_is_rejected() -> None:
    """Ascending on each micro-batch (the pattern that drifts the weights) fails loudly."""
    model = make_model()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    first, second = split(big_batch(0), [16, 16])
    optimizer.zero_grad()
    (F.cross_entropy(model(first[0]), first[1]) / 2).backward()
    assert optimizer.first_step()
    (F.cross_entropy(model(second[0]), second[1]) / 2).backward()
    perturbed = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(
        RuntimeError, match=r"first_step\(\) called while the weights are perturbed"
    ):
        optimizer.first_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), perturbed))
    optimizer.restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
