"""tram with Lightning Fabric (``fabric.setup`` and ``optimizer.step(closure)``, as LitGPT's loops
drive it).

Fabric hands back its own optimizer wrapper, whose ``step(closure)`` goes through the precision
plugin to the tram wrapper, and a module wrapper that runs the forward under the precision's
autocast and casts the output back to float32. Every wrapper driven that way takes the same
steps as in a plain loop that does by hand what Fabric does (autocast around the forward, the
float32 cast of the logits), bit for bit; ``step()`` alone is refused, as everywhere; a run saved
with ``fabric.save`` and resumed with ``fabric.load`` ends where the uninterrupted one does.
Fabric is real (no mock).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tram
from tests.helpers import counting_backend, some_fast
from tests.wrappers_table import WRAPPERS, WrapperCase

fabric_module = pytest.importorskip("lightning.fabric")

STEPS = 3


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(300 + step)
    return torch.randn(16, 5, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def make_fabric(precision: str) -> fabric_module.Fabric:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "16-mixed" and similar notices on a CPU
        return fabric_module.Fabric(accelerator="cpu", devices=1, precision=precision)


def plain_run(case: WrapperCase, precision: str) -> tuple[nn.Module, tram.TwoPassOptimizer]:
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
    return model, optimizer


def fabric_steps(fabric: Any, fabric_model: nn.Module, optimizer: Any, steps: range) -> None:
    """One ``optimizer.step(closure)`` per step, on that step's batch."""
    for step in steps:
        x, y = batch(step)

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(fabric_model(x), y)
            fabric.backward(loss)
            return loss

        optimizer.step(closure)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("case", WRAPPERS, ids=str)
def test_fabric_takes_the_plain_loops_steps(case: WrapperCase, precision: str) -> None:
    fabric = make_fabric(precision)
    model = make_model()
    wrapper = case.make(torch.optim.AdamW(model.parameters(), lr=0.01), model)
    fabric_model, optimizer = fabric.setup(model, wrapper)
    fabric_steps(fabric, fabric_model, optimizer, range(STEPS))
    assert wrapper.steps == STEPS
    assert not wrapper.is_perturbed
    expected, _ = plain_run(case, precision)
    for p, q in zip(model.parameters(), expected.parameters(), strict=True):
        assert torch.equal(p, q), (p - q).abs().max()


class Mlp(nn.Module):
    """``make_model``'s layers and initial weights in a class of its own: dynamo skips the
    forwards of torch.nn's containers, so a compiled ``nn.Sequential`` would run eagerly."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Linear(5, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


COMPILES = ("torch.compile(model)", "model.compile()")


def compiled_mlp(how: str, backend: Callable[..., Any], seed: int = 0) -> tuple[Mlp, nn.Module]:
    """An ``Mlp`` and what its user holds once it is compiled: ``torch.compile``'s
    ``OptimizedModule``, or the ``Mlp`` itself compiled in place."""
    torch._dynamo.reset()  # dynamo's cache belongs to Mlp.forward: a new run traces anew
    model = Mlp(seed)
    if how == "torch.compile(model)":
        return model, torch.compile(model, backend=backend)  # type: ignore[return-value]
    model.compile(backend=backend)
    return model, model


@pytest.mark.parametrize("how", COMPILES)
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("case", some_fast(WRAPPERS, "SAM", "TRAM-noise", "TRAM-fisher"))
def test_fabric_with_a_compiled_model_takes_the_plain_loops_steps(
    case: WrapperCase, precision: str, how: str
) -> None:
    """``fabric.setup(torch.compile(model))`` (Fabric takes the module out, sets it up and
    compiles it again with the same arguments, inside its ``_FabricModule``) and
    ``model.compile()`` before ``fabric.setup``: the eager plain loop's steps, and TRAM's d,
    bit for bit."""
    backend, graphs = counting_backend()
    fabric = make_fabric(precision)
    model, held = compiled_mlp(how, backend)
    wrapper = case.make(torch.optim.AdamW(model.parameters(), lr=0.01), held)
    fabric_model, optimizer = fabric.setup(held, wrapper)
    recompiled = type(fabric_model._forward_module).__name__ == "OptimizedModule"
    assert recompiled == (held is not model)
    fabric_steps(fabric, fabric_model, optimizer, range(STEPS))
    assert graphs
    assert wrapper.steps == STEPS
    assert not wrapper.is_perturbed
    expected, reference = plain_run(case, precision)
    for p, q in zip(model.parameters(), expected.parameters(), strict=True):
        assert torch.equal(p, q), (p - q).abs().max()
    if isinstance(wrapper, tram.TRAM):
        assert wrapper.radius_history == reference.radius_history  # type: ignore[attr-defined]


@pytest.mark.parametrize("how", some_fast(COMPILES, "model.compile()"))
def test_fabric_with_a_compiled_model_resumes_bit_exactly(how: str, tmp_path: Any) -> None:
    """``fabric.save`` after 3 of 5 steps with a compiled model (TRAM-x: its noise generator
    and step counter in the optimizer's state), ``fabric.load`` into a compiled model built with
    other weights: the uninterrupted run's weights, bit for bit."""
    steps, stop = 5, 3
    backend, graphs = counting_backend()

    def setup(seed: int) -> tuple[Any, nn.Module, Any, tram.TwoPassOptimizer]:
        graphs.clear()
        fabric = make_fabric("32-true")
        model, held = compiled_mlp(how, backend, seed)
        base = torch.optim.AdamW(model.parameters(), lr=0.01)
        wrapper = tram.TRAM(
            base, held, trust_region="noise", embeddings=model.hidden, sigma=0.3, seed=2
        )
        return fabric, *fabric.setup(held, wrapper), wrapper

    assert_resumes_bit_exactly(setup, tmp_path, steps=steps, stop=stop)
    assert graphs  # the resumed run's


Setup = Callable[[int], tuple[Any, nn.Module, Any, tram.TwoPassOptimizer]]


def assert_resumes_bit_exactly(setup: Setup, tmp_path: Any, *, steps: int, stop: int) -> None:
    """``steps`` steps straight, and ``stop`` steps saved with ``fabric.save`` then loaded with
    ``fabric.load`` into ``setup(1)`` (other weights: everything must come from the file) and
    continued: the same weights, bit for bit."""
    fabric, straight, optimizer, _ = setup(0)
    fabric_steps(fabric, straight, optimizer, range(steps))

    fabric, model, optimizer, _ = setup(0)
    fabric_steps(fabric, model, optimizer, range(stop))
    fabric.save(tmp_path / "state.ckpt", {"model": model, "optimizer": optimizer})

    fabric, resumed, optimizer, wrapper = setup(1)
    fabric.load(tmp_path / "state.ckpt", {"model": resumed, "optimizer": optimizer})
    assert wrapper.steps == stop
    fabric_steps(fabric, resumed, optimizer, range(stop, steps))
    assert wrapper.steps == steps
    for p, q in zip(resumed.parameters(), straight.parameters(), strict=True):
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


RESUMABLE: dict[str, Callable[[torch.optim.Optimizer, nn.Module], tram.TwoPassOptimizer]] = {
    # SAM's step counter decides which steps ascend; TRAM-x's noise generator draws its noise.
    "SAM-every-2": lambda base, model: tram.SAM(base, rho=0.07, ascent_every=2),
    "TRAM-x": lambda base, model: tram.TRAM(
        base, model, trust_region="noise", embeddings=model[0], sigma=0.3, seed=2
    ),
}


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_fabric_save_and_load_resume_bit_exactly(name: str, tmp_path: Any) -> None:
    """``fabric.save`` of the model and the optimizer after 3 of 5 steps, ``fabric.load`` into
    a model built with other weights and a new optimizer: the resumed run ends where the
    uninterrupted one does, bit for bit (AdamW's moments, the wrapper's step counter and TRAM's
    noise generator come from the file)."""
    method, steps, stop = RESUMABLE[name], 5, 3

    def setup(seed: int) -> tuple[Any, nn.Module, Any, tram.TwoPassOptimizer]:
        fabric = make_fabric("32-true")
        model = make_model(seed)
        wrapper = method(torch.optim.AdamW(model.parameters(), lr=0.01), model)
        return fabric, *fabric.setup(model, wrapper), wrapper

    assert_resumes_bit_exactly(setup, tmp_path, steps=steps, stop=stop)
