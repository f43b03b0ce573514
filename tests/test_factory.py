"""The optimizer registry: names, argument checks, model hand-over, lazy registration."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import tram
from tests.wrappers_table import SAM_FAMILY
from tram import factory


@pytest.fixture(autouse=True)
def _clean_registry():
    saved = dict(factory._REGISTRY)
    yield
    factory._REGISTRY.clear()
    factory._REGISTRY.update(saved)


def make_base() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


class NeedsModel(tram.SAM):
    """A method whose constructor requires the model, as TRAM's does."""

    def __init__(self, base_optimizer: torch.optim.Optimizer, model: nn.Module, *, rho=0.05):
        super().__init__(base_optimizer, rho=rho, model=model)


class TakesAnything(tram.SAM):
    def __init__(self, base_optimizer: torch.optim.Optimizer, **kwargs: Any):
        self.extra = kwargs
        super().__init__(base_optimizer)


def test_builtin_methods_are_registered():
    assert {"sam", "asam", "fisher_sam"} <= set(factory.list_methods())
    assert factory.list_methods() == sorted(factory.list_methods())
    assert factory.get_method("sam") is tram.SAM
    assert factory.get_method("asam") is tram.ASAM
    assert factory.get_method("fisher_sam") is tram.FisherSAM


@pytest.mark.parametrize(
    ("name", "kwargs", "cls"),
    [
        ("sam", {"rho": 0.1}, tram.SAM),
        ("ASAM", {"rho": 0.4, "eta": 0.02}, tram.ASAM),
        ("Fisher-SAM", {"rho": 0.2, "eta": 0.3}, tram.FisherSAM),
    ],
)
def test_wrap_optimizer_builds_the_method_around_the_instance(name, kwargs, cls):
    _, base = make_base()
    optimizer = factory.wrap_optimizer(name, base, **kwargs)
    assert type(optimizer) is cls
    assert optimizer.base_optimizer is base
    assert optimizer.param_groups is base.param_groups
    for key, value in kwargs.items():
        assert optimizer.param_groups[0][key] == value


def test_wrap_optimizer_accepts_a_class():
    _, base = make_base()
    assert type(factory.wrap_optimizer(tram.ASAM, base, rho=0.3)) is tram.ASAM


def test_unknown_method_lists_the_known_ones():
    _, base = make_base()
    message = r"Unknown optimizer method 'nope'; known methods: .*asam.*sam"
    with pytest.raises(ValueError, match=message):
        factory.wrap_optimizer("nope", base)
    with pytest.raises(ValueError, match="Unknown optimizer method"):
        factory.check_method_args("nope")


def test_unexpected_argument_names_it_and_the_method():
    _, base = make_base()
    message = r"'sam' \(SAM\) got unexpected argument 'eta'.*accepts: rho"
    with pytest.raises(TypeError, match=message):
        factory.wrap_optimizer("sam", base, rho=0.1, eta=0.1)
    with pytest.raises(TypeError, match=r"unexpected arguments 'a', 'b'"):
        factory.check_method_args("asam", {"a": 1, "b": 2})


def test_reserved_arguments_are_refused():
    with pytest.raises(TypeError, match="'model' is supplied by the factory"):
        factory.check_method_args("sam", {"model": nn.Linear(1, 1)})
    with pytest.raises(TypeError, match="'base_optimizer' is supplied by the factory"):
        factory.check_method_args("sam", {"base_optimizer": None})


def test_values_are_checked_when_asked():
    factory.check_method_args("sam", {"rho": -1.0})  # names only
    with pytest.raises(ValueError, match=r"'sam' \(SAM\): Invalid rho"):
        factory.check_method_args("sam", {"rho": -1.0}, validate_values=True)


def test_model_is_handed_to_methods_that_take_it():
    model, base = make_base()
    optimizer = factory.wrap_optimizer("sam", base, model=model)
    assert optimizer.model is model


def test_a_method_that_requires_the_model():
    factory.register("needs_model", NeedsModel)
    model, base = make_base()
    with pytest.raises(ValueError, match="needs the model"):
        factory.wrap_optimizer("needs_model", base, rho=0.1)
    optimizer = factory.wrap_optimizer("needs_model", base, model=model, rho=0.1)
    assert isinstance(optimizer, NeedsModel)
    assert optimizer.model is model
    # Values of model-requiring methods are not probed (their constructors may inspect it).
    factory.check_method_args("needs_model", {"rho": -1.0}, validate_values=True)


def test_var_keyword_methods_accept_any_argument():
    factory.register("anything", TakesAnything)
    _, base = make_base()
    optimizer = factory.wrap_optimizer("anything", base, whatever=3)
    assert optimizer.extra == {"whatever": 3}


def test_lazy_registration_imports_on_first_use():
    factory.register("lazy_asam", "tram._sam:ASAM")
    assert factory._REGISTRY["lazy_asam"] == "tram._sam:ASAM"
    assert "lazy_asam" in factory.list_methods()
    _, base = make_base()
    assert type(factory.wrap_optimizer("lazy_asam", base)) is tram.ASAM
    assert factory._REGISTRY["lazy_asam"] is tram.ASAM


def test_lazy_registration_of_a_wrong_object_fails_on_use():
    factory.register("broken", "torch.optim:SGD")
    with pytest.raises(TypeError, match="is not a TwoPassOptimizer subclass"):
        factory.get_method("broken")


def test_registration_errors():
    with pytest.raises(ValueError, match="already registered"):
        factory.register("sam", tram.ASAM)
    factory.register("sam", tram.SAM)  # the same class again is fine
    factory.register("sam", tram.ASAM, overwrite=True)
    assert factory.get_method("sam") is tram.ASAM
    with pytest.raises(TypeError, match="TwoPassOptimizer subclass"):
        factory.register("sgd", torch.optim.SGD)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="module:ClassName"):
        factory.register("bad", "tram.SAM")
    with pytest.raises(ValueError, match="must not be empty"):
        factory.register(" ", tram.SAM)
    with pytest.raises(TypeError, match="must be a string"):
        factory.get_method(3)  # type: ignore[arg-type]


REGISTERED_NAMES = {"SAM": "sam", "ASAM": "asam", "FisherSAM": "fisher_sam"}


@pytest.mark.parametrize("case", SAM_FAMILY, ids=str)
def test_registered_methods_take_the_reference_step(case):
    """A method built by name takes the two-pass step of its paper's formula (written by hand
    in tests/wrappers_table.py), not merely some step: with rho = 0 it would fail."""
    model, base = make_base()
    optimizer = factory.wrap_optimizer(REGISTERED_NAMES[case.name], base, **case.kwargs)
    assert type(optimizer) is case.cls
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, generator=generator), torch.randn(4, 2, generator=generator)

    def loss_at(weights: list[torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.mse_loss(torch.nn.functional.linear(x, *weights), y)

    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    grads = torch.autograd.grad(loss_at(theta), theta)
    epsilon = case.reference([t.detach() for t in theta], list(grads))
    perturbed = [(t + e).detach().requires_grad_() for t, e in zip(theta, epsilon)]
    sharp_grads = torch.autograd.grad(loss_at(perturbed), perturbed)
    expected = [t.detach() - 0.1 * g for t, g in zip(theta, sharp_grads)]  # SGD, lr = 0.1

    def closure():
        optimizer.zero_grad()
        loss = loss_at(list(model.parameters()))
        loss.backward()
        return loss

    optimizer.step(closure)
    assert not optimizer.is_perturbed
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-7)
    plain = [t.detach() - 0.1 * g for t, g in zip(theta, grads)]
    assert max(float((e - q).abs().max()) for e, q in zip(expected, plain)) > 1e-4
