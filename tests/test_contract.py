"""The optimizer contract, run over every wrapper in ``WRAPPERS``: the SAM family and TRAM with
each of its trust regions."""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tram
from tests.helpers import stateful_model, zero_redundancy_adamw
from tests.wrappers_table import TRAMS, WRAPPERS, WrapperCase

BaseFactory = Callable[..., torch.optim.Optimizer]

BASES: dict[str, BaseFactory] = {
    "SGD": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "AdamW": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01),
}


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 5, generator=generator).to(dtype)
    y = torch.randint(0, 3, (16,), generator=generator)
    return x, y


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).float(), y)


def backward_outside_the_closure(model: nn.Module) -> Callable[[], torch.Tensor]:
    """An accumulation loop moved to ``step(closure)`` as it was: batch 1's first micro-batch
    backpropagated now, the closure backpropagating the last without zeroing the gradients."""
    x, y = batch(1)
    loss_of(model, x[:6], y[:6]).backward()

    def closure() -> torch.Tensor:
        loss = loss_of(model, x[6:], y[6:])
        loss.backward()
        return loss

    return closure


def closure_for(optimizer: torch.optim.Optimizer, model: nn.Module, step: int, counter=None):
    """The user's closure for ``step``'s batch."""
    x, y = batch(step, next(model.parameters()).dtype)

    def closure() -> torch.Tensor:
        if counter is not None:
            counter.append(step)
        optimizer.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    return closure


def first_pass(optimizer: tram.TwoPassOptimizer, closure: Callable[[], torch.Tensor]):
    """The explicit form's first pass, inside ``first_pass()`` (TRAM records it there)."""
    with optimizer.first_pass():
        return closure()


def reference_run(case: WrapperCase, base_factory: BaseFactory, steps: int) -> nn.Module:
    """The two-pass step by hand: the paper's algorithm, not the library's code."""
    model = make_model()
    base = base_factory(model.parameters())
    ascent = case.ascent(model)
    for step in range(steps):
        x, y = batch(step)
        base.zero_grad()
        logits = ascent.first_forward(model, x)
        F.cross_entropy(logits.float(), y).backward()
        params = [p for p in model.parameters() if p.grad is not None]
        epsilon = ascent.epsilon(
            model,
            x,
            logits.detach(),
            [p.detach().clone() for p in params],
            [p.grad.clone() for p in params],
        )
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, epsilon):
                p.add_(e)
        base.zero_grad()
        loss_of(model, x, y).backward()
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        ascent.before_base_step(model)
        base.step()
        ascent.after_base_step(model)
    return model


def library_run(
    case: WrapperCase,
    base_factory: BaseFactory,
    steps: int,
    *,
    explicit: bool = False,
    declared: bool = False,
    **kwargs,
) -> tuple[nn.Module, tram.TwoPassOptimizer]:
    """``steps`` steps with ``step(closure)``, or the explicit form (its second pass inside
    ``second_pass()`` when ``declared``)."""
    model = make_model()
    optimizer = case.make(base_factory(model.parameters()), model, **kwargs)
    for step in range(steps):
        closure = closure_for(optimizer, model, step)
        if explicit:
            first_pass(optimizer, closure)
            if optimizer.first_step():
                with optimizer.second_pass() if declared else contextlib.nullcontext():
                    closure()
            optimizer.second_step()
        else:
            optimizer.step(closure)
        assert not optimizer.is_perturbed
    return model, optimizer


def assert_same_params(a: nn.Module, b: nn.Module, *, exact: bool = False) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        if exact:
            assert torch.equal(p, q), (p - q).abs().max()
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


EVERY_WRAPPER = pytest.mark.parametrize("case", WRAPPERS, ids=str)
# TRAM-Fisher measures no d: its radius is rho.
EVERY_TRAM_WITH_D = pytest.mark.parametrize(
    "case", [case for case in TRAMS if case.kwargs["trust_region"] != "fisher"], ids=str
)


@EVERY_WRAPPER
@pytest.mark.parametrize("base_name", list(BASES))
@pytest.mark.parametrize("form", ["closure", "explicit", "explicit, second_pass()"])
def test_equals_reference_loop(case: WrapperCase, base_name: str, form: str) -> None:
    reference = reference_run(case, BASES[base_name], steps=6)
    explicit, declared = form != "closure", form.endswith("second_pass()")
    model, _ = library_run(case, BASES[base_name], steps=6, explicit=explicit, declared=declared)
    assert_same_params(model, reference)
    # The perturbation must matter, or this test could not fail.
    plain = make_model()
    base = BASES[base_name](plain.parameters())
    for step in range(6):
        base.step(closure_for(base, plain, step))
    assert any(not torch.allclose(p, q) for p, q in zip(model.parameters(), plain.parameters()))


@EVERY_WRAPPER
@pytest.mark.parametrize("base_name", list(BASES))
def test_scaled_step_equals_reference_loop(case: WrapperCase, base_name: str) -> None:
    """``tram.scaled_step``, the fp16 recipe, runs its first pass inside ``first_pass()``: TRAM
    measures d from it, TRAM-Fisher noises it. A power-of-two loss scale changes no fp32 gradient
    beyond rounding, so the steps are the reference loop's."""
    reference = reference_run(case, BASES[base_name], steps=6)
    model = make_model()
    optimizer = case.make(BASES[base_name](model.parameters()), model)
    scale = 2.0**11
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    for step in range(6):
        x, y = batch(step)
        tram.scaled_step(optimizer, grad_scaler, lambda x=x, y=y: loss_of(model, x, y))
        assert not optimizer.is_perturbed
    assert optimizer.steps == 6
    assert optimizer.skipped_ascents == 0
    assert grad_scaler.get_scale() == scale
    assert_same_params(model, reference)


@EVERY_WRAPPER
@pytest.mark.parametrize("base_name", list(BASES))
def test_zero_radius_is_the_bare_base_optimizer(case: WrapperCase, base_name: str) -> None:
    model, optimizer = library_run(case, BASES[base_name], steps=5, **case.zero_radius)
    plain = make_model()
    base = BASES[base_name](plain.parameters())
    for step in range(5):
        base.step(closure_for(base, plain, step))
    assert_same_params(model, plain, exact=True)
    assert optimizer.steps == 5


MAXIMIZING: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "SGD": lambda params, maximize: torch.optim.SGD(
        params, lr=0.1, momentum=0.9, maximize=maximize
    ),
    "AdamW": lambda params, maximize: torch.optim.AdamW(
        params, lr=1e-2, weight_decay=0.01, maximize=maximize
    ),
}


def signed_loss_run(case: WrapperCase, base_name: str, *, maximize: bool) -> nn.Module:
    """Three steps on L with ``maximize=True``, or on −L with ``maximize=False``."""
    model = make_model()
    optimizer = case.make(MAXIMIZING[base_name](model.parameters(), maximize), model)
    sign = 1.0 if maximize else -1.0
    for step in range(3):
        x, y = batch(step)

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            optimizer.zero_grad()
            loss = sign * loss_of(model, x, y)
            loss.backward()
            return loss

        optimizer.step(closure)
    return model


@EVERY_WRAPPER
@pytest.mark.parametrize("base_name", list(MAXIMIZING))
def test_maximize_is_minimizing_the_negated_loss(case: WrapperCase, base_name: str) -> None:
    """A base optimizer with maximize=True ascends the loss, and the two-pass step's worst case
    near θ is then down the gradient: maximizing L takes the steps of minimizing −L, bit for
    bit (torch's maximize negates the gradient exactly, as autograd does for −L)."""
    assert_same_params(
        signed_loss_run(case, base_name, maximize=True),
        signed_loss_run(case, base_name, maximize=False),
        exact=True,
    )


@EVERY_WRAPPER
def test_step_returns_the_first_pass_loss_and_calls_the_closure_twice(case: WrapperCase) -> None:
    model = make_model()
    optimizer = case.make(torch.optim.SGD(model.parameters(), lr=0.1), model)
    calls: list[int] = []
    x, y = batch(0)
    # The first pass's loss: TRAM-Fisher's first pass runs on noised inputs (its documented
    # choice), so its loss is the noised one.
    twin = copy.deepcopy(model)
    with torch.no_grad():
        expected = F.cross_entropy(case.ascent(twin).first_forward(twin, x), y).item()
    loss = optimizer.step(closure_for(optimizer, model, 0, calls))
    assert loss.item() == expected
    assert loss.grad_fn is not None  # the closure's own loss tensor
    assert calls == [0, 0]


@EVERY_WRAPPER
@pytest.mark.parametrize("base_name", list(BASES))
def test_resume_is_bit_exact(case: WrapperCase, base_name: str) -> None:
    straight, straight_optimizer = library_run(case, BASES[base_name], steps=6)

    model, optimizer = library_run(case, BASES[base_name], steps=3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = make_model(seed=123)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = case.make(BASES[base_name](resumed.parameters()), resumed)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    assert resumed_optimizer.steps == 3
    for step in range(3, 6):
        resumed_optimizer.step(closure_for(resumed_optimizer, resumed, step))

    assert_same_params(resumed, straight, exact=True)
    for p, q in zip(resumed.parameters(), straight.parameters()):
        for key, value in straight_optimizer.state[q].items():
            resumed_value = torch.as_tensor(resumed_optimizer.state[p][key])
            assert torch.equal(resumed_value, torch.as_tensor(value))


@EVERY_WRAPPER
def test_state_dict_hooks_registered_on_the_wrapper_run_as_torch_runs_them(
    case: WrapperCase,
) -> None:
    """torch runs an optimizer's state-dict hooks inside ``Optimizer.state_dict`` and
    ``load_state_dict``, which the wrapper overrides: before, hooks registered on the wrapper
    were never called, silently. Now the save hooks run around the whole state dict (tram's
    entry included) and may replace it; a load pre-hook gets a shallow copy, before any check,
    and may replace it; the load post-hook runs after a load that went through only."""
    _, optimizer = library_run(case, BASES["AdamW"], steps=2)
    calls: list[tuple[Any, ...]] = []
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append(("save-pre", opt)))

    def stamp(opt: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        calls.append(("save-post", opt, "tram" in state_dict["param_groups"][0]))
        return {**state_dict, "stamp": 7}

    optimizer.register_state_dict_post_hook(stamp)
    saved = optimizer.state_dict()
    assert saved["stamp"] == 7
    assert calls == [("save-pre", optimizer), ("save-post", optimizer, True)]

    model = make_model(seed=5)
    fresh = case.make(BASES["AdamW"](model.parameters()), model)

    def adapt(opt: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        calls.append(("load-pre", opt))
        del state_dict["stamp"]  # an entry of the copy; the caller's dict keeps it
        groups = [{**group, "lr": 0.0123} for group in state_dict.get("param_groups", [])]
        return {**state_dict, "param_groups": groups} if groups else None

    fresh.register_load_state_dict_pre_hook(adapt)
    fresh.register_load_state_dict_post_hook(
        lambda opt: calls.append(("load-post", opt, opt.param_groups[0]["lr"]))
    )
    calls.clear()
    fresh.load_state_dict(saved)
    assert saved["stamp"] == 7
    assert calls == [("load-pre", fresh), ("load-post", fresh, 0.0123)]
    assert fresh.steps == 2
    calls.clear()
    with pytest.raises(ValueError, match="Invalid state_dict"):
        fresh.load_state_dict({"stamp": 7, "model": model.state_dict()})
    assert calls == [("load-pre", fresh)]


@EVERY_WRAPPER
def test_state_dict_holds_base_state_and_no_weight_backup(case: WrapperCase) -> None:
    model, optimizer = library_run(case, BASES["AdamW"], steps=2)
    state_dict = optimizer.state_dict()
    per_param = state_dict["state"][0]
    assert set(per_param) == {"step", "exp_avg", "exp_avg_sq"}
    counters = {"steps": 2, "skipped_ascents": 0, "skipped_steps": 0}
    assert {key: state_dict["param_groups"][0]["tram"][key] for key in counters} == counters
    for key, value in case.group_defaults.items():
        assert state_dict["param_groups"][0][key] == value
    # A checkpoint taken while perturbed still holds no backup.
    first_pass(optimizer, closure_for(optimizer, model, 0))
    optimizer.first_step()
    assert set(optimizer.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    optimizer.restore()


@EVERY_WRAPPER
def test_shares_groups_and_state_with_the_base_and_relinks(case: WrapperCase) -> None:
    model = make_model()
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer = case.make(base, model)
    assert optimizer.param_groups is base.param_groups
    assert optimizer.state is base.state
    optimizer.load_state_dict(optimizer.state_dict())
    assert optimizer.param_groups is base.param_groups
    # accelerate's prepare() reloads the base directly: the wrapper re-links at once.
    base.load_state_dict(base.state_dict())
    assert optimizer.param_groups is base.param_groups
    optimizer.step(closure_for(optimizer, model, 0))
    assert optimizer.param_groups is base.param_groups
    for key in case.group_defaults:
        assert key in base.param_groups[0]


@EVERY_WRAPPER
def test_scheduler_on_the_wrapper_drives_the_base_without_warnings(case: WrapperCase) -> None:
    for explicit in (False, True):
        model = make_model()
        base = torch.optim.SGD(model.parameters(), lr=1.0)
        optimizer = case.make(base, model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
            for step in range(3):
                closure = closure_for(optimizer, model, step)
                if explicit:
                    first_pass(optimizer, closure)
                    if optimizer.first_step():
                        closure()
                    optimizer.second_step()
                else:
                    optimizer.step(closure)
                scheduler.step()
        assert base.param_groups[0]["lr"] == 0.125


@EVERY_WRAPPER
@pytest.mark.parametrize("form", ["closure", "explicit"])
def test_a_sparse_gradient_is_refused_before_the_ascent(case: WrapperCase, form: str) -> None:
    """A sparse embedding (``nn.Embedding(sparse=True)``, which SGD trains) has no dense
    gradient to take the norm and the ascent along: refused with the fix, nothing moved."""
    model = make_model()
    table = nn.Embedding(7, 3, sparse=True)
    base = torch.optim.SGD([*model.parameters(), table.weight], lr=0.1)
    optimizer = case.make(base, model)
    before = [p.detach().clone() for p in [*model.parameters(), table.weight]]
    x, y = batch(0)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_of(model, x, y) + 0.01 * table(torch.tensor([1, 4])).sum()
        loss.backward()
        return loss

    message = "does not support sparse gradients, but got one for a parameter of shape \\(7, 3\\)"
    if form == "explicit":
        first_pass(optimizer, closure)
    with pytest.raises(RuntimeError, match=message) as raised:
        optimizer.first_step() if form == "explicit" else optimizer.step(closure)
    assert "sparse=False" in str(raised.value)
    assert not optimizer.is_perturbed
    for p, b in zip([*model.parameters(), table.weight], before, strict=True):
        assert torch.equal(p, b)


@EVERY_WRAPPER
def test_weights_restored_when_the_second_pass_raises(case: WrapperCase) -> None:
    model = make_model()
    optimizer = case.make(torch.optim.SGD(model.parameters(), lr=0.1), model)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(0)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory at theta + epsilon")
        optimizer.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="out of memory"):
        optimizer.step(closure)
    assert not optimizer.is_perturbed
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


@EVERY_WRAPPER
def test_first_step_perturbs_by_the_reference_epsilon_and_restore_is_exact(
    case: WrapperCase,
) -> None:
    model = make_model()
    twin = copy.deepcopy(model)
    ascent = case.ascent(twin)
    optimizer = case.make(torch.optim.SGD(model.parameters(), lr=0.1), model)
    # Away from the weights at construction, so that TRAM's θ0, θt−1 and EMA targets give d > 0.
    shift = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p, q in zip(model.parameters(), twin.parameters()):
            p.add_(torch.randn(p.shape, generator=shift) * 0.3)
            q.copy_(p)
    x, y = batch(0)
    logits = ascent.first_forward(twin, x)
    F.cross_entropy(logits.float(), y).backward()
    twin_params = list(twin.parameters())
    epsilon = ascent.epsilon(
        twin, x, logits.detach(), [p.detach() for p in twin_params], [p.grad for p in twin_params]
    )
    assert max(float(e.abs().max()) for e in epsilon) > 1e-5  # an ascent that can be missed

    first_pass(optimizer, closure_for(optimizer, model, 0))
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    assert optimizer.first_step()
    assert optimizer.is_perturbed
    for p, b, e in zip(params, before, epsilon):
        torch.testing.assert_close(p - b, e, rtol=1e-4, atol=1e-7)
    for p in params:
        assert torch.count_nonzero(p.grad) == 0
    optimizer.restore()
    for p, b in zip(params, before):
        assert torch.equal(p, b)


@EVERY_WRAPPER
def test_foreach_equals_the_loop(case: WrapperCase) -> None:
    loop, _ = library_run(case, BASES["AdamW"], steps=4, foreach=False)
    fused, _ = library_run(case, BASES["AdamW"], steps=4, foreach=True)
    assert_same_params(loop, fused)


@EVERY_WRAPPER
@pytest.mark.parametrize("foreach", [False, True])
def test_restore_is_exact_in_bfloat16(case: WrapperCase, foreach: bool) -> None:
    model = make_model(dtype=torch.bfloat16)
    optimizer = case.make(torch.optim.SGD(model.parameters(), lr=0.1), model, foreach=foreach)
    shift_weights(model)  # so that every trust region has d > 0
    first_pass(optimizer, closure_for(optimizer, model, 0))
    before = [p.detach().clone() for p in model.parameters()]
    assert optimizer.first_step()
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    optimizer.restore()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


@EVERY_WRAPPER
@pytest.mark.parametrize(
    "base_factory",
    [
        lambda p: torch.optim.SGD(p, lr=0.1),
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2),
        pytest.param(lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True), id="AdamW-fused"),
        pytest.param("AdamWScheduleFree", id="schedulefree.AdamWScheduleFree"),
        pytest.param("Lamb", id="torch_optimizer.Lamb"),
        pytest.param("RAdam", id="torch_optimizer.RAdam"),
    ],
)
def test_wraps_common_optimizers(case: WrapperCase, base_factory) -> None:
    if base_factory == "AdamWScheduleFree":
        base_factory = schedule_free_adamw
    elif isinstance(base_factory, str):
        torch_optimizer = pytest.importorskip("torch_optimizer")
        name = base_factory
        base_factory = lambda p: getattr(torch_optimizer, name)(p, lr=1e-2)  # noqa: E731
    reference = reference_run(case, base_factory, steps=3)
    model, optimizer = library_run(case, base_factory, steps=3)
    assert_same_params(model, reference)
    assert optimizer.param_groups is optimizer.base_optimizer.param_groups


class UsedUnusedFrozen(nn.Module):
    """A model with a layer it never calls and a frozen one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.used = nn.Linear(5, 3)
        self.unused = nn.Linear(5, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.used(x))


@EVERY_WRAPPER
def test_frozen_and_unused_parameters_are_left_alone(case: WrapperCase) -> None:
    model = UsedUnusedFrozen()
    used, unused, frozen = model.used, model.unused, model.frozen
    params = [*used.parameters(), *unused.parameters(), *frozen.parameters()]
    optimizer = case.make(torch.optim.SGD(params, lr=0.1), model)
    snapshots = {id(p): p.detach().clone() for p in params}
    x, y = batch(0)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first_pass(optimizer, closure)
    assert optimizer.first_step()
    for p in [*unused.parameters(), *frozen.parameters()]:
        assert torch.equal(p, snapshots[id(p)])
        assert p.grad is None
    optimizer.restore()
    optimizer.step(closure)
    optimizer.step(closure)
    for p in [*unused.parameters(), *frozen.parameters()]:
        assert torch.equal(p, snapshots[id(p)])
    assert not torch.equal(used.weight, snapshots[id(used.weight)])


@pytest.mark.parametrize("case", WRAPPERS, ids=str)
def test_per_group_radius(case: WrapperCase) -> None:
    """A group with rho = 0 is not perturbed; TRAM, whose radius is the measured d, refuses it."""
    model = make_model()
    first, second = model[0], model[2]
    base = torch.optim.SGD(
        [{"params": first.parameters()}, {"params": second.parameters(), "rho": 0.0}], lr=0.1
    )
    if case.is_tram and case.kwargs["trust_region"] != "fisher":
        with pytest.raises(ValueError, match="TRAM measures its radius"):
            case.make(base, model)
        return
    optimizer = case.make(base, model)
    for key, value in case.group_defaults.items():
        assert base.param_groups[0][key] == value
    shift_weights(model)  # so that every trust region has d > 0
    first_pass(optimizer, closure_for(optimizer, model, 0))
    before = [p.detach().clone() for p in model.parameters()]
    assert optimizer.first_step()
    moved = [not torch.equal(p, b) for p, b in zip(model.parameters(), before)]
    assert moved == [True, True, False, False]
    optimizer.restore()


def shift_weights(model: nn.Module, seed: int = 7) -> None:
    """Move the weights away from where the wrapper was built (TRAM's θ0, θt−1 and EMA)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * 0.3)


@EVERY_WRAPPER
def test_add_param_group_goes_through_the_base(case: WrapperCase) -> None:
    model = make_model()
    base = torch.optim.AdamW(model[0].parameters(), lr=1e-3, betas=(0.8, 0.9))
    optimizer = case.make(base, model)
    optimizer.add_param_group({"params": model[2].parameters()})
    assert len(base.param_groups) == 2
    assert base.param_groups[1]["betas"] == (0.8, 0.9)
    for key, value in case.group_defaults.items():
        assert base.param_groups[1][key] == value
    optimizer.step(closure_for(optimizer, model, 0))
    assert len(base.state) == 4


def fsdp1(module: nn.Module, *, use_orig_params: bool) -> nn.Module:
    """``module`` under FSDP1 (``FullyShardedDataParallel``) on the CPU, in the process group of
    one rank that the ``one_process_group`` fixture creates."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP1's deprecation
        return FullyShardedDataParallel(
            module, device_id=torch.device("cpu"), use_orig_params=use_orig_params
        )


FSDP1_REFUSED = r"does not support parameters flattened by FSDP1.*fully_shard"


@EVERY_WRAPPER
@pytest.mark.parametrize("use_orig_params", [False, True], ids=["flat", "orig_params"])
def test_fsdp1_parameters_are_refused_at_construction(
    case: WrapperCase, use_orig_params: bool, one_process_group: None
) -> None:
    """FSDP1's parameters are one rank's shard each, as plain tensors: ‖g‖ would be a shard's
    (two ranks measured: SAM's step off by 8e-4 at lr 0.1). FSDP2 (DTensor) is the supported
    sharding (``tests/test_distributed.py``)."""
    model = fsdp1(make_model(), use_orig_params=use_orig_params)
    with pytest.raises(RuntimeError, match=f"^{case.cls.__name__}(Fisher)? {FSDP1_REFUSED}"):
        case.make(torch.optim.SGD(model.parameters(), lr=0.1), model)


def test_fsdp1_parameters_are_refused_by_add_param_group(one_process_group: None) -> None:
    sharded = fsdp1(make_model(seed=1), use_orig_params=True)
    base = torch.optim.SGD(make_model().parameters(), lr=0.1)
    optimizer = tram.SAM(base, rho=0.05)
    with pytest.raises(RuntimeError, match=FSDP1_REFUSED):
        optimizer.add_param_group({"params": sharded.parameters()})
    assert len(base.param_groups) == 1


def test_fsdp1_wrapping_after_the_optimizer_is_refused_at_the_first_ascent(
    one_process_group: None,
) -> None:
    """With ``use_orig_params=True`` FSDP1 keeps the parameter objects the optimizer was built
    with and flags them only then: the first ascent refuses them, before perturbing any."""
    inner = make_model()
    optimizer = tram.SAM(torch.optim.SGD(inner.parameters(), lr=0.1), rho=0.05)
    model = fsdp1(inner, use_orig_params=True)
    x, y = batch(0)
    loss_of(model, x, y).backward()
    before = [p.detach().clone() for p in inner.parameters()]
    with pytest.raises(RuntimeError, match=FSDP1_REFUSED):
        optimizer.first_step()
    assert not optimizer.is_perturbed
    assert all(torch.equal(p, b) for p, b in zip(inner.parameters(), before))


@EVERY_WRAPPER
@pytest.mark.parametrize("bucket_view", [False, True], ids=["own-storage", "bucket-view"])
def test_a_zero_redundancy_optimizer_base_steps_and_resumes_as_the_optimizer_it_shards(
    case: WrapperCase, bucket_view: bool, one_process_group: None
) -> None:
    """Around ZeroRedundancyOptimizer(AdamW) (one rank here; two ranks, each stepping its
    own shard, in ``tests/test_distributed.py``) the wrapper takes AdamW's steps, bit for bit,
    also with ``parameters_as_bucket_view=True`` (the weights become views of flat buckets).
    Its ``state_dict()`` needs ``consolidate_state_dict()`` first, which the wrapper has as its
    base does, and the refusal says so; the consolidated state dict resumes bit for bit."""

    def sharded(params: Any) -> torch.optim.Optimizer:
        return zero_redundancy_adamw(params, parameters_as_bucket_view=bucket_view)

    straight, _ = library_run(case, BASES["AdamW"], steps=5)
    model, optimizer = library_run(case, sharded, steps=3)
    with pytest.raises(
        RuntimeError,
        match=r"Call optimizer\.consolidate_state_dict\(to=rank\) \(the base optimizer.s\) on",
    ):
        optimizer.state_dict()
    optimizer.consolidate_state_dict(to=0)
    checkpoint = copy.deepcopy(optimizer.state_dict())
    resumed = make_model(seed=123)
    resumed.load_state_dict(model.state_dict())
    resumed_optimizer = case.make(sharded(resumed.parameters()), resumed)
    resumed_optimizer.load_state_dict(checkpoint)
    assert resumed_optimizer.steps == 3
    for step in range(3, 5):
        resumed_optimizer.step(closure_for(resumed_optimizer, resumed, step))
    assert_same_params(resumed, straight, exact=True)


@EVERY_WRAPPER
def test_consolidate_state_dict_is_there_exactly_when_the_base_has_it(
    case: WrapperCase, one_process_group: None
) -> None:
    """Lightning and Fabric save ``consolidate_state_dict()``'s rank-0 state when the optimizer
    has that method, and every rank's ``state_dict()`` otherwise: the wrapper must answer
    ``hasattr`` as its base optimizer does."""
    model = make_model()
    plain = case.make(BASES["AdamW"](model.parameters()), model)
    assert not hasattr(plain, "consolidate_state_dict")
    with pytest.raises(AttributeError, match=r"its base optimizer, AdamW, has none"):
        plain.consolidate_state_dict(to=0)
    sharded = case.make(zero_redundancy_adamw(model.parameters()), model)
    assert sharded.consolidate_state_dict == sharded.base_optimizer.consolidate_state_dict


@EVERY_WRAPPER
def test_a_post_local_sgd_optimizer_is_refused_with_the_averaging_recipe(
    case: WrapperCase, one_process_group: None
) -> None:
    """torch's PostLocalSGDOptimizer never runs Optimizer.__init__ (no ``defaults``) and keeps
    its inner optimizer's param groups as they were at construction, which its
    ``load_state_dict`` replaces: a scheduler on a resumed wrapper would drive groups nothing
    reads. Refused at construction (before, an ``AttributeError`` from inside the checks), naming
    the averager call that takes its place."""
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    model = make_model()
    base = PostLocalSGDOptimizer(
        BASES["SGD"](model.parameters()), PeriodicModelAverager(period=3, warmup_steps=0)
    )
    with pytest.raises(
        TypeError,
        match=r"cannot wrap torch\.distributed\.optim\.post_localSGD_optimizer\."
        r"PostLocalSGDOptimizer: it is not a complete torch\.optim\.Optimizer \(it has no "
        r"defaults;.* averager\.average_parameters\(model\.parameters\(\)\)$",
    ):
        case.make(base, model)


@EVERY_WRAPPER
def test_a_zero_redundancy_optimizer_that_steps_inside_the_backward_is_refused(
    case: WrapperCase, one_process_group: None
) -> None:
    """With ``overlap_with_ddp=True`` ZeroRedundancyOptimizer updates the weights in DDP's
    communication hook, during each backward: in a two-pass step, at θ and again at θ+ε.
    Refused at construction (this also pins the private flag it is read from)."""
    model = make_model()
    base = zero_redundancy_adamw(model.parameters(), overlap_with_ddp=True)
    with pytest.raises(
        ValueError,
        match=rf"^{case.cls.__name__}(Fisher)? cannot wrap a ZeroRedundancyOptimizer built with "
        r"overlap_with_ddp=True: .* Build it with overlap_with_ddp=False$",
    ):
        case.make(base, model)


def fsdp2(module: nn.Module) -> nn.Module:
    """``module`` under FSDP2 (``fully_shard``, every layer and the root) on the CPU, in the
    process group of one rank that the ``one_process_group`` fixture creates."""
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("FSDP2 is not available")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1,))
    for layer in (*(m for m in module if isinstance(m, nn.Linear)), module):
        fsdp.fully_shard(layer, mesh=mesh)
    return module


def test_fsdp2_step_closure_refuses_gradients_accumulated_outside_it(
    one_process_group: None,
) -> None:
    """FSDP2 adds a backward's gradient into the existing one's local shard in place
    (``grad._local_tensor +=``), which bumps the local tensor's version counter, not the
    ``DTensor``'s: the accumulation before ``step()`` is seen there, and refused as without
    FSDP2 (``test_step_closure_refuses_gradients_accumulated_outside_it``)."""
    model = fsdp2(make_model())
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, model=model)
    optimizer.step(closure_for(optimizer, model, 0))
    assert type(next(model.parameters()).grad).__name__ == "DTensor"
    before = [p.detach().full_tensor().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="accumulating_closure"):
        optimizer.step(backward_outside_the_closure(model))
    assert optimizer.steps == 1
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach().full_tensor(), b)


def test_fsdp2_second_backward_into_the_zeroed_gradients_steps(one_process_group: None) -> None:
    """The explicit form without ``zero_grad()`` between the passes (as ``tram.scaled_step``
    runs it): FSDP2 adds the second backward into the gradients ``first_step()`` zeroed, in
    their local shards. That backward is seen (no refusal as if the weights had been restored
    before it) and the step is the one ``step(closure)`` takes on the unsharded model."""
    model = fsdp2(make_model())
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, model=model)
    plain = make_model()
    reference = tram.SAM(torch.optim.SGD(plain.parameters(), lr=0.1), rho=0.05, model=plain)
    for step in range(2):
        x, y = batch(step)
        optimizer.zero_grad()
        with optimizer.first_pass():
            loss_of(model, x, y).backward()
        assert optimizer.first_step()
        loss_of(model, x, y).backward()
        optimizer.second_step()
        reference.step(closure_for(reference, plain, step))
    assert optimizer.steps == 2
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.detach().full_tensor(), q.detach(), rtol=1e-6, atol=1e-7)


@EVERY_WRAPPER
def test_ascent_every_skips_the_second_pass(case: WrapperCase) -> None:
    model = make_model()
    optimizer = case.make(torch.optim.SGD(model.parameters(), lr=0.1), model, ascent_every=3)
    calls: list[int] = []
    due: list[bool] = []
    for step in range(6):
        due.append(optimizer.ascent_due)
        optimizer.step(closure_for(optimizer, model, step, calls))
    assert calls == [0, 0, 1, 2, 3, 3, 4, 5]
    assert due == [True, False, False, True, False, False]
    # Off-steps are plain base steps: check step 1 against SGD on the same weights.
    model_a = make_model()
    optimizer_a = case.make(torch.optim.SGD(model_a.parameters(), lr=0.1), model_a, ascent_every=3)
    optimizer_a.step(closure_for(optimizer_a, model_a, 0))
    model_b = copy.deepcopy(model_a)
    sgd = torch.optim.SGD(model_b.parameters(), lr=0.1)
    optimizer_a.step(closure_for(optimizer_a, model_a, 1))
    sgd.step(closure_for(sgd, model_b, 1))
    assert_same_params(model_a, model_b, exact=True)


@EVERY_WRAPPER
def test_observes_first_pass_exactly_when_first_pass_records_the_forward(
    case: WrapperCase,
) -> None:
    """A caller that drives the passes itself (TramTrainer) asks ``observes_first_pass`` whether
    the forward must run inside ``first_pass()``: True for the TRAMs, which measure d there."""
    model = make_model()
    optimizer = case.make(torch.optim.SGD(model.parameters(), lr=0.1), model)
    assert optimizer.observes_first_pass == (case in TRAMS)
    if optimizer.observes_first_pass:
        # A first pass outside first_pass() leaves nothing to measure d from: it refuses.
        closure_for(optimizer, model, 0)()
        with pytest.raises(RuntimeError, match="first_pass"):
            optimizer.first_step()
        optimizer.zero_grad()
        # Nor does a recorded pass whose gradient zero_grad() dropped (a skipped batch) stand
        # in for the next one: the closure zeroes the gradients before its forward.
        first_pass(optimizer, closure_for(optimizer, model, 1))
        closure_for(optimizer, model, 0)()
        with pytest.raises(RuntimeError, match="first_pass"):
            optimizer.first_step()


@EVERY_WRAPPER
def test_a_first_pass_dropped_by_zero_grad_leaves_no_trace(case: WrapperCase) -> None:
    """A loop that skips a batch after its first pass (a non-finite or an oversized batch)
    calls ``zero_grad()`` and goes on. What the method observed of that pass goes with its
    gradient: TRAM measures d over the next batch alone. The noise generators are put back
    where they were, so only what the wrapper kept of the dropped pass could differ."""
    reference, reference_optimizer = library_run(case, BASES["AdamW"], steps=3, explicit=True)
    model = make_model()
    optimizer = case.make(BASES["AdamW"](model.parameters()), model)
    noise = getattr(optimizer, "noised_inputs", None) or getattr(optimizer, "target", None)
    for step in range(3):
        if step == 1:  # after a step, where every target's d is positive
            noise_state = copy.deepcopy(noise.state_dict()) if noise is not None else None
            first_pass(optimizer, closure_for(optimizer, model, 7))
            optimizer.zero_grad()
            if noise is not None:
                noise.load_state_dict(noise_state)
        closure = closure_for(optimizer, model, step)
        first_pass(optimizer, closure)
        if optimizer.first_step():
            closure()
        optimizer.second_step()
    assert_same_params(model, reference, exact=True)
    history = getattr(optimizer, "radius_history", None)
    assert history == getattr(reference_optimizer, "radius_history", None)


@EVERY_WRAPPER
def test_non_finite_gradient_skips_the_ascent(case: WrapperCase) -> None:
    model = make_model()
    optimizer = case.make(torch.optim.SGD(model.parameters(), lr=0.1), model)
    first_pass(optimizer, closure_for(optimizer, model, 0))
    model[0].weight.grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="gradient norm is not finite"):
        assert optimizer.first_step() is False
    assert optimizer.skipped_ascents == 1
    assert not optimizer.is_perturbed
    for p, b, g in zip(model.parameters(), before, grads):
        assert torch.equal(p, b)
        assert torch.equal(p.grad, g)
    assert optimizer.state_dict()["param_groups"][0]["tram"]["skipped_ascents"] == 1


@EVERY_WRAPPER
@pytest.mark.parametrize("poison", ["loss", "input"])
@pytest.mark.parametrize("ascent_every", [1, 2], ids=["ascent-step", "off-step"])
def test_non_finite_gradient_never_reaches_the_weights(
    case: WrapperCase, poison: str, ascent_every: int
) -> None:
    """A nan in the loss, or in an input (then TRAM's d is nan too, and the gradient is checked
    all the same), skips the step with the weights at θ. With ``ascent_every=2`` the poisoned
    step is an off-step, whose first pass is its only pass: its gradient is checked as well."""
    model = make_model()
    optimizer = case.make(
        torch.optim.AdamW(model.parameters(), lr=0.1), model, ascent_every=ascent_every
    )
    optimizer.step(closure_for(optimizer, model, 0))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(1)
    if poison == "input":
        x = x.clone()
        x[0, 0] = float("nan")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_of(model, x, y)
        if poison == "loss":
            loss = loss * float("nan")
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning) as caught:
        optimizer.step(closure)
    messages = [str(warning.message) for warning in caught]
    skipped_ascents = 1 if ascent_every == 1 else 0
    assert (
        sum("skipped the ascent because the gradient norm is not finite" in m for m in messages)
        == skipped_ascents
    )
    assert any("skipped the base step" in m for m in messages)
    assert (optimizer.skipped_ascents, optimizer.skipped_steps, optimizer.steps) == (
        skipped_ascents,
        1,
        1,
    )
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    # The next finite step is taken normally.
    optimizer.step(closure_for(optimizer, model, 2))
    assert optimizer.steps == 2
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


@EVERY_WRAPPER
def test_step_closure_refuses_gradients_accumulated_outside_it(case: WrapperCase) -> None:
    """An accumulation loop moved to ``step(closure)`` as it was: the first micro-batch
    backpropagated before ``step()``, the last in a closure that does not zero the gradients.
    The ascent would come from the whole window and the second pass would replay the last
    micro-batch only: refused, nothing stepped, the weights at θ."""
    model = make_model()
    optimizer = case.make(torch.optim.SGD(model.parameters(), lr=0.1), model)
    optimizer.step(closure_for(optimizer, model, 0))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="accumulating_closure"):
        optimizer.step(backward_outside_the_closure(model))
    assert not optimizer.is_perturbed
    assert optimizer.steps == 1
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    # The window run inside the closure steps.
    x, y = batch(1)
    windows = [(x[:6], y[:6]), (x[6:], y[6:])]
    optimizer.step(tram.accumulating_closure(optimizer, windows, lambda b: loss_of(model, *b)))
    assert optimizer.steps == 2


@EVERY_WRAPPER
@pytest.mark.parametrize(
    "zeroing", ["optimizer.zero_grad", "model.zero_grad", "zero_grad(set_to_none=False) before"]
)
def test_step_closure_takes_gradients_that_are_zeroed(case: WrapperCase, zeroing: str) -> None:
    """A backward before ``step(closure)`` is harmless when its gradients are zeroed, in the
    closure or between it and the step: the step equals one without it."""

    def run(stray_backward: bool) -> nn.Module:
        model = make_model()
        optimizer = case.make(torch.optim.SGD(model.parameters(), lr=0.1), model)
        optimizer.step(closure_for(optimizer, model, 0))
        x, y = batch(1)
        if stray_backward:
            loss_of(model, x[:6], y[:6]).backward()
        if zeroing == "zero_grad(set_to_none=False) before":
            optimizer.zero_grad(set_to_none=False)

        def closure() -> torch.Tensor:
            if zeroing == "optimizer.zero_grad":
                optimizer.zero_grad()
            elif zeroing == "model.zero_grad":
                model.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            return loss

        optimizer.step(closure)
        assert optimizer.steps == 2
        return model

    assert_same_params(run(stray_backward=True), run(stray_backward=False), exact=True)


@EVERY_WRAPPER
@pytest.mark.parametrize("restore", ["restore", "eval-train", "load_state_dict"])
def test_restoring_before_the_second_pass_refuses_the_step(case: WrapperCase, restore: str) -> None:
    """The explicit form with the weights put back to θ between ``first_step()`` and the second
    backward (an evaluation hook, a checkpoint load): that backward would run at θ and the base
    step would be a plain one. Refused, nothing stepped; the next step is taken normally."""
    model = make_model()
    optimizer = case.make(torch.optim.SGD(model.parameters(), lr=0.1), model)
    optimizer.step(closure_for(optimizer, model, 0))
    saved = optimizer.state_dict()
    before = [p.detach().clone() for p in model.parameters()]
    closure = closure_for(optimizer, model, 1)
    first_pass(optimizer, closure)
    assert optimizer.first_step()
    if restore == "restore":
        optimizer.restore()
    elif restore == "eval-train":
        optimizer.eval()
        optimizer.train()
    else:
        optimizer.load_state_dict(saved)
    closure()
    with pytest.raises(RuntimeError, match="before any backward at the perturbed weights"):
        optimizer.second_step()
    assert optimizer.steps == 1
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    optimizer.step(closure_for(optimizer, model, 2))
    assert optimizer.steps == 2


@EVERY_WRAPPER
def test_step_hooks_fire_once_per_step(case: WrapperCase) -> None:
    model = make_model()
    optimizer = case.make(torch.optim.SGD(model.parameters(), lr=0.1), model)
    fired: list[str] = []
    optimizer.register_step_pre_hook(lambda *_: fired.append("pre"))
    optimizer.register_step_post_hook(lambda *_: fired.append("post"))
    optimizer.step(closure_for(optimizer, model, 0))
    assert fired == ["pre", "post"]


@EVERY_WRAPPER
def test_eval_restores_the_weights(case: WrapperCase) -> None:
    model = make_model()
    optimizer = case.make(torch.optim.SGD(model.parameters(), lr=0.1), model)
    first_pass(optimizer, closure_for(optimizer, model, 0))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.first_step()
    optimizer.eval()
    assert not optimizer.is_perturbed
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def schedule_free_adamw(params: Any) -> torch.optim.Optimizer:
    """Schedule-free AdamW in train mode (it refuses to step otherwise); a warm-up and weight
    decay so that its interpolation and averaging both matter."""
    schedulefree = pytest.importorskip("schedulefree")
    optimizer = schedulefree.AdamWScheduleFree(params, lr=2e-2, warmup_steps=2, weight_decay=0.03)
    optimizer.train()
    return optimizer


@EVERY_WRAPPER
def test_train_and_eval_reach_a_schedule_free_base(case: WrapperCase) -> None:
    """Schedule-free optimizers keep the weights at the gradient point y in train mode and at
    the average x in eval mode; the wrapper forwards ``train()``/``eval()``, restoring θ first
    (x from θ+ε would be evaluated otherwise)."""
    model, optimizer = library_run(case, schedule_free_adamw, steps=2)
    twin_model, twin_base = copy.deepcopy((model, optimizer.base_optimizer))  # both at y = θ
    first_pass(optimizer, closure_for(optimizer, model, 2))
    assert optimizer.first_step()
    optimizer.eval()  # while perturbed
    twin_base.eval()
    assert not optimizer.is_perturbed
    for p, q in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not optimizer.base_optimizer.param_groups[0]["train_mode"]
    optimizer.train()
    twin_base.train()
    assert optimizer.base_optimizer.param_groups[0]["train_mode"]
    for p, q in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(p, q)


@EVERY_WRAPPER
def test_deepcopy_keeps_working(case: WrapperCase) -> None:
    _, optimizer = library_run(case, BASES["AdamW"], steps=1)
    clone = copy.deepcopy(optimizer)
    assert clone.param_groups is clone.base_optimizer.param_groups
    assert clone.steps == 1


@EVERY_WRAPPER
@pytest.mark.parametrize("copied", [False, True], ids=["", "copied"])
def test_a_load_into_the_base_optimizer_alone_relinks_the_param_groups(
    case: WrapperCase, copied: bool
) -> None:
    """``optimizer.base_optimizer.load_state_dict(...)`` gives the base new group dicts: a
    scheduler stepping the wrapper's ``param_groups`` before its next call used to write to the
    old ones, silently (SAM at ρ = 0 then left the schedule behind plain Adam's)."""
    model, optimizer = library_run(case, BASES["AdamW"], steps=2)
    if copied:
        model, optimizer = copy.deepcopy((model, optimizer))
    base = optimizer.base_optimizer
    base.load_state_dict(copy.deepcopy(base.state_dict()))
    assert optimizer.param_groups is base.param_groups
    assert optimizer.state is base.state
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.3**epoch)
    lr = base.param_groups[0]["initial_lr"]
    optimizer.step(closure_for(optimizer, model, 2))
    base.load_state_dict(copy.deepcopy(base.state_dict()))
    scheduler.step()  # before any call of the wrapper
    assert base.param_groups[0]["lr"] == pytest.approx(0.3 * lr)
    for key, value in optimizer._method_defaults.items():
        assert base.param_groups[0][key] == value


@EVERY_WRAPPER
@pytest.mark.parametrize("scheduled", [False, True], ids=["", "after-an-lr-scheduler"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_then_steps_like_the_original(case: WrapperCase, how: str, scheduled: bool) -> None:
    """Model and optimizer copied together (so that they still share the parameters) take the
    same next steps as the originals: TRAM's generator, targets and hooks come along. An LR
    scheduler replaces ``step`` on the optimizer it is given by a closure over that optimizer;
    a copy that kept it stepped the original (and pickle refused it), as torch's own
    optimizers drop it."""
    model, optimizer = library_run(case, BASES["AdamW"], steps=2)
    resume = 2
    if scheduled:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.7**epoch)
        assert "step" in vars(optimizer)
        optimizer.step(closure_for(optimizer, model, resume))
        scheduler.step()
        resume += 1
    bundle = {"model": model, "optimizer": optimizer}
    clone = copy.deepcopy(bundle) if how == "deepcopy" else pickle.loads(pickle.dumps(bundle))
    clone_model, clone_optimizer = clone["model"], clone["optimizer"]
    assert clone_optimizer.param_groups[0]["params"][0] is next(clone_model.parameters())
    for step in range(resume, 5):
        optimizer.step(closure_for(optimizer, model, step))
        clone_optimizer.step(closure_for(clone_optimizer, clone_model, step))
    assert_same_params(clone_model, model, exact=True)
    assert clone_optimizer.steps == optimizer.steps == 5
    assert getattr(clone_optimizer, "radius_history", None) == getattr(
        optimizer, "radius_history", None
    )


def batchnorm_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


def assert_steps_leave_one_forwards_buffers(
    case: WrapperCase, model: nn.Module, take_step: Callable[[int], object]
) -> None:
    """Three steps (``take_step(step)``); after each, every buffer of ``model`` is as one
    training-mode forward at θ left it (on the noised inputs for TRAM-Fisher, whose first pass
    is noised)."""
    twin = copy.deepcopy(model)
    ascent = case.ascent(twin)  # draws the noise of TRAM-Fisher's first passes, in step
    for step in range(3):
        twin.load_state_dict(model.state_dict())
        x, _ = batch(step)
        with torch.no_grad():
            ascent.first_forward(twin, x)
        take_step(step)
        for (name, got), want in zip(model.named_buffers(), twin.buffers(), strict=True):
            assert torch.equal(got, want), f"step {step}: {name}"


@EVERY_WRAPPER
def test_batchnorm_statistics_come_from_the_first_pass_only(case: WrapperCase) -> None:
    """With the model given, the running statistics after a step are those of one
    training-mode forward at θ: neither the second pass nor TRAM's reference forward may
    update them."""
    model = batchnorm_model()
    optimizer = case.make(torch.optim.SGD(model.parameters(), lr=0.1), model, bind_model=True)
    assert_steps_leave_one_forwards_buffers(
        case, model, lambda step: optimizer.step(closure_for(optimizer, model, step))
    )
    assert int(model[1].num_batches_tracked) == 3
    assert model[1].track_running_stats


@EVERY_WRAPPER
@pytest.mark.parametrize("form", ["closure", "explicit"])
@pytest.mark.parametrize("bind_model", [True, False], ids=["model", "no-model"])
def test_forward_written_buffers_come_from_the_first_pass_only(
    case: WrapperCase, form: str, bind_model: bool
) -> None:
    """Every buffer a training forward writes (not only BatchNorm's) is, after a step, as one
    training-mode forward at θ left it: what the second pass and TRAM's reference forward
    write is put back (a counter counts one call per step, the spectral norm iterates once).
    Without ``model=`` the SAM family puts back what the modules that ran at θ+ε wrote."""
    model = stateful_model()
    optimizer = case.make(torch.optim.SGD(model.parameters(), lr=0.1), model, bind_model=bind_model)

    def take_step(step: int) -> None:
        closure = closure_for(optimizer, model, step)
        if form == "explicit":
            first_pass(optimizer, closure)
            assert optimizer.first_step()
            closure()
            optimizer.second_step()
        else:
            optimizer.step(closure)

    assert_steps_leave_one_forwards_buffers(case, model, take_step)
    assert int(model[1].calls) == 3
    assert not torch.equal(model[1].input_mean, torch.zeros(8))


class Named(nn.Module):
    """The contract model with its first layer under a chosen attribute name."""

    def __init__(self, first: str) -> None:
        super().__init__()
        reference = make_model()
        self.first = first
        self.add_module(first, reference[0])
        self.head = reference[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(getattr(self, self.first)(x)))


@EVERY_WRAPPER
def test_a_model_trains_the_same_whatever_its_children_are_called(case: WrapperCase) -> None:
    """A child called ``module`` is not a DistributedDataParallel wrapper's ``.module``."""
    runs = []
    for first in ("body", "module"):
        model = Named(first)
        optimizer = case.make(torch.optim.AdamW(model.parameters(), lr=1e-2), model)
        for step in range(3):
            optimizer.step(closure_for(optimizer, model, step))
        runs.append((model, getattr(optimizer, "radius_history", None)))
    (body, body_radii), (module, module_radii) = runs
    assert module_radii == body_radii
    assert_same_params(module, body, exact=True)
    assert_same_params(body, reference_run(case, BASES["AdamW"], steps=3))


@EVERY_TRAM_WITH_D
def test_radius_is_exactly_zero_under_bf16_autocast_when_the_target_is_the_model(
    case: WrapperCase,
) -> None:
    """The first pass runs under the caller's bf16 autocast; the reference forward must run
    under the same autocast state, or a target equal to the model gives d != 0 (the θ0,
    θt−1 and EMA targets equal θ at the first step; TRAM-x with σ = 0)."""
    model = make_model()
    options = {"sigma": 0.0} if case.kwargs["trust_region"] == "noise" else {}
    optimizer = case.make(torch.optim.SGD(model.parameters(), lr=0.1), model, **options)
    x, y = batch(0)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert optimizer.radius_history == [0.0]
