"""A ``torch.compile``'d model with every wrapper: accumulation, bf16 autocast and resume.

Each run is compared with the same run on the eager model, bit for bit, through
``tests.helpers.counting_backend(aot=True)`` (``aot_eager``: a compiled run that trains
differently is tram's doing, not a fused kernel's rounding), which also keeps the graphs
compiled: none would make a test vacuous, and a step that recompiled every time would, after
dynamo's cache limit, fall back to eager unnoticed.

The wrappers' guarantees on one compiled step are in ``tests/test_guarantees.py``; the clients'
compile options (``TrainingArguments(torch_compile=True)``, Lightning, Fabric) in their files.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tram
from tests.helpers import counting_backend, cross_entropy_closure, some_fast_rows, stateful_model
from tests.wrappers_table import WRAPPERS, WrapperCase

STEPS = 3


class Mlp(nn.Module):
    """The contract tests' model as a module of its own: ``Module.compile()`` compiles it."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inputs = nn.Linear(5, 8)
        self.outputs = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.outputs(torch.tanh(self.inputs(x)))


def compiled(model: nn.Module, case: WrapperCase, backend: Callable) -> nn.Module:
    """The module the training loop calls: ``torch.compile(model)``, or the model compiled in
    place for TRAM-Fisher, which refuses a ``torch.compile`` wrapper (its noise hook would be
    skipped by the graph: ``test_guarantees::test_tram_fisher_refuses_a_compiled_model``)."""
    if case.name == "TRAM-fisher":
        model.compile(backend=backend)
        return model
    return torch.compile(model, backend=backend)


def batch(step: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 5, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def micro_batches(step: int) -> list[tuple[Tensor, Tensor]]:
    """Two micro-batches of unequal size (6 and 10 examples), so their weights are not 1/2."""
    x, y = batch(step)
    return [(x[:6], y[:6]), (x[6:], y[6:])]


def train(
    model: nn.Module,
    called: nn.Module,
    optimizer: tram.TwoPassOptimizer,
    steps: range,
    *,
    autocast: torch.dtype | None = None,
    after_step: Callable[[], None] = lambda: None,
) -> None:
    def loss_fn(batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            return F.cross_entropy(called(x).float(), y)

    for step in steps:
        closure = tram.accumulating_closure(
            optimizer, micro_batches(step), loss_fn, weights=[6 / 16, 10 / 16]
        )
        optimizer.step(closure)
        after_step()


def make_optimizer(case: WrapperCase, model: nn.Module, called: nn.Module) -> tram.TwoPassOptimizer:
    base = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.03)
    return case.make(base, called)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), f"{name} differs by {(p - q).abs().max().item():.3g}"


@pytest.fixture(autouse=True)
def fresh_dynamo_cache() -> None:
    # Dynamo's cache is per code object, shared by every Mlp of the process.
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("case", "autocast"),
    some_fast_rows(
        (
            (f"{case}-{name}", (case, autocast))
            for name, autocast in (("float32", None), ("bf16", torch.bfloat16))
            for case in WRAPPERS
        ),
        # Every wrapper once in the fast suite.
        *("SAM-bf16", "TRAM-noise-bf16", "TRAM-fisher-bf16", "ASAM-float32"),
        *(
            "FisherSAM-float32",
            "TRAM-pretrained-float32",
            "TRAM-previous-float32",
            "TRAM-ema-float32",
        ),
    ),
)
def test_accumulation_on_a_compiled_model_is_the_eager_run(
    case: WrapperCase, autocast: torch.dtype | None
) -> None:
    eager = Mlp()
    eager_optimizer = make_optimizer(case, eager, eager)
    train(eager, eager, eager_optimizer, range(STEPS), autocast=autocast)

    backend, graphs = counting_backend(aot=True)
    model = Mlp()
    called = compiled(model, case, backend)
    optimizer = make_optimizer(case, model, called)
    graphs_after: list[int] = []
    train(
        model,
        called,
        optimizer,
        range(STEPS),
        autocast=autocast,
        after_step=lambda: graphs_after.append(len(graphs)),
    )

    assert_same_weights(model, eager)
    if case.is_tram and case.name != "TRAM-fisher":  # TRAM-Fisher measures no d
        assert optimizer.radius_history == eager_optimizer.radius_history
        assert len(optimizer.radius_history) == STEPS
        assert min(optimizer.radius_history[1:]) > 0
    assert graphs_after[0] > 0, "nothing was compiled"
    assert graphs_after[-1] == graphs_after[0], f"recompiled after the first step: {graphs_after}"


@pytest.mark.parametrize(
    ("case", "resumed_compiled"),
    some_fast_rows(
        (
            (f"{case}-{'compiled' if resumed_compiled else 'eager'}", (case, resumed_compiled))
            for case in WRAPPERS
            for resumed_compiled in (True, False)
        ),
        *("SAM-compiled", "TRAM-noise-compiled", "TRAM-previous-compiled"),
        *("TRAM-fisher-compiled", "TRAM-pretrained-eager"),
    ),
)
def test_resume_from_a_compiled_run_is_bit_exact(case: WrapperCase, resumed_compiled: bool) -> None:
    """The checkpoint of a compiled run (its model's keys start ``_orig_mod.``) resumes to the
    uninterrupted run, compiled again or not: the wrapper's state (TRAM's reference weights and
    noise generator, the step counters) does not depend on the module that was called."""
    backend, graphs = counting_backend(aot=True)
    straight = Mlp()
    straight_called = compiled(straight, case, backend)
    straight_optimizer = make_optimizer(case, straight, straight_called)
    train(straight, straight_called, straight_optimizer, range(2 * STEPS))

    first = Mlp()
    first_called = compiled(first, case, backend)
    first_optimizer = make_optimizer(case, first, first_called)
    train(first, first_called, first_optimizer, range(STEPS))
    buffer = io.BytesIO()
    torch.save(
        {"model": first_called.state_dict(), "optimizer": first_optimizer.state_dict()}, buffer
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    assert graphs

    resumed = Mlp(seed=123)  # other weights: everything must come from the checkpoint
    if resumed_compiled:
        resumed_called = compiled(resumed, case, counting_backend(aot=True)[0])
        resumed_called.load_state_dict(checkpoint["model"])
    else:
        resumed_called = resumed
        prefix = "" if case.name == "TRAM-fisher" else "_orig_mod."
        resumed.load_state_dict({k.removeprefix(prefix): v for k, v in checkpoint["model"].items()})
    resumed_optimizer = make_optimizer(case, resumed, resumed_called)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train(resumed, resumed_called, resumed_optimizer, range(STEPS, 2 * STEPS))

    assert_same_weights(resumed, straight)
    assert resumed_optimizer.steps == straight_optimizer.steps == 2 * STEPS
    if case.is_tram:
        assert resumed_optimizer.radius_history == straight_optimizer.radius_history[STEPS:]


# ------------------------------------------------------------------ a compiled optimizer step
def compiled_step_run(
    case: WrapperCase, form: str, *, compile_step: bool
) -> tuple[Mlp, tram.TwoPassOptimizer, list[Any]]:
    """Three steps of SGD with momentum wrapped in ``case``, its ``step`` called through
    ``torch.compile`` (torch's compiled-optimizer recipe) or not, in the closure or the explicit
    form. SGD: AdamW under dynamo takes another code path, which rounds otherwise."""
    torch._dynamo.reset()
    backend, graphs = counting_backend()
    model = Mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    optimizer = case.make(base, model)
    step = torch.compile(optimizer.step, backend=backend) if compile_step else optimizer.step
    for index in range(STEPS):
        closure = cross_entropy_closure(optimizer, model, *batch(index))
        if form == "closure":
            step(closure)
            continue
        with optimizer.first_pass():
            closure()
        if optimizer.first_step():
            closure()
        step()
    return model, optimizer, graphs


@pytest.mark.parametrize(
    ("case", "form"),
    some_fast_rows(
        ((f"{case}-{form}", (case, form)) for case in WRAPPERS for form in ("closure", "explicit")),
        *("SAM-explicit", "TRAM-pretrained-explicit", "TRAM-fisher-closure"),
    ),
)
def test_a_compiled_optimizer_step_is_the_eager_step(case: WrapperCase, form: str) -> None:
    """``torch.compile(optimizer.step)``: dynamo traces the wrapper's step (and, in the closure
    form, both passes of the closure it calls), breaking the graph at the wrapper's bookkeeping;
    the steps and TRAM's d are the eager ones, bit for bit."""
    eager, eager_optimizer, _ = compiled_step_run(case, form, compile_step=False)
    model, optimizer, graphs = compiled_step_run(case, form, compile_step=True)
    assert graphs
    assert_same_weights(model, eager)
    assert optimizer.steps == STEPS
    if case.is_tram and case.name != "TRAM-fisher":
        assert optimizer.radius_history == eager_optimizer.radius_history
        assert max(optimizer.radius_history) > 0


def test_a_compiled_optimizer_step_refuses_as_the_eager_one() -> None:
    """The wrapper's refusals hold inside a compiled step: a step without an ascent, and a base
    step after ``first_step()`` without the second pass's gradient; the weights stay put."""
    torch._dynamo.reset()
    backend, _ = counting_backend()
    model = Mlp()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.07)
    step = torch.compile(optimizer.step, backend=backend)
    x, y = batch(0)
    weights = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(tram.MissingAscentError, match=r"without a closure and without first_step"):
        step()
    optimizer.zero_grad()
    with optimizer.first_pass():
        F.cross_entropy(model(x), y).backward()
    assert optimizer.first_step()
    with pytest.raises(RuntimeError, match=r"found no gradient from a second pass"):
        step()
    assert not optimizer.is_perturbed
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))


class _Outer(nn.Module):
    """:func:`tests.helpers.stateful_model` under a forward of its own: dynamo compiles no
    ``torch.nn`` container's forward, so the graph would not hold the model otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.net = stateful_model()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@pytest.mark.parametrize("bind_model", [True, False], ids=["model", "no-model"])
def test_a_compiled_models_forward_written_buffers_come_from_the_first_pass_only(
    bind_model: bool,
) -> None:
    """The buffers that the compiled graph writes at θ+ε (a counter, a running mean, a spectral
    norm's vectors, an InstanceNorm's running statistics) are put back as in the eager model:
    with ``model=`` from the copy ``first_step()`` takes, without it from the copies the guard
    takes at the compiled module's call of its inner modules (whose own hooks do not run in the
    graph)."""
    torch._dynamo.reset()
    backend, graphs = counting_backend(aot=True)
    model = _Outer()
    compiled = torch.compile(model, backend=backend)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = tram.SAM(base, rho=0.05, model=model if bind_model else None)
    twin = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(5)
    for step in range(3):
        x, y = (
            torch.randn(16, 5, generator=generator),
            torch.randint(0, 3, (16,), generator=generator),
        )
        twin.load_state_dict(model.state_dict())
        with torch.no_grad():
            twin(x)
        optimizer.step(cross_entropy_closure(optimizer, compiled, x, y))
        for (name, got), want in zip(model.named_buffers(), twin.buffers(), strict=True):
            assert torch.equal(got, want), f"step {step}: {name}"
    assert graphs
    assert int(model.net[1].calls) == 3
