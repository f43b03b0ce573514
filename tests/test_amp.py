"""Mixed precision: fp16 with ``torch.amp.GradScaler`` through ``tram.scaled_step``, and bf16.

Run on CPU (fp16 autocast and ``GradScaler("cpu")`` work there in torch 2.13). The references
are SAM written by hand around the *base* optimizer, following the recipe of
``reference/integration.md`` §4: scaled backward, ascent from the scaled gradient, scaled
backward at θ+ε, restore by copy, ``unscale_``, ``step``, ``update``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tram

INIT_SCALE = 4096.0
RHO = 0.05


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4))


def batch(step: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 8, generator=generator), torch.randint(0, 4, (16,), generator=generator)


def loss_of(model: nn.Module, x: Tensor, y: Tensor, dtype: torch.dtype | None) -> Tensor:
    if dtype is None:
        return F.cross_entropy(model(x), y)
    with torch.autocast("cpu", dtype=dtype):
        logits = model(x)
        assert logits.dtype == dtype
        return F.cross_entropy(logits, y)


def scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)


def weights(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def hand_sam_step(
    model: nn.Module,
    base: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    rho: float = RHO,
    fisher_eta: float | None = None,
    dtype: torch.dtype | None = torch.float16,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """SAM (or Fisher SAM with ``fisher_eta``) by hand, with or without a scaler.

    Returns the first-pass loss, g(θ) and g(θ+ε), unscaled.
    """
    scale = grad_scaler.get_scale() if grad_scaler is not None else 1.0
    params = list(model.parameters())
    base.zero_grad()
    loss = loss_of(model, x, y, dtype)
    (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()
    first = [p.grad.clone() for p in params]
    # The ascent lives in parameter space: it is computed from the unscaled gradient.
    unscaled = [g.double() / scale for g in first]
    if fisher_eta is None:
        direction = unscaled  # ε = ρ g / ‖g‖
    else:
        direction = [g / (1 + fisher_eta * g**2) for g in unscaled]  # ε ∝ g / (1 + η g²)
    norm = torch.sqrt(sum((g * d).sum() for g, d in zip(unscaled, direction))).item()
    second = first
    if math.isfinite(norm):
        saved = weights(model)
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_((rho / norm * d).to(p.dtype))
        base.zero_grad()
        second_loss = loss_of(model, x, y, dtype)
        (grad_scaler.scale(second_loss) if grad_scaler is not None else second_loss).backward()
        second = [p.grad.clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    if grad_scaler is not None:
        grad_scaler.unscale_(base)
        grad_scaler.step(base)
        grad_scaler.update()
    else:
        base.step()
    return loss.detach(), [g / scale for g in first], [g / scale for g in second]


def loss_fn_for(
    model: nn.Module, x: Tensor, y: Tensor, calls: list[int], poison: int | None = None
):
    """A ``scaled_step`` loss function; its call number ``poison`` (1-based) returns inf·loss."""

    def loss_fn() -> Tensor:
        calls.append(1)
        loss = loss_of(model, x, y, torch.float16)
        return loss * math.inf if len(calls) == poison else loss

    return loss_fn


# ---------------------------------------------------------------------------------- (a)
@pytest.mark.parametrize(
    "make_base",
    [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda p: torch.optim.AdamW(p, lr=1e-2)],
    ids=["SGD", "AdamW"],
)
@pytest.mark.parametrize("fisher_eta", [None, 100.0], ids=["SAM", "FisherSAM"])
def test_scaled_step_equals_the_hand_written_recipe(
    make_base: Callable, fisher_eta: float | None
) -> None:
    """Fisher SAM's operator is not scale-invariant: this also checks grad_scale is passed."""
    model = make_model()
    optimizer = (
        tram.SAM(make_base(model.parameters()), rho=RHO)
        if fisher_eta is None
        else tram.FisherSAM(make_base(model.parameters()), rho=RHO, eta=fisher_eta)
    )
    reference = make_model()
    reference_base = make_base(reference.parameters())
    plain = make_model()
    plain_base = make_base(plain.parameters())
    scalers = scaler(), scaler(), scaler()
    for step in range(4):
        x, y = batch(step)
        loss = tram.scaled_step(
            optimizer, scalers[0], lambda x=x, y=y: loss_of(model, x, y, torch.float16)
        )
        reference_loss, _, _ = hand_sam_step(
            reference, reference_base, x, y, fisher_eta=fisher_eta, grad_scaler=scalers[1]
        )
        assert loss.item() == reference_loss.item()
        assert not optimizer.is_perturbed
        # A plain scaled step, to show the perturbation matters.
        plain_base.zero_grad()
        scalers[2].scale(loss_of(plain, x, y, torch.float16)).backward()
        scalers[2].step(plain_base)
        scalers[2].update()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert any(
        not torch.allclose(p, q, atol=1e-4) for p, q in zip(model.parameters(), plain.parameters())
    )
    assert optimizer.steps == 4
    assert optimizer.skipped_ascents == 0
    assert scalers[0].get_scale() == scalers[1].get_scale() == INIT_SCALE


# ---------------------------------------------------------------------------------- (b) (c)
def test_inf_in_the_first_pass_skips_the_ascent_and_backs_off() -> None:
    model = make_model()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer = tram.SAM(base, rho=RHO)
    grad_scaler = scaler()
    before = weights(model)
    x, y = batch(0)
    calls: list[int] = []
    with pytest.warns(
        RuntimeWarning, match="skipped the ascent because the gradient norm is not finite"
    ):
        loss = tram.scaled_step(optimizer, grad_scaler, loss_fn_for(model, x, y, calls, poison=1))
    assert not math.isfinite(loss.item())
    assert len(calls) == 1  # no second pass
    assert optimizer.skipped_ascents == 1
    assert not optimizer.is_perturbed
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert grad_scaler.get_scale() == INIT_SCALE / 2
    assert optimizer.steps == 0
    assert len(base.state) == 0  # AdamW never stepped

    # The next, finite step runs normally at the backed-off scale (no "unscale_() has already
    # been called" from the skipped iteration).
    calls.clear()
    tram.scaled_step(optimizer, grad_scaler, loss_fn_for(model, x, y, calls))
    assert len(calls) == 2
    assert optimizer.steps == 1
    assert grad_scaler.get_scale() == INIT_SCALE / 2
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_inf_in_the_second_pass_restores_and_skips_the_step() -> None:
    model = make_model()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer = tram.SAM(base, rho=RHO)
    grad_scaler = scaler()
    before = weights(model)
    x, y = batch(0)
    calls: list[int] = []
    loss = tram.scaled_step(optimizer, grad_scaler, loss_fn_for(model, x, y, calls, poison=2))
    assert math.isfinite(loss.item())
    assert len(calls) == 2
    assert not optimizer.is_perturbed
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)  # θ exactly, not θ+ε and not a step
    assert grad_scaler.get_scale() == INIT_SCALE / 2
    assert optimizer.skipped_ascents == 0
    assert optimizer.steps == 0
    assert len(base.state) == 0


# ---------------------------------------------------------------------------------- (d)
def test_update_is_unscaled_exactly_once() -> None:
    """SGD without momentum: Δθ = −lr·g(θ+ε), with g the true (unscaled) gradient."""
    lr = 0.5
    model = make_model()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=lr), rho=RHO)
    reference = make_model()
    reference_base = torch.optim.SGD(reference.parameters(), lr=lr)
    before = weights(model)
    x, y = batch(0)
    tram.scaled_step(optimizer, scaler(), lambda: loss_of(model, x, y, torch.float16))
    _, _, second = hand_sam_step(reference, reference_base, x, y, grad_scaler=None)

    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    expected = torch.cat([(-lr * g).flatten() for g in second])
    ratio = (update.norm() / expected.norm()).item()
    assert ratio == pytest.approx(1.0, rel=1e-4)  # not 1/4096 (unscaled twice), not 4096
    assert ((update - expected).norm() / expected.norm()).item() < 1e-4


SCALED_WRAPPERS = pytest.mark.parametrize(
    "make",
    [
        lambda base, model: tram.SAM(base, rho=RHO),
        lambda base, model: tram.FisherSAM(base, rho=0.1, eta=0.3),
        lambda base, model: tram.TRAM(base, model, trust_region="pretrained"),
    ],
    ids=["SAM", "FisherSAM", "TRAM-θ0"],
)


@SCALED_WRAPPERS
def test_grad_scaler_step_with_a_closure_is_refused(make: Callable) -> None:
    """``scaler.step(optimizer, closure)`` (by position; an enabled scaler refuses the keyword)
    unscales the gradients left before the closure runs, then calls ``step(closure)``: both
    passes' gradients stay scaled and SGD stepped 4096 times too far, silently. Refused, the
    weights untouched; the next ``tram.scaled_step`` is the one a fresh run takes."""
    model, twin = make_model(), make_model()
    optimizer = make(torch.optim.SGD(model.parameters(), lr=0.1), model)
    untouched = make(torch.optim.SGD(twin.parameters(), lr=0.1), twin)
    grad_scaler, twin_scaler = scaler(), scaler()
    x, y = batch(0)
    for opt, mod, sc in ((optimizer, model, grad_scaler), (untouched, twin, twin_scaler)):
        tram.scaled_step(opt, sc, lambda mod=mod: loss_of(mod, x, y, torch.float16))
    before = weights(model)

    def scaled_closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_of(model, *batch(1), torch.float16)
        grad_scaler.scale(loss).backward()
        return loss

    with pytest.raises(
        RuntimeError,
        match=r"GradScaler\.step\(optimizer, closure\).*by 4096.*call scaler\.update\(\) before",
    ):
        grad_scaler.step(optimizer, scaled_closure)
    assert not optimizer.is_perturbed
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    grad_scaler.update()  # the refused step had unscaled; the scale stays (no inf)
    assert grad_scaler.get_scale() == twin_scaler.get_scale()
    for opt, mod, sc in ((optimizer, model, grad_scaler), (untouched, twin, twin_scaler)):
        tram.scaled_step(opt, sc, lambda mod=mod: loss_of(mod, *batch(2), torch.float16))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def explicit_scaled_step(
    optimizer: tram.TwoPassOptimizer,
    model: nn.Module,
    grad_scaler: torch.amp.GradScaler,
    step: int,
    *,
    unscale: str,
    grad_scale: bool = True,
    restore: bool = True,
) -> None:
    """The explicit fp16 loop, with ``scaler.unscale_`` (and clipping) where ``unscale`` says:
    ``"before first_step"`` (the usual AMP clipping recipe kept before the ascent),
    ``"after restore"`` (``tram.scaled_step``'s order) or ``"in scaler.step"`` (not called).
    Without ``restore``, ``scaler.step()`` restores (the step after the second backward)."""
    x, y = batch(step)
    optimizer.zero_grad()
    with optimizer.first_pass():
        grad_scaler.scale(loss_of(model, x, y, torch.float16)).backward()
    if unscale == "before first_step":
        grad_scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    if optimizer.first_step(grad_scale=grad_scaler.get_scale() if grad_scale else None):
        grad_scaler.scale(loss_of(model, x, y, torch.float16)).backward()
    if restore:
        optimizer.restore()
    if unscale == "after restore":
        grad_scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    grad_scaler.step(optimizer)
    grad_scaler.update()


@pytest.mark.parametrize("unscale", ["after restore", "in scaler.step"])
@SCALED_WRAPPERS
def test_the_explicit_scaled_loop_is_scaled_step(make: Callable, unscale: str) -> None:
    """``restore()``, then ``unscale_`` (and clipping) or none (``scaler.step`` unscales): the
    explicit loop takes ``tram.scaled_step``'s steps, bit for bit."""
    model, twin = make_model(), make_model()
    optimizer = make(torch.optim.SGD(model.parameters(), lr=0.1), model)
    reference = make(torch.optim.SGD(twin.parameters(), lr=0.1), twin)
    grad_scaler, twin_scaler = scaler(), scaler()
    for step in range(2):
        explicit_scaled_step(optimizer, model, grad_scaler, step, unscale=unscale)
        x, y = batch(step)
        tram.scaled_step(
            reference,
            twin_scaler,
            lambda x=x, y=y: loss_of(twin, x, y, torch.float16),
            max_grad_norm=10.0 if unscale == "after restore" else None,
        )
    assert optimizer.steps == 2
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


@SCALED_WRAPPERS
def test_unscaling_before_the_second_pass_is_refused_at_the_scalers_step(make: Callable) -> None:
    """The usual AMP clipping recipe kept before the ascent, in a scaler's first step:
    ``scaler.unscale_(optimizer)`` and clipping after the first backward, then
    ``first_step()``, the second backward, ``restore()`` and ``scaler.step()``. The scaler
    unscales once per step, so the second pass's gradients reached the base step still scaled:
    SGD stepped 4096 times too far, silently. ``first_step()`` has not met this scaler yet, so
    the refusal comes at ``scaler.step()``, the weights at θ; after ``scaler.update()`` the next
    step is a fresh run's."""
    model, twin = make_model(), make_model()
    optimizer = make(torch.optim.SGD(model.parameters(), lr=0.1), model)
    untouched = make(torch.optim.SGD(twin.parameters(), lr=0.1), twin)
    grad_scaler, twin_scaler = scaler(), scaler()
    before = weights(model)
    with pytest.raises(
        RuntimeError,
        match=r"no gradient was unscaled after restore\(\).*by 4096.*call scaler\.update\(\)",
    ):
        explicit_scaled_step(
            optimizer, model, grad_scaler, 0, unscale="before first_step", grad_scale=False
        )
    assert optimizer.steps == 0
    assert not optimizer.is_perturbed
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    grad_scaler.update()
    for step in (1, 2):
        for opt, mod, sc in ((optimizer, model, grad_scaler), (untouched, twin, twin_scaler)):
            explicit_scaled_step(opt, mod, sc, step, unscale="after restore")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("restore", [True, False], ids=["restore", "no-restore"])
@SCALED_WRAPPERS
def test_unscaling_before_the_ascent_is_refused_at_first_step(
    make: Callable, restore: bool
) -> None:
    """The same recipe after a scaler's first step, whether or not ``restore()`` comes before
    ``scaler.step()`` (without it nothing sampled the gradient after the second pass, and
    the step went 4096 times too far, silently): ``first_step()`` asks the scaler last seen
    stepping whether it has unscaled already, and refuses before moving anything. The
    gradients are left as they were; after ``scaler.update()`` the loop in the right order
    takes the reference's steps."""
    model, twin = make_model(), make_model()
    optimizer = make(torch.optim.SGD(model.parameters(), lr=0.1), model)
    untouched = make(torch.optim.SGD(twin.parameters(), lr=0.1), twin)
    grad_scaler, twin_scaler = scaler(), scaler()
    for opt, mod, sc in ((optimizer, model, grad_scaler), (untouched, twin, twin_scaler)):
        explicit_scaled_step(opt, mod, sc, 0, unscale="after restore", restore=restore)
    before = weights(model)
    with pytest.raises(
        RuntimeError,
        match=r"first_step\(\) after scaler\.unscale_\(optimizer\) in the same step.*"
        r"by 4096.*call scaler\.update\(\)",
    ) as refused:
        explicit_scaled_step(
            optimizer, model, grad_scaler, 1, unscale="before first_step", restore=restore
        )
    assert type(optimizer).__name__ in str(refused.value)
    assert optimizer.steps == 1
    assert not optimizer.is_perturbed
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    grad_scaler.update()
    for step in (2, 3):
        for opt, mod, sc in ((optimizer, model, grad_scaler), (untouched, twin, twin_scaler)):
            explicit_scaled_step(opt, mod, sc, step, unscale="after restore", restore=restore)
    assert optimizer.steps == 3
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_a_scaler_first_met_on_an_off_step_is_remembered() -> None:
    """A run resumed with a new ``GradScaler`` whose first step is an ``ascent_every``
    off-step: that step had no ascent to check, but the scaler it met is the one the next
    ``first_step()`` asks."""
    model = make_model()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=RHO, ascent_every=2)
    x, y = batch(0)

    def closure() -> Tensor:  # before the resume: fp32
        loss = loss_of(model, x, y, None)
        loss.backward()
        return loss

    optimizer.step(closure)
    grad_scaler = scaler()
    explicit_scaled_step(optimizer, model, grad_scaler, 1, unscale="after restore")
    assert optimizer.steps == 2
    with pytest.raises(RuntimeError, match=r"after scaler\.unscale_\(optimizer\).*by 4096"):
        explicit_scaled_step(optimizer, model, grad_scaler, 2, unscale="before first_step")
    assert not optimizer.is_perturbed


def test_unscaling_before_an_off_step_is_the_base_step() -> None:
    """On an ``ascent_every`` off-step ``first_step()`` moves nothing and the base step takes
    the first pass's gradient, which the early ``unscale_`` unscaled once, as it must: accepted,
    and the step is the base optimizer's under the same scaler."""
    model, twin = make_model(), make_model()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=RHO, ascent_every=2)
    base = torch.optim.SGD(twin.parameters(), lr=0.1)
    grad_scaler, twin_scaler = scaler(), scaler()
    explicit_scaled_step(optimizer, model, grad_scaler, 0, unscale="after restore")
    hand_sam_step(twin, base, *batch(0), grad_scaler=twin_scaler)
    explicit_scaled_step(optimizer, model, grad_scaler, 1, unscale="before first_step")
    x, y = batch(1)
    base.zero_grad()
    twin_scaler.scale(loss_of(twin, x, y, torch.float16)).backward()
    twin_scaler.unscale_(base)
    torch.nn.utils.clip_grad_norm_(twin.parameters(), 10.0)
    twin_scaler.step(base)
    twin_scaler.update()
    assert optimizer.steps == 2
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_the_scalers_private_stage_names_exist() -> None:
    """``first_step()`` reads a ``GradScaler``'s stage per optimizer from the private
    ``_per_optimizer_states`` (keyed by ``id``) and ``OptState.UNSCALED``: renamed in a torch
    release, the refusal above would go quiet, so this fails first."""
    from torch.amp.grad_scaler import OptState

    from tram._callers import has_unscaled

    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    grad_scaler = scaler()
    grad_scaler.scale(loss_of(model, *batch(0), torch.float16)).backward()
    assert not has_unscaled(grad_scaler, id(base))
    assert id(base) not in grad_scaler._per_optimizer_states  # get() created no entry
    grad_scaler.unscale_(base)
    assert grad_scaler._per_optimizer_states[id(base)]["stage"] is OptState.UNSCALED
    assert has_unscaled(grad_scaler, id(base))
    grad_scaler.step(base)
    assert not has_unscaled(grad_scaler, id(base))
    grad_scaler.update()
    assert not has_unscaled(grad_scaler, id(base))


def test_a_fisher_ascent_without_grad_scale_is_refused_at_the_scalers_step() -> None:
    """Fisher SAM's T = (1 + η g²)^(-1/2) depends on the gradient's scale: an explicit fp16
    loop without ``first_step(grad_scale=scaler.get_scale())`` ascended along T of the 4096
    times scaled gradient (cosine 0.08 to the Fisher ε in the case measured), silently. Refused
    at ``scaler.step()``; SAM's and ASAM's operators do not depend on the scale and pass."""
    model = make_model()
    optimizer = tram.FisherSAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1, eta=0.3)
    grad_scaler = scaler()
    before = weights(model)
    with pytest.raises(RuntimeError, match=r"first_step\(\) was called without grad_scale.*4096"):
        explicit_scaled_step(
            optimizer, model, grad_scaler, 0, unscale="after restore", grad_scale=False
        )
    assert optimizer.steps == 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    grad_scaler.update()
    for make in (
        lambda m: tram.SAM(torch.optim.SGD(m.parameters(), lr=0.1), rho=RHO),
        lambda m: tram.ASAM(torch.optim.SGD(m.parameters(), lr=0.1), rho=0.4, eta=0.02),
    ):
        plain = make_model()
        accepted = make(plain)
        explicit_scaled_step(
            accepted, plain, scaler(), 0, unscale="after restore", grad_scale=False
        )
        assert accepted.steps == 1


@pytest.mark.parametrize("by_keyword", [False, True], ids=["positional", "keyword"])
def test_a_disabled_grad_scalers_step_with_a_closure_is_the_closure_step(by_keyword: bool) -> None:
    """``GradScaler(enabled=False)`` (the ``enabled=use_amp`` pattern) only calls
    ``optimizer.step(closure)``: nothing is unscaled, so it is accepted and takes the step
    ``step(closure)`` takes, bit for bit."""
    model, twin = make_model(), make_model()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=RHO)
    direct = tram.SAM(torch.optim.SGD(twin.parameters(), lr=0.1), rho=RHO)
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(2):
        closure = closure_for(optimizer, model, *batch(step), None)
        if by_keyword:
            disabled.step(optimizer, closure=closure)
        else:
            disabled.step(optimizer, closure)
        direct.step(closure_for(direct, twin, *batch(step), None))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert optimizer.steps == 2


# ---------------------------------------------------------------------------------- (e)
def closure_for(
    optimizer: torch.optim.Optimizer, model: nn.Module, x: Tensor, y: Tensor, dtype
) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_of(model, x, y, dtype)
        loss.backward()
        return loss

    return closure


def test_bf16_autocast_with_step_closure_matches_fp32() -> None:
    results = {}
    for dtype in (None, torch.bfloat16):
        model = make_model()
        optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=RHO)
        for step in range(3):
            optimizer.step(closure_for(optimizer, model, *batch(step), dtype))
        assert all(
            p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters()
        )
        results[dtype] = weights(model)
    start = weights(make_model())
    for fp32, bf16, w0 in zip(results[None], results[torch.bfloat16], start):
        torch.testing.assert_close(bf16, fp32, rtol=0.0, atol=2e-3)
        # Both moved far more than they differ.
        assert (fp32 - w0).abs().max() > 10 * (bf16 - fp32).abs().max()


# ---------------------------------------------------------------------------------- (f)
def test_max_grad_norm_clips_the_unscaled_second_pass_gradient() -> None:
    lr, max_norm, rho = 1.0, 1e-3, 0.5
    model = make_model()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=lr), rho=rho)
    reference = make_model()
    before = weights(model)
    x, y = batch(0)
    tram.scaled_step(
        optimizer, scaler(), lambda: loss_of(model, x, y, torch.float16), max_grad_norm=max_norm
    )
    _, first, second = hand_sam_step(
        reference, torch.optim.SGD(reference.parameters(), lr=0.0), x, y, rho=rho, grad_scaler=None
    )

    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    g2 = torch.cat([g.flatten() for g in second])
    g1 = torch.cat([g.flatten() for g in first])
    assert g2.norm() > 100 * max_norm  # the clip is active
    assert update.norm().item() == pytest.approx(lr * max_norm, rel=1e-3)
    error = (update + lr * max_norm * g2 / g2.norm()).norm() / update.norm()
    assert error < 1e-3
    # The first-pass gradient points elsewhere: the clip did not act on it.
    assert (update + lr * max_norm * g1 / g1.norm()).norm() / update.norm() > 10 * error
