"""State that a module writes in its training forward, other than BatchNorm's running statistics,
comes from the first pass only (``tram/_forward_state.py``).

The contract tests run every wrapper over :func:`tests.helpers.stateful_model`. Here: the
fake-quantise observers of quantisation-aware training (the default x86 configuration's fused
kernel writes them without moving their version counters), and the buffers of another network
that runs in a wrapper's second pass (a GAN's discriminator in the generator's step) when the
wrapper's ``model=`` holds every perturbed weight.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.ao.quantization as quantization
from torch import Tensor, nn

import tram
from tests.helpers import cross_entropy_closure, stateful_model
from tram.batchnorm import every_module_with_buffers


class _QuantisedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quantise = quantization.QuantStub()
        self.hidden = nn.Linear(4, 8)
        self.activation = nn.ReLU()
        self.output = nn.Linear(8, 3)
        self.dequantise = quantization.DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.activation(self.hidden(self.quantise(x)))
        return self.dequantise(self.output(hidden))


def quantisation_aware_model() -> nn.Module:
    """A two-layer net prepared for QAT with torch's default x86 configuration, whose observers
    (``FusedMovingAvgObsFakeQuantize``) keep running minima and maxima."""
    torch.manual_seed(0)
    model = _QuantisedNet().train()
    model.qconfig = quantization.get_default_qat_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantization.prepare_qat(model)


def batches(count: int) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(11)
    return [
        (torch.randn(12, 4, generator=generator), torch.randint(0, 3, (12,), generator=generator))
        for _ in range(count)
    ]


def assert_buffers_equal(got: nn.Module, want: nn.Module, where: str) -> None:
    for (name, value), expected in zip(got.named_buffers(), want.buffers(), strict=True):
        assert torch.equal(value, expected), f"{where}: {name}"


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05)


WRAPPERS: dict[str, Callable[[nn.Module], tram.TwoPassOptimizer]] = {
    "SAM, model=": lambda m: tram.SAM(_sgd(m), rho=0.07, model=m),
    "SAM": lambda m: tram.SAM(_sgd(m), rho=0.07),
    "TRAM-θt−1": lambda m: tram.TRAM(_sgd(m), m, trust_region="previous"),
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_quantisation_observers_come_from_the_first_pass_only(wrapper: str) -> None:
    """After each step the observers are as one training forward at θ left them. Before, the
    second pass (and TRAM's reference forward) moved them: their fused kernel moves no version
    counter, so only an unconditional copy back restores them."""
    model = quantisation_aware_model()
    optimizer = WRAPPERS[wrapper](model)
    for step, (x, y) in enumerate(batches(3)):
        twin = copy.deepcopy(model)
        with torch.no_grad():
            twin(x)
        optimizer.step(cross_entropy_closure(optimizer, model, x, y))
        assert_buffers_equal(model, twin, f"step {step}")
    observer = model.hidden.activation_post_process.activation_post_process
    assert observer.min_val.numel() > 0  # the observers did run


def _generator() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))


@pytest.mark.parametrize("form", ["closure", "explicit, second_pass()"])
def test_another_networks_buffers_in_the_second_pass_come_from_the_first_pass_only(
    form: str,
) -> None:
    """A generator's step with ``model=generator``: the discriminator runs in both passes, and
    its buffers (a spectral norm's vectors, a counter, a running mean written through
    ``.data``) are after the step as one forward at θ left them, as without ``model=``. It is
    built after the process's first walk for modules with buffers, so it is heard of when built."""
    generator = _generator()
    optimizer = tram.SAM(
        torch.optim.SGD(generator.parameters(), lr=0.05), rho=0.07, model=generator
    )
    every_module_with_buffers()  # the process's walk for modules with buffers has run
    noise = torch.randn(10, 4, generator=torch.Generator().manual_seed(4))
    discriminator = stateful_model()
    for step in range(3):
        twin = copy.deepcopy(discriminator)
        with torch.no_grad():
            twin(generator(noise))

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = -discriminator(generator(noise)).log_softmax(-1)[:, 0].mean()
            loss.backward()
            return loss

        if form == "closure":
            optimizer.step(closure)
        else:
            with optimizer.first_pass():
                closure()
            assert optimizer.first_step()
            with optimizer.second_pass():
                closure()
            optimizer.second_step()
        assert_buffers_equal(discriminator, twin, f"step {step}")
    assert int(discriminator[1].calls) == 3


class _ScriptedCounter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(3))

    def forward(self, x: Tensor) -> Tensor:
        self.calls.add_(1.0)
        return x + self.calls


@pytest.mark.parametrize("bind_model", [True, False], ids=["model", "no-model"])
def test_a_scripted_modules_buffers_are_put_back(bind_model: bool) -> None:
    """A TorchScript module (whose ``_buffers`` is torch's ``OrderedDictWrapper``, without
    ``get``) run in both passes, outside ``model=`` or with none: its counter counts one call
    per step. Before, a ScriptModule anywhere in the process made every step with ``model=``
    raise ``AttributeError`` at the restore."""
    scripted = torch.jit.script(_ScriptedCounter())
    model = nn.Linear(3, 2)
    optimizer = tram.SAM(_sgd(model), rho=0.07, model=model if bind_model else None)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(6))

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = model(scripted(x)).square().mean()
        loss.backward()
        return loss

    for _ in range(2):
        optimizer.step(closure)
    assert torch.equal(scripted.calls, torch.full((3,), 2.0))
