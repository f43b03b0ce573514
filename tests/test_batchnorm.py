"""BatchNorm running statistics keep the first pass's update only.

With ``model=`` a wrapper freezes every BatchNorm's running statistics between ``first_step``
and ``restore``, so after ``step(closure)`` they equal those after a single training-mode
forward at θ, exactly, for any ``momentum`` (``None`` is the cumulative average).
"""

from __future__ import annotations

import contextlib
import copy
import subprocess
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.module import _global_forward_pre_hooks as global_forward_pre_hooks

import tram
from tests.helpers import counting_backend, cross_entropy_closure

WRAPPERS = [
    lambda base, **kw: tram.SAM(base, rho=0.05, **kw),
    lambda base, **kw: tram.ASAM(base, rho=0.5, **kw),
    lambda base, **kw: tram.FisherSAM(base, rho=0.1, **kw),
]
WRAPPER_IDS = ["SAM", "ASAM", "FisherSAM"]


def make_cnn(momentum: float | None = 0.1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4, momentum=momentum),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 6),
        nn.BatchNorm1d(6, momentum=momentum),
        nn.Linear(6, 3),
    )


def data(seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 6, 6, generator=generator) * 2 + 0.5
    return x, torch.randint(0, 3, (8,), generator=generator)


def batchnorms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def buffers(model: nn.Module) -> dict[str, Tensor]:
    return {name: b.clone() for name, b in model.named_buffers()}


def assert_same_buffers(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("make", WRAPPERS, ids=WRAPPER_IDS)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum=0.1", "momentum=None"])
def test_with_model_the_statistics_are_those_of_the_first_pass(make, momentum) -> None:
    model = make_cnn(momentum)
    reference = copy.deepcopy(model)
    optimizer = make(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    x, y = data()
    for step in range(2):
        # One training-mode forward at θ, the weights the wrapper's first pass sees.
        reference.load_state_dict(model.state_dict())
        with torch.no_grad():
            reference(x)
        expected = buffers(reference)
        optimizer.step(cross_entropy_closure(optimizer, model, x, y))
        assert_same_buffers(buffers(model), expected)
        assert int(batchnorms(model)[0].num_batches_tracked) == step + 1
        assert all(m.track_running_stats for m in batchnorms(model))
        assert not optimizer.is_perturbed


@pytest.mark.parametrize("make", WRAPPERS, ids=WRAPPER_IDS)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum=0.1", "momentum=None"])
def test_without_model_a_second_update_is_refused(make, momentum) -> None:
    """Without model= the wrapper cannot freeze the statistics, and the second pass would
    update them at θ+ε: the BatchNorm's forward there raises, naming the fix, with the weights
    back at θ and the statistics those of the first pass."""
    model = make_cnn(momentum)
    optimizer = make(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = data()
    weights = [p.detach().clone() for p in model.parameters()]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference(x)
    hooks = len(global_forward_pre_hooks)
    with pytest.raises(RuntimeError, match=r"BatchNorm2d in training mode ran at the perturbed"):
        optimizer.step(cross_entropy_closure(optimizer, model, x, y))
    assert len(global_forward_pre_hooks) == hooks  # the guard is removed with the restore
    assert not optimizer.is_perturbed
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert_same_buffers(buffers(model), buffers(reference))
    # Disarmed with the restore: a training-mode forward goes through again.
    with torch.no_grad():
        model(x)


def test_without_model_what_updates_nothing_passes() -> None:
    """Eval mode, momentum=0 (the statistics stay put) and frozen_running_stats in the
    explicit form update nothing at θ+ε; another model's BatchNorm is not this step's."""
    x, y = data()
    evaluated = make_cnn().eval()
    still = make_cnn(momentum=0.0)
    frozen = make_cnn()
    other = make_cnn(seed=3)
    for model in (evaluated, still, frozen):
        optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
        closure = cross_entropy_closure(optimizer, model, x, y)
        closure()
        assert optimizer.first_step()
        with tram.frozen_running_stats(frozen) if model is frozen else contextlib.nullcontext():
            closure()
        with torch.no_grad():
            other(x)
        optimizer.second_step()


def test_a_wrapper_dropped_while_perturbed_leaves_nothing_armed() -> None:
    import gc

    model = make_cnn()
    x, y = data()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    cross_entropy_closure(optimizer, model, x, y)()
    assert optimizer.first_step()
    del optimizer
    gc.collect()
    with torch.no_grad():
        model(x)  # no wrapper is perturbed any more: nothing to refuse


def test_explicit_form_freezes_between_first_step_and_second_step() -> None:
    model = make_cnn()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    x, y = data()
    closure = cross_entropy_closure(optimizer, model, x, y)
    closure()
    after_first = buffers(model)
    assert optimizer.first_step()
    assert not any(m.track_running_stats for m in batchnorms(model))
    closure()
    assert_same_buffers(buffers(model), after_first)
    optimizer.second_step()
    assert all(m.track_running_stats for m in batchnorms(model))
    # The next step's first pass updates them again.
    closure()
    assert int(batchnorms(model)[0].num_batches_tracked) == 2


def test_statistics_unfrozen_when_the_second_pass_raises() -> None:
    model = make_cnn()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    x, y = data()
    calls = []

    def closure() -> Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("second pass failed")
        return cross_entropy_closure(optimizer, model, x, y)()

    with pytest.raises(RuntimeError, match="second pass failed"):
        optimizer.step(closure)
    assert all(m.track_running_stats for m in batchnorms(model))
    assert not optimizer.is_perturbed


def test_modules_without_running_statistics_are_left_alone() -> None:
    model = make_cnn()
    untracked = nn.BatchNorm1d(6, track_running_stats=False)
    model[6] = untracked
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    x, y = data()
    optimizer.step(cross_entropy_closure(optimizer, model, x, y))
    assert untracked.track_running_stats is False
    assert untracked.running_mean is None
    assert model[1].track_running_stats is True


# ---------------------------------------------------------------------------------- context
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum=0.1", "momentum=None"])
def test_frozen_running_stats_is_exact(momentum) -> None:
    model = make_cnn(momentum)
    x, _ = data()
    with torch.no_grad():
        model(x)  # non-trivial statistics to start from
    twin = copy.deepcopy(model)
    before = buffers(model)
    with torch.no_grad(), tram.frozen_running_stats(model) as frozen:
        assert frozen == batchnorms(model)
        inside = model(x * 3 - 1)
    assert_same_buffers(buffers(model), before)
    assert all(m.track_running_stats for m in batchnorms(model))
    # The output inside is the ordinary training-mode output (batch statistics)...
    with torch.no_grad():
        outside = twin(x * 3 - 1)
    assert torch.equal(inside, outside)
    # ...and only the twin's statistics moved.
    assert not torch.equal(buffers(twin)["1.running_mean"], before["1.running_mean"])


def test_frozen_running_stats_restores_when_the_block_raises() -> None:
    model = make_cnn()
    model[6].track_running_stats = False
    model[6].running_mean = model[6].running_var = model[6].num_batches_tracked = None
    seen = []

    def fail_inside() -> None:
        with tram.frozen_running_stats(model):
            seen.append(model[1].track_running_stats)
            raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        fail_inside()
    assert seen == [False]
    assert model[1].track_running_stats is True
    assert model[6].track_running_stats is False  # it was not frozen by us: not turned on


def test_eval_mode_forward_inside_is_unaffected() -> None:
    model = make_cnn()
    x, _ = data()
    with torch.no_grad():
        model(x)
        model(x + 1)
    model.eval()
    before = buffers(model)
    with torch.no_grad():
        outside = model(x)
        with tram.frozen_running_stats(model):
            inside = model(x)
    # Eval mode normalises with the running statistics in both cases, not the batch's.
    assert torch.equal(inside, outside)
    assert_same_buffers(buffers(model), before)
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(x), outside)


def make_mlp_with_untrained_batchnorm(kind: str, seed: int = 0) -> nn.Module:
    """A BatchNorm with no trainable weights of its own (``affine=False``, or affine weights
    frozen) between two trained layers: its input at θ+ε comes from perturbed weights."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(5, 7), nn.BatchNorm1d(7, affine=kind == "frozen"), nn.Tanh(), nn.Linear(7, 3)
    )
    if kind == "frozen":
        model[1].requires_grad_(False)
    return model


@pytest.mark.parametrize("kind", ["affine=False", "frozen"])
def test_without_model_a_batchnorm_without_trained_weights_is_refused(kind: str) -> None:
    """It cannot be recognised by its weights, but its input depends on the perturbed ones: its
    statistics would be updated a second time at θ+ε, silently. In the explicit form (where
    another model's BatchNorm may run between the passes) the autograd graph tells them apart;
    ``step(closure)`` refuses it as every BatchNorm of its second call."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    model = make_mlp_with_untrained_batchnorm(kind)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = tram.SAM(torch.optim.SGD(trained, lr=0.1), rho=0.3)
    closure = cross_entropy_closure(optimizer, model, x, y)
    closure()
    assert optimizer.first_step()
    with pytest.raises(RuntimeError, match=r"BatchNorm1d in training mode ran at the perturbed"):
        closure()
    optimizer.restore()
    with pytest.raises(RuntimeError, match=r"BatchNorm1d in training mode ran at the perturbed"):
        optimizer.step(closure)
    assert not optimizer.is_perturbed
    # Another model's such BatchNorm, on inputs that do not depend on the perturbed weights,
    # is not this step's: it passes while the wrapper is perturbed.
    other = make_mlp_with_untrained_batchnorm(kind, seed=3)
    cross_entropy_closure(optimizer, model, x, y)()
    assert optimizer.first_step()
    other(x).sum().backward()
    optimizer.restore()


def frozen_backbone_and_input_norm() -> nn.Module:
    """A BatchNorm on the raw inputs, then a frozen backbone with its own BatchNorm (train mode,
    ``requires_grad=False``), then the trained head: no BatchNorm's input depends on the trained
    weights, so none can be told from another model's by its autograd graph."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.BatchNorm1d(5, affine=False, momentum=0.3),
        nn.Linear(5, 7),
        nn.BatchNorm1d(7, momentum=0.3),
        nn.Tanh(),
        nn.Linear(7, 3),
    )
    model[1:3].requires_grad_(False)
    return model


@pytest.mark.parametrize("frozen", ["input_norm", "backbone"])
def test_step_closure_refuses_any_batchnorm_its_second_call_updates(frozen: str) -> None:
    """``step(closure)`` runs the closure twice: whatever feeds a BatchNorm there (the raw
    inputs, a frozen backbone), its statistics would be updated twice in the step, silently,
    without ``model=``. With ``model=`` they keep the first call's update."""
    generator = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 5, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    model = frozen_backbone_and_input_norm()
    if frozen == "backbone":
        model[0].eval()  # only the backbone's BatchNorm updates
    head = list(model[4].parameters())
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference(x)
    optimizer = tram.SAM(torch.optim.SGD(head, lr=0.1), rho=0.3)
    weights = [p.detach().clone() for p in head]
    with pytest.raises(RuntimeError, match=r"BatchNorm1d in training mode ran at the perturbed"):
        optimizer.step(cross_entropy_closure(optimizer, model, x, y))
    assert not optimizer.is_perturbed
    assert all(torch.equal(p, w) for p, w in zip(head, weights, strict=True))
    assert_same_buffers(buffers(model), buffers(reference))  # one update, the first call's
    optimizer = tram.SAM(torch.optim.SGD(head, lr=0.1), rho=0.3, model=model)
    optimizer.step(cross_entropy_closure(optimizer, model, x, y))
    with torch.no_grad():
        reference(x)
    assert_same_buffers(buffers(model), buffers(reference))


@pytest.mark.parametrize("form", ["eager", "compiled function", "compiled in place"])
def test_step_closure_refuses_a_batchnorm_outside_a_model_that_holds_every_perturbed_weight(
    form: str,
) -> None:
    """``model=`` the head, which holds every trained weight, and a frozen backbone left in
    training mode: its BatchNorm runs in both calls of the closure and would update its
    statistics twice in the step, silently (no guard is armed for a ``model=`` that holds every
    perturbed weight). The wrapper records the statistics of the BatchNorms outside ``model=``
    before the closure's second call, eager or compiled: updated there, they are put back and
    the base step is refused, with the weights at θ. The explicit form takes the step."""
    if form != "eager":
        torch._dynamo.reset()
    generator = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 5, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    model = frozen_backbone_and_input_norm()
    model[0].eval()  # only the frozen backbone's BatchNorm updates
    head = model[4]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference(x)
    optimizer = tram.SAM(torch.optim.SGD(head.parameters(), lr=0.1), rho=0.3, model=head)
    backend, graphs = counting_backend(aot=True)
    forward = model
    if form == "compiled function":
        forward = torch.compile(lambda x: model(x), backend=backend)
    elif form == "compiled in place":
        forward = Module(model)
        forward.compile(backend=backend)
    weights = [p.detach().clone() for p in head.parameters()]
    with pytest.raises(
        RuntimeError,
        match=r"BatchNorm1d in training mode ran in the second pass \(step\(closure\)'s second "
        r"call of its closure, or second_pass\(\)\) \(its statistics are put back .*not inside "
        r"the model= given to SAM",
    ):
        optimizer.step(cross_entropy_closure(optimizer, forward, x, y))
    assert not optimizer.is_perturbed
    assert optimizer.steps == 0
    assert all(torch.equal(p, w) for p, w in zip(head.parameters(), weights, strict=True))
    assert_same_buffers(buffers(model), buffers(reference))  # one update, the first call's
    # The explicit form cannot tell the backbone from a teacher run between the passes.
    closure = cross_entropy_closure(optimizer, forward, x, y)
    closure()
    assert optimizer.first_step()
    closure()
    optimizer.second_step()
    assert optimizer.steps == 1
    # With the whole model the step is exact.
    optimizer = tram.SAM(torch.optim.SGD(head.parameters(), lr=0.1), rho=0.3, model=model)
    optimizer.step(cross_entropy_closure(optimizer, forward, x, y))
    with torch.no_grad():
        reference(x)
        reference(x)  # the explicit step's two passes, then this step's first
        reference(x)
    assert_same_buffers(buffers(model), buffers(reference))
    assert bool(graphs) == (form != "eager")


@pytest.mark.parametrize("model_given", [False, True], ids=["without model=", "model= the head"])
def test_the_explicit_form_inside_second_pass_judges_as_step_closure(model_given: bool) -> None:
    """``second_pass()`` declares the explicit form's second pass: a BatchNorm that no perturbed
    weight feeds (on the raw inputs, in a frozen backbone left in training mode), which passes
    there as another model's, is refused as in ``step(closure)``'s second call; without
    ``model=`` by the guard's hook before it runs, with a ``model=`` that holds every perturbed
    weight by the record, its statistics put back at ``second_step()``. Weights at θ, no step."""
    generator = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 5, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    model = frozen_backbone_and_input_norm()
    head = model[4]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference(x)
    optimizer = tram.SAM(
        torch.optim.SGD(head.parameters(), lr=0.1), rho=0.3, model=head if model_given else None
    )
    weights = [p.detach().clone() for p in head.parameters()]
    closure = cross_entropy_closure(optimizer, model, x, y)
    at_theta = r"second_pass\(\) entered while the weights are at θ"
    with pytest.raises(RuntimeError, match=at_theta), optimizer.second_pass():
        pass

    def second_pass_and_step() -> None:
        with optimizer.second_pass():
            closure()
        optimizer.second_step()

    closure()
    assert optimizer.first_step()
    with pytest.raises(RuntimeError, match=r"BatchNorm1d in training mode .*model="):
        second_pass_and_step()
    assert not optimizer.is_perturbed  # restored by second_pass() or by second_step()
    with pytest.raises(RuntimeError, match=r"second_step\(\) called without first_step\(\)"):
        optimizer.second_step()  # nothing of the refused step is left to finish
    assert optimizer.steps == 0
    assert all(torch.equal(p, w) for p, w in zip(head.parameters(), weights, strict=True))
    assert_same_buffers(buffers(model), buffers(reference))  # one update, the first pass's


def test_a_batchnorm_outside_the_model_given_is_refused() -> None:
    """``model=`` names the module whose BatchNorms are frozen; one outside it (here in a head
    the same optimizer trains) would be updated a second time at θ+ε, silently."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh())
    head = nn.Sequential(nn.Linear(7, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    model = nn.Sequential(body, head)
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.3, model=body)
    with pytest.raises(RuntimeError, match=r"BatchNorm1d .*not inside the model= given to SAM"):
        optimizer.step(cross_entropy_closure(optimizer, model, x, y))
    assert not optimizer.is_perturbed
    assert all(m.track_running_stats for m in batchnorms(model))  # body's unfrozen again
    # The explicit form without second_pass(): only the guard's hook sees the head's BatchNorm
    # (second_pass() would also catch it afterwards, by its statistics), and refuses it before
    # it runs.
    closure = cross_entropy_closure(optimizer, model, x, y)
    closure()
    after_first = buffers(head)
    weights = [p.detach().clone() for p in model.parameters()]
    assert optimizer.first_step()
    with pytest.raises(RuntimeError, match=r"BatchNorm1d .*not inside the model= given to SAM"):
        closure()
    assert_same_buffers(buffers(head), after_first)
    # The wrapper does not see this pass end: as after any error the caller's forward raises,
    # the weights stay at θ+ε until the caller's restore() ...
    assert optimizer.is_perturbed
    optimizer.restore()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    # ... while a base step without a second pass that went through is refused, with θ back.
    closure()
    assert optimizer.first_step()
    with pytest.raises(RuntimeError, match=r"BatchNorm1d .*not inside the model= given to SAM"):
        closure()
    with pytest.raises(RuntimeError, match=r"found no gradient from a second pass"):
        optimizer.second_step()
    assert not optimizer.is_perturbed
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    # With the whole model, the step goes through.
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.3, model=model)
    optimizer.step(cross_entropy_closure(optimizer, model, x, y))


# --------------------------------------------------------------------------- torch.compile
class Module(nn.Module):
    """A module of its own around ``inner``: dynamo compiles its forward in place (it skips
    torch.nn's own, so ``nn.Sequential.compile()`` would compile nothing)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)


def compiled_forward(model: nn.Module, backend: Callable) -> nn.Module:
    model.forward = torch.compile(model.forward, backend=backend)
    return model


def child_compiled_in_place(model: nn.Module, backend: Callable) -> nn.Module:
    model.compile(backend=backend)
    return Module(model)  # its parent runs eagerly: the compiled child runs no hook of its own


def compiled_in_place(model: nn.Module, backend: Callable) -> nn.Module:
    model.compile(backend=backend)
    return model  # its call runs the graph and no module hook at all


COMPILED = {
    "torch.compile(model)": lambda model, backend: torch.compile(model, backend=backend),
    "compiled forward": compiled_forward,
    "child compiled in place": child_compiled_in_place,
    "compiled in place": compiled_in_place,
}
IN_A_GRAPH = r"BatchNorm2d in training mode inside a torch.compile'd module ran"
IN_PLACE = r"BatchNorm2d in training mode inside a module compiled in place \(module.compile"
REFUSAL = {
    "torch.compile(model)": IN_A_GRAPH,
    "compiled forward": IN_A_GRAPH,
    # Found before the ascent (the first_step refuses): no hook sees a model compiled in place.
    "child compiled in place": IN_PLACE,
    "compiled in place": IN_PLACE,
}


@pytest.mark.parametrize("form", list(COMPILED))
def test_without_model_a_batchnorm_inside_a_compiled_graph_is_refused(form: str) -> None:
    """A compiled graph runs its BatchNorms without the guard's hook (dynamo ignores hooks added
    after compilation): they are judged when the compiled module is called at θ+ε, or, inside a
    module compiled in place, whose call runs no hook at all, before the ascent; and refused as
    in eager mode, statistics and weights left as the first pass left them."""
    torch._dynamo.reset()
    backend, graphs = counting_backend(aot=True)
    model = Module(make_cnn(momentum=0.3))
    reference = copy.deepcopy(model)  # before compiling: a compiled forward is bound to model
    called = COMPILED[form](model, backend)
    x, y = data()
    with torch.no_grad():
        called(x)  # compiled here, before any guard exists
        reference(x)
        reference(x)
    assert graphs
    weights = [p.detach().clone() for p in model.parameters()]
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    with pytest.raises(RuntimeError, match=REFUSAL[form]):
        optimizer.step(cross_entropy_closure(optimizer, called, x, y))
    assert not optimizer.is_perturbed
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert_same_buffers(buffers(model), buffers(reference))  # the warm-up's and the first pass's
    # With model= the statistics are frozen at θ+ε and the step goes through, compiled.
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, model=model)
    optimizer.step(cross_entropy_closure(optimizer, called, x, y))
    with torch.no_grad():
        reference(x)
    assert_same_buffers(buffers(model), buffers(reference))


def test_a_compiled_batchnorm_without_trained_weights_is_judged_by_its_module() -> None:
    """Inside a graph its input cannot be traced back to the perturbed weights: an
    ``affine=False`` BatchNorm is the model's when the compiled module holds perturbed weights,
    and another model's (a teacher's, run between the passes) when it holds none."""
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    backend, graphs = counting_backend(aot=True)
    model = torch.compile(make_mlp_with_untrained_batchnorm("affine=False"), backend=backend)
    teacher = torch.compile(
        make_mlp_with_untrained_batchnorm("affine=False", seed=3), backend=backend
    )
    with torch.no_grad():
        model(x)
        teacher(x)
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.3)
    closure = cross_entropy_closure(optimizer, model, x, y)
    closure()
    assert optimizer.first_step()
    with torch.no_grad():
        teacher(x)  # not this step's
    with pytest.raises(RuntimeError, match=r"BatchNorm1d in training mode inside a torch.compile"):
        closure()
    optimizer.restore()
    assert graphs


class WithBatchNorm(nn.Module):
    """A model class of its own (dynamo compiles its forward in place, not torch.nn's)."""

    def __init__(self, *, affine: bool | None, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        norm = nn.Identity() if affine is None else nn.BatchNorm1d(7, affine=affine, momentum=0.3)
        self.inner = nn.Sequential(nn.Linear(5, 7), norm, nn.Tanh(), nn.Linear(7, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)


def mlp_data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(5)
    return torch.randn(8, 5, generator=generator), torch.randint(0, 3, (8,), generator=generator)


@pytest.mark.parametrize("make", WRAPPERS, ids=WRAPPER_IDS)
def test_a_model_compiled_in_place_is_refused_before_the_ascent(make) -> None:
    """``model.compile()``: the model's call runs its graph and no module hook, so without
    ``model=`` the wrapper finds its BatchNorms (through the garbage collector, once) and
    ``first_step`` refuses before it moves a weight: one with perturbed weights of its own, and
    one without trainable weights (``affine=False``) in a compiled module that holds perturbed
    weights. In eval mode or frozen it updates nothing and the step goes through; the same
    wrapper refuses again when it is back in training mode."""
    torch._dynamo.reset()
    backend, graphs = counting_backend(aot=True)
    x, y = mlp_data()
    for affine in (True, False):
        model = WithBatchNorm(affine=affine, seed=2)
        model.compile(backend=backend)
        optimizer = make(torch.optim.SGD(model.parameters(), lr=0.1))
        closure = cross_entropy_closure(optimizer, model, x, y)
        closure()
        weights = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.clone() for p in model.parameters()]
        statistics = buffers(model)
        with pytest.raises(RuntimeError, match=r"BatchNorm1d in training mode inside a module"):
            optimizer.first_step()
        assert not optimizer.is_perturbed
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
        assert_same_buffers(buffers(model), statistics)
        model.eval()
        optimizer.step(closure)
        model.train()
        with pytest.raises(RuntimeError, match=r"in place \(module.compile\(\), which runs no"):
            optimizer.step(closure)
    assert graphs


def test_beside_a_model_compiled_in_place_other_models_pass() -> None:
    """A teacher compiled in place holds no perturbed weight: another model's, it passes, and
    its statistics move once per call of its own. A ``model=`` that holds only some of the
    perturbed weights has its BatchNorms frozen (compiled in place or not), so only a BatchNorm
    outside it is refused, with the fix that names ``model=``."""
    torch._dynamo.reset()
    backend, graphs = counting_backend(aot=True)
    x, y = mlp_data()
    student = WithBatchNorm(affine=None, seed=2)
    teacher = WithBatchNorm(affine=False, seed=3)
    for module in (student, teacher):
        module.compile(backend=backend)
    twin = copy.deepcopy(teacher)  # eager, called as often as the teacher
    optimizer = tram.SAM(torch.optim.SGD(student.parameters(), lr=0.1), rho=0.3)
    for _ in range(2):
        closure = cross_entropy_closure(optimizer, student, x, y)
        closure()
        with torch.no_grad():
            teacher(x)  # between the passes, in training mode
            twin(x)
        assert optimizer.first_step()
        closure()
        optimizer.second_step()
    assert_same_buffers(buffers(teacher), buffers(twin))
    # With model= holding some of the perturbed weights: a BatchNorm outside it is refused,
    # with the fix that names model=; one inside it (compiled in place too) is frozen and passes.
    body = WithBatchNorm(affine=True, seed=4)
    body.compile(backend=backend)
    reference = copy.deepcopy(body)
    pair = nn.ModuleDict({"body": body, "head": nn.Linear(3, 3)})

    def step(model: nn.Module) -> None:
        optimizer = tram.SAM(torch.optim.SGD(pair.parameters(), lr=0.1), rho=0.3, model=model)
        optimizer.zero_grad()
        nn.functional.cross_entropy(pair["head"](body(x)), y).backward()
        assert optimizer.first_step()
        nn.functional.cross_entropy(pair["head"](body(x)), y).backward()
        optimizer.second_step()

    for model in (pair["head"], body, pair):
        with torch.no_grad():
            reference.load_state_dict(body.state_dict())
            reference(x)  # the first pass, at θ
        if model is pair["head"]:
            with pytest.raises(RuntimeError, match=r"in place.*not inside the model= given"):
                step(model)
        else:
            step(model)
        assert_same_buffers(buffers(body), buffers(reference))
    assert graphs


def batchnorm_mlp(*, affine: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 7), nn.BatchNorm1d(7, affine=affine, momentum=0.3), nn.Tanh(), nn.Linear(7, 3)
    )


@pytest.mark.parametrize("form", ["step(closure)", "explicit"])
def test_a_compiled_function_that_runs_the_model_is_refused_with_the_statistics_put_back(
    form: str,
) -> None:
    """``torch.compile(loss_fn)`` calling an eager model: dynamo inlines the model, and its
    graph runs no module hook. Without ``model=`` the wrapper records the running statistics of
    the BatchNorms that existed at the last compilation when it ascends, finds them updated at
    θ+ε, puts them back as the first pass left them and refuses the base step: weights at θ,
    no step taken. With ``model=`` the step is exact."""
    torch._dynamo.reset()
    backend, graphs = counting_backend(aot=True)
    x, y = mlp_data()
    model = batchnorm_mlp(affine=True, seed=2)
    reference = copy.deepcopy(model)
    loss_fn = torch.compile(lambda: nn.functional.cross_entropy(model(x), y), backend=backend)
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.3)
    weights = [p.detach().clone() for p in model.parameters()]

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    def explicit_step() -> None:
        closure()
        assert optimizer.first_step()
        closure()
        optimizer.second_step()

    take_step = explicit_step if form == "explicit" else lambda: optimizer.step(closure)
    with pytest.raises(RuntimeError, match=r"BatchNorm1d in training mode inside a compiled graph"):
        take_step()
    with torch.no_grad():
        reference(x)  # the first pass, alone
    assert_same_buffers(buffers(model), buffers(reference))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert optimizer.steps == 0
    assert not optimizer.is_perturbed
    model.eval()  # the same wrapper takes the next step: nothing of the refused one is left
    optimizer.step(closure)
    assert optimizer.steps == 1
    model.train()
    # With model= the statistics are frozen at θ+ε and the step goes through, compiled.
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.3, model=model)
    optimizer.step(closure)
    assert optimizer.steps == 1
    assert graphs


def test_in_a_compiled_function_a_batchnorm_without_trained_weights_is_judged_by_the_form() -> None:
    """Inside a graph nothing tells whose input a BatchNorm without trainable weights normalised:
    in ``step(closure)``'s second call every BatchNorm is the closure's and is refused (as the
    eager guard does); in the explicit form it is left alone, as another model's (a teacher run
    between the passes): there, pass ``model=``."""
    torch._dynamo.reset()
    backend, graphs = counting_backend(aot=True)
    x, y = mlp_data()
    model = batchnorm_mlp(affine=False, seed=2)
    loss_fn = torch.compile(lambda: nn.functional.cross_entropy(model(x), y), backend=backend)
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.3)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match=r"BatchNorm1d in training mode inside a compiled graph"):
        optimizer.step(closure)
    closure()
    assert optimizer.first_step()
    closure()
    optimizer.second_step()
    assert optimizer.steps == 1
    assert graphs


def test_a_compiled_teachers_batchnorm_between_the_passes_is_left_alone() -> None:
    """In the explicit form a compiled teacher with trained BatchNorm weights of its own, not
    perturbed, is another model's: its statistics move once per call of its own."""
    torch._dynamo.reset()
    backend, graphs = counting_backend(aot=True)
    x, y = mlp_data()
    student = WithBatchNorm(affine=None, seed=2)
    teacher = batchnorm_mlp(affine=True, seed=3)
    twin = copy.deepcopy(teacher)
    run_teacher = torch.compile(lambda: teacher(x), backend=backend)
    with torch.no_grad():
        run_teacher()
        twin(x)
    optimizer = tram.SAM(torch.optim.SGD(student.parameters(), lr=0.1), rho=0.3)
    closure = cross_entropy_closure(optimizer, student, x, y)
    for _ in range(2):
        closure()
        assert optimizer.first_step()
        with torch.no_grad():
            run_teacher()
            twin(x)
        closure()
        optimizer.second_step()
    assert_same_buffers(buffers(teacher), buffers(twin))
    assert optimizer.steps == 2
    assert graphs


def test_the_guard_passes_over_a_child_registered_as_none() -> None:
    """``register_module(name, None)`` (Hugging Face's ``pooler = None``): the guard reads the
    registered children itself and must skip the empty slot."""
    model = Module(make_cnn())
    model.register_module("pooler", None)
    x, y = data()
    model.eval()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    optimizer.step(cross_entropy_closure(optimizer, model, x, y))
    assert optimizer.steps == 1


def compile_something() -> None:
    """Have dynamo compile a graph (a function's, not a module's)."""
    backend, graphs = counting_backend()
    torch.compile(lambda t: t + 1, backend=backend)(torch.ones(2))
    assert graphs


def test_a_model_compiled_in_place_after_a_search_is_found_at_the_next_step() -> None:
    """Its first call compiles it: the search walks again at the next ascent."""
    torch._dynamo.reset()
    backend, graphs = counting_backend(aot=True)
    x, y = mlp_data()
    model = WithBatchNorm(affine=True, seed=2)
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.3)
    compile_something()
    model.eval()
    optimizer.step(cross_entropy_closure(optimizer, model, x, y))  # searched: nothing in place
    model.train()
    model.compile(backend=backend)
    with pytest.raises(RuntimeError, match=r"BatchNorm1d in training mode inside a module comp"):
        optimizer.step(cross_entropy_closure(optimizer, model, x, y))
    assert graphs


def test_the_batchnorms_compiled_in_place_are_picked_again_for_other_perturbed_weights() -> None:
    """A step whose BatchNorm weights have no gradient does not perturb them (the BatchNorm
    is then another model's); the next step, which does, is refused."""
    torch._dynamo.reset()
    backend, graphs = counting_backend(aot=True)
    x, y = mlp_data()
    model = WithBatchNorm(affine=True, seed=2)
    model.compile(backend=backend)
    for frozen in (False, True):  # both graphs compiled first: no walk is due to a compilation
        with tram.frozen_running_stats(model) if frozen else contextlib.nullcontext():
            nn.functional.cross_entropy(model(x), y).backward()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.3)
    closure = cross_entropy_closure(optimizer, model, x, y)
    for _ in range(2):  # the first one's guard compiles frames (no graph): searched again
        closure()
        model.inner[1].weight.grad = model.inner[1].bias.grad = None
        assert optimizer.first_step()
        with tram.frozen_running_stats(model):
            closure()
        optimizer.second_step()
    with pytest.raises(RuntimeError, match=r"BatchNorm1d in training mode inside a module comp"):
        optimizer.step(closure)
    assert graphs


def test_a_child_compiled_in_place_is_judged_by_its_parents_hook(monkeypatch) -> None:
    """Defence in depth: a child compiled in place that the search did not find (here made
    blind) is judged when its eagerly called parent runs at θ+ε."""
    torch._dynamo.reset()
    backend, graphs = counting_backend(aot=True)
    monkeypatch.setattr(tram._wrapper, "batchnorms_compiled_in_place", lambda *a, **k: [])
    x, y = mlp_data()
    child = WithBatchNorm(affine=True, seed=2)
    child.compile(backend=backend)
    model = Module(child)
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.3)
    with pytest.raises(RuntimeError, match=r"BatchNorm1d in training mode inside a torch.compile"):
        optimizer.step(cross_entropy_closure(optimizer, model, x, y))
    assert graphs


@pytest.fixture
def fresh_search(monkeypatch) -> Iterator[tram.batchnorm._CompiledInPlace]:
    """A search that has not walked yet, in place of the process's for one test."""
    search = tram.batchnorm._CompiledInPlace()
    monkeypatch.setattr(tram.batchnorm, "_compiled_in_place", search)
    yield search
    if search._construction is not None:
        search._construction.remove()


def test_modules_compiled_in_place_are_searched_again_only_after_a_compilation(
    monkeypatch, fresh_search
) -> None:
    """The search walks every object the garbage collector tracks: not while dynamo has
    compiled nothing, and then again only after it compiled something (or after
    ``torch._dynamo.reset()``, which drops the callback that tells), whatever wrapper asks. The
    first second pass of a wrapper whose ``model=`` holds every perturbed weight walks once in
    the process, for the BatchNorms outside the model, whatever was compiled; another such
    wrapper does not. This is what fails when torch renames the private names the search relies
    on (dynamo's compile-end callbacks, its frame counter): the refusals do not depend on them,
    the number of walks does."""
    torch._dynamo.reset()  # nothing compiled since
    walks = []
    get_objects = tram.batchnorm.gc.get_objects

    def counting_get_objects(*args: Any) -> list[Any]:
        walks.append(1)
        return get_objects(*args)

    monkeypatch.setattr(tram.batchnorm.gc, "get_objects", counting_get_objects)
    model = make_cnn()
    x, y = data()

    def sam_steps(steps: int, optimizer: tram.SAM | None = None, **options: Any) -> None:
        if optimizer is None:
            optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, **options)
        for _ in range(steps):
            optimizer.step(cross_entropy_closure(optimizer, model, x, y))

    with_model = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, model=model)
    sam_steps(3, with_model)
    assert walks == [1]  # for the BatchNorms outside model=, at the first step only
    torch._dynamo.reset()  # still nothing compiled
    sam_steps(2, with_model)
    model.eval()
    sam_steps(3)
    assert walks == [1]  # nothing compiled
    compile_something()
    sam_steps(3)
    sam_steps(2)  # another wrapper: the same answer
    sam_steps(2, model=model)
    assert walks == [1, 1]
    # A dead weak proxy among the collector's objects answers isinstance() with an error.
    proxy = weakref.proxy(nn.Linear(2, 2))
    compile_something()
    sam_steps(2)
    assert walks == [1, 1, 1]
    del proxy
    torch._dynamo.reset()
    compile_something()
    sam_steps(2)
    assert walks == [1, 1, 1, 1]


def test_a_batchnorm_built_after_the_walk_is_heard_of(fresh_search) -> None:
    """The BatchNorms outside a ``model=`` that holds every perturbed weight are walked for
    once per process; one built after the walk is heard of when its ``running_mean`` is
    registered, without a walk: its second update is refused all the same."""
    search = fresh_search
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(8, 5, generator=generator)
    y = torch.randint(0, 3, (8,), generator=generator)
    first = frozen_backbone_and_input_norm()
    first.eval()
    optimizer = tram.SAM(torch.optim.SGD(first[4].parameters(), lr=0.1), rho=0.3, model=first[4])
    optimizer.step(cross_entropy_closure(optimizer, first, x, y))
    assert search.walks == 1
    model = frozen_backbone_and_input_norm()  # built after the walk
    model[0].eval()
    head = model[4]
    optimizer = tram.SAM(torch.optim.SGD(head.parameters(), lr=0.1), rho=0.3, model=head)
    with pytest.raises(RuntimeError, match=r"BatchNorm1d in training mode ran in the second"):
        optimizer.step(cross_entropy_closure(optimizer, model, x, y))
    assert search.walks == 1


def test_keeping_the_guard_out_of_compiled_graphs_leaves_import_tram_light() -> None:
    """``torch.compiler.disable`` as a decorator imports ``torch._dynamo`` (about a second) when
    ``tram`` is imported; its lazy form waits for the first call."""
    script = "import sys, tram\nassert 'torch._dynamo' not in sys.modules\n"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_the_guard_is_armed_and_disarmed_outside_compiled_graphs(monkeypatch) -> None:
    """In a compiled ``optimizer.step`` dynamo would trace the change to torch's global hooks,
    and it failed there ("dictionary changed size during iteration") when a dropped wrapper's
    finalizer removed its own hook during the trace: arming and disarming run eagerly, even
    inside compiled code (``torch.compiler.is_compiling()`` is False in them)."""
    torch._dynamo.reset()
    backend, _ = counting_backend()
    compiling: dict[str, bool] = {}
    register = tram.batchnorm.register_module_forward_pre_hook

    def recording_register(hook: Any) -> Any:
        compiling["arm"] = torch.compiler.is_compiling()
        return register(hook)

    monkeypatch.setattr(tram.batchnorm, "register_module_forward_pre_hook", recording_register)

    class Owner:
        def armed(self) -> bool:
            return True

    owner = Owner()
    probe = weakref.finalize(owner, lambda: compiling.update(disarm=torch.compiler.is_compiling()))

    def arm_and_disarm(x: Tensor) -> Tensor:
        guard = tram.batchnorm.refuse_running_stats_updates("SAM", owner.armed, [])
        tram.batchnorm.disarm(guard)
        tram.batchnorm.disarm(probe)
        return x + 1

    hooks = len(global_forward_pre_hooks)
    assert torch.equal(
        torch.compile(arm_and_disarm, backend=backend)(torch.ones(2)), 2 * torch.ones(2)
    )
    assert compiling == {"arm": False, "disarm": False}
    assert len(global_forward_pre_hooks) == hooks


# ------------------------------------------------------------------------------ regularizers
class EmbeddingBatchNorm(nn.Module):
    """Token embeddings, mean-pooled, through a BatchNorm: R3F noises the embeddings."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.embeddings = nn.Embedding(11, 6)
        self.norm = nn.BatchNorm1d(6, momentum=0.3)
        self.head = nn.Linear(6, 3)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.head(self.norm(self.embeddings(input_ids).mean(dim=1)))


def test_the_r3f_noised_forward_leaves_the_running_statistics_to_the_clean_forward() -> None:
    model = EmbeddingBatchNorm()
    twin = copy.deepcopy(model)
    input_ids = torch.randint(0, 11, (5, 4), generator=torch.Generator().manual_seed(2))
    regularizer = tram.R3F(sigma=0.7, weight=0.3, seed=9)
    logits = model(input_ids)
    penalty = regularizer(model, input_ids, logits)
    with torch.no_grad():
        twin(input_ids)
    assert penalty.item() > 0  # the noised forward ran, in training mode, on other inputs
    assert_same_buffers(buffers(model), buffers(twin))
    assert int(model.norm.num_batches_tracked) == 1
    assert model.norm.track_running_stats is True
