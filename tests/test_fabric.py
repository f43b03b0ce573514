"""tram with Lightning Fabric (``fabric.setup`` and ``optimizer.step(closure)``, as LitGPT's loops
drive it).

Fabric hands back its own optimizer wrapper, whose ``step(closure)`` goes through the precision
plugin to the tram wrapper, and a module wrapper that runs the forward under the precision's
autocast and casts the output back to float32. Every wrapper driven that way takes the same
steps as in a plain loop that does by hand what Fabric does (autocast around the forward, the
float32 cast of the logits), bit for bit; ``step()`` alone is refused, as everywhere. Fabric is
real (no mock).
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tram
from tests.wrappers_table import WRAPPERS, WrapperCase

fabric_module = pytest.importorskip("lightning.fabric")

STEPS = 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(300 + step)
    return torch.randn(16, 5, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def make_fabric(precision: str) -> fabric_module.Fabric:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "16-mixed" and similar notices on a CPU
        return fabric_module.Fabric(accelerator="cpu", devices=1, precision=precision)


def plain_run(case: WrapperCase, precision: str) -> nn.Module:
    """The loop without Fabric: autocast as Fabric's precision sets it, logits cast to float32."""
    model = make_model()
    optimizer = case.make(torch.optim.AdamW(model.parameters(), lr=0.01), model)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "bf16-mixed"
        else contextlib.nullcontext()
    )
    for step in range(STEPS):
        x, y = batch(step)

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            optimizer.zero_grad()
            with autocast:
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            return loss

        optimizer.step(closure)
    return model


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("case", WRAPPERS, ids=str)
def test_fabric_takes_the_plain_loops_steps(case: WrapperCase, precision: str) -> None:
    fabric = make_fabric(precision)
    model = make_model()
    wrapper = case.make(torch.optim.AdamW(model.parameters(), lr=0.01), model)
    fabric_model, optimizer = fabric.setup(model, wrapper)
    for step in range(STEPS):
        x, y = batch(step)

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(fabric_model(x), y)
            fabric.backward(loss)
            return loss

        optimizer.step(closure)
    assert wrapper.steps == STEPS
    assert not wrapper.is_perturbed
    expected = plain_run(case, precision)
    for p, q in zip(model.parameters(), expected.parameters(), strict=True):
        assert torch.equal(p, q), (p - q).abs().max()


def test_fabric_step_without_closure_is_refused() -> None:
    fabric = make_fabric("32-true")
    model = make_model()
    wrapper = tram.SAM(torch.optim.AdamW(model.parameters(), lr=0.01), rho=0.07)
    fabric_model, optimizer = fabric.setup(model, wrapper)
    x, y = batch(0)
    fabric.backward(F.cross_entropy(fabric_model(x), y))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(tram.MissingAscentError, match="no step was taken"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
