"""What tram refuses loudly: every way of driving a wrapper takes the two-pass step or says why.

Each test here failed on the library before the guarantee existed: a non-finite second pass that
reached the weights, a TRAM reference forward that updated BatchNorm statistics or ran outside
the caller's autocast, a model "unwrapped" because a child is called ``module``, a wrapper
silently reduced to its base optimizer, a base step on the zeros ``first_step`` left, and a
foreign state dict failing deep inside torch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

import tram
from tests.helpers import (
    assert_same_state,
    counting_backend,
    cross_entropy_closure,
    zero_redundancy_adamw,
)
from tests.wrappers_table import SAM_FAMILY, WRAPPERS, WrapperCase
from tram.targets import unwrap_model

# Every wrapper in the contract table plus TRAM's trust regions, with values that are not fixed
# points of likely mistakes.
TRAM_KWARGS: dict[str, dict[str, Any]] = {
    "noise": {"sigma": 0.3},
    "pretrained": {},
    "previous": {},
    "ema": {"ema_decay": 0.8},
    "fisher": {"sigma": 0.3, "rho": 0.07, "fisher_eta": 0.2},
}


def make_wrapper(name: str, model: nn.Module, base: torch.optim.Optimizer) -> tram.TwoPassOptimizer:
    if name.startswith("TRAM-"):
        region = name.removeprefix("TRAM-")
        return tram.TRAM(base, model, trust_region=region, **TRAM_KWARGS[region])  # type: ignore[arg-type]
    case: WrapperCase = next(case for case in WRAPPERS if case.name == name)
    # Net has a BatchNorm: the SAM family freezes it only when given the model.
    return case.make(base, model=model, bind_model=True)


ALL = [case.name for case in WRAPPERS] + [f"TRAM-{region}" for region in TRAM_KWARGS]
REFERENCE_REGIONS = ["noise", "pretrained", "previous", "ema"]


class Net(nn.Module):
    """Embedding, BatchNorm and a head: exercises noise hooks and running statistics."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(20, 8)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.norm(self.embed(tokens).mean(dim=1)))


def tokens_and_labels(seed: int = 1) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 20, (12, 5), generator=generator), torch.randint(
        0, 3, (12,), generator=generator
    )


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, Tensor]) -> None:
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def train(optimizer: tram.TwoPassOptimizer, model: nn.Module, *, steps: int) -> None:
    closure = cross_entropy_closure(optimizer, model, *tokens_and_labels())
    for _ in range(steps):
        optimizer.step(closure)


# ----------------------------------------------------------------------------- non-finite pass 2
class NanOnSecondPass:
    """A closure whose loss is finite at θ and non-finite at θ+ε."""

    def __init__(self, optimizer: tram.TwoPassOptimizer, model: nn.Module, bad: float) -> None:
        self.optimizer, self.model, self.bad = optimizer, model, bad
        self.tokens, self.labels = tokens_and_labels()

    def loss(self) -> Tensor:
        loss = F.cross_entropy(self.model(self.tokens), self.labels)
        return loss * self.bad if self.optimizer.is_perturbed else loss

    def __call__(self) -> Tensor:
        self.optimizer.zero_grad()
        loss = self.loss()
        loss.backward()
        return loss


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", ALL)
def test_non_finite_second_pass_skips_the_step_in_step_closure(name: str, bad: float) -> None:
    model = Net()
    optimizer = make_wrapper(name, model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    closure = NanOnSecondPass(optimizer, model, bad)
    closure()  # the statistics a step is allowed to change: those of the first pass
    model.load_state_dict(snapshot(Net()))
    before = snapshot(model)
    with pytest.warns(RuntimeWarning, match=r"skipped the base step .* second pass"):
        loss = optimizer.step(closure)
    assert math.isfinite(float(loss.detach()))
    assert optimizer.skipped_steps == 1
    assert optimizer.steps == 0
    assert not optimizer.is_perturbed
    for key, value in model.state_dict().items():
        if "norm." in key:
            continue  # BatchNorm statistics of the first pass are kept, as on any step
        assert torch.equal(value, before[key]), key
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ALL)
def test_non_finite_second_pass_skips_the_step_in_the_explicit_form(name: str) -> None:
    model = Net()
    optimizer = make_wrapper(name, model, torch.optim.SGD(model.parameters(), lr=0.1))
    closure = NanOnSecondPass(optimizer, model, math.nan)
    weights = [p.detach().clone() for p in model.parameters()]
    with optimizer.first_pass():
        closure()
    assert optimizer.first_step()
    closure()
    with pytest.warns(RuntimeWarning, match="second pass"):
        optimizer.second_step()
    assert optimizer.skipped_steps == 1
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p, w)
    # The next step is an ordinary one.
    closure.bad = 1.0
    optimizer.step(closure)
    assert optimizer.steps == 1


def test_non_finite_second_pass_under_a_grad_scaler_skips_with_weights_at_theta() -> None:
    model = Net()
    optimizer = tram.FisherSAM(
        torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, rho=0.07, eta=0.2
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    tokens, labels = tokens_and_labels()
    weights = [p.detach().clone() for p in model.parameters()]

    def loss_fn() -> Tensor:
        loss = F.cross_entropy(model(tokens), labels)
        return loss * math.nan if optimizer.is_perturbed else loss

    tram.scaled_step(optimizer, scaler, loss_fn)
    assert scaler.get_scale() == 128.0  # the scaler saw the overflow and backed off
    assert optimizer.steps == 0
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p, w)


def test_second_pass_gradient_check_costs_one_norm_not_a_copy() -> None:
    """The check reads the gradients; it must not change them (the base step uses them)."""
    model = Net()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.0), model=model, rho=0.05)
    closure = NanOnSecondPass(optimizer, model, 1.0)
    with optimizer.first_pass():
        closure()
    optimizer.first_step()
    closure()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.second_step()
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)


# ------------------------------------------------------------ weights the passes reach differently
class RoutedNet(nn.Module):
    """An embedding and two experts, the second used only where asked (top-k routing, LayerDrop
    and stochastic depth change which weights a pass reaches); ``gate`` joins the output only
    where asked, with a nan gradient and a finite loss (``sqrt`` at 0, times 0)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Embedding(20, 8)
        self.expert = nn.Linear(8, 3)
        self.routed = nn.Linear(8, 3)
        self.gate = nn.Parameter(torch.full((3,), 0.7))

    def forward(self, tokens: Tensor, routed: bool = False, gate: bool = False) -> Tensor:
        hidden = self.embed(tokens).mean(dim=1)
        out = self.expert(hidden)
        if routed:
            out = out + self.routed(hidden)
        if gate:
            out = out + 0.0 * torch.sqrt(self.gate - self.gate)
        return out


def routed_step(
    optimizer: tram.TwoPassOptimizer,
    model: RoutedNet,
    form: str,
    first: dict,
    second: dict,
    *,
    set_to_none: bool = True,
) -> None:
    """One step whose first pass runs ``model(tokens, **first)`` and second ``**second``: by
    ``step(closure)`` (its closure zeroes the gradients) or in the explicit form (no zeroing
    between the passes, as the README's loop and the integrations' replays); every
    ``zero_grad`` with ``set_to_none``."""
    tokens, labels = tokens_and_labels()

    def backward(routing: dict) -> Tensor:
        loss = F.cross_entropy(model(tokens, **routing), labels)
        loss.backward()
        return loss

    if form == "step(closure)":

        def closure() -> Tensor:
            optimizer.zero_grad(set_to_none=set_to_none)
            return backward(second if optimizer.is_perturbed else first)

        optimizer.step(closure)
        return
    optimizer.zero_grad(set_to_none=set_to_none)
    with optimizer.first_pass():
        backward(first)
    if optimizer.first_step():
        backward(second)
    optimizer.second_step()


FORMS = ["step(closure)", "explicit"]


@pytest.mark.parametrize("name", ALL)
def test_a_weight_the_second_pass_does_not_reach_is_left_alone_in_every_form(name: str) -> None:
    """A weight with a gradient at θ and none at θ+ε: ``first_step`` zeroed its gradient in
    place, and the explicit form (no ``zero_grad`` between the passes) used to step it on those
    zeros: AdamW decayed it and created its state, where ``step(closure)`` and the hand loop
    leave it alone. Every form now takes ``step(closure)``'s step, bit for bit."""
    finals = []
    for form in FORMS:
        model = RoutedNet()
        start = model.routed.weight.detach().clone()
        torch.manual_seed(11)  # TRAM's noise streams: the same in both forms
        base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.3)
        optimizer = make_wrapper(name, model, base)
        for _ in range(3):
            routed_step(optimizer, model, form, {"routed": True}, {})
        assert optimizer.steps == 3
        assert torch.equal(model.routed.weight, start), form
        assert model.routed.weight not in base.state, form
        finals.append([p.detach().clone() for p in model.parameters()])
    for explicit, closure in zip(finals[1], finals[0], strict=True):
        assert torch.equal(explicit, closure)


@pytest.mark.parametrize("form", ["step(closure)"])
@pytest.mark.parametrize("name", ALL)
def test_after_zero_grad_without_set_to_none_an_unreached_weight_steps_on_zeros(
    name: str, form: str
) -> None:
    """A closure's ``zero_grad(set_to_none=False)`` keeps a zero gradient on a weight its second
    pass does not reach (frozen mid-run, an expert not routed to), and the base optimizer alone
    would move it by its weight decay and momentum. The wrapper leaves those zeros (it used to
    drop them, so that weight stood still): here AdamW's decoupled decay, ``w ← w·(1 − lr·λ)``
    three times, and its state created. The explicit form zeroes nothing between the passes:
    the weight is left alone there (the test above)."""
    model = RoutedNet()
    expected = model.routed.weight.detach().clone()
    lr, weight_decay = 1e-2, 0.3
    for _ in range(3):
        expected.mul_(1 - lr * weight_decay)
    torch.manual_seed(11)
    base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    optimizer = make_wrapper(name, model, base)
    for _ in range(3):
        routed_step(optimizer, model, form, {"routed": True}, {}, set_to_none=False)
    assert optimizer.steps == 3
    assert torch.equal(model.routed.weight, expected)
    assert torch.equal(base.state[model.routed.weight]["exp_avg"], torch.zeros_like(expected))
    assert model.routed.weight.grad is not None
    assert not model.routed.weight.grad.any()


class Scaled(nn.Module):
    """A parametrization whose backward saves no tensor: a cached value computed at θ gives
    its gradient again at θ+ε without autograd noticing."""

    def forward(self, weight: Tensor) -> Tensor:
        return 1.5 * weight


def parametrized_net() -> Net:
    model = Net()
    parametrize.register_parametrization(model.head, "weight", Scaled())
    return model


def parametrized_step(optimizer: tram.TwoPassOptimizer, model: Net, *, cache_each_pass: bool):
    tokens, labels = tokens_and_labels()

    def closure() -> Tensor:
        optimizer.zero_grad()
        with parametrize.cached() if cache_each_pass else contextlib.nullcontext():
            loss = F.cross_entropy(model(tokens), labels)
        loss.backward()
        return loss

    return optimizer.step(closure)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ALL)
def test_a_step_inside_parametrize_cached_is_refused_before_the_ascent(
    name: str, form: str
) -> None:
    """``parametrize.cached()`` around the whole step: the second pass would reuse the
    parametrized weight computed at θ and take a plain step, silently. ``first_step()`` refuses
    before moving anything, and the step then runs outside the context."""
    model = parametrized_net()
    optimizer = make_wrapper(name, model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    with parametrize.cached(), pytest.raises(RuntimeError, match=r"parametrize\.cached\(\)"):
        routed_step(optimizer, model, form, {}, {})  # type: ignore[arg-type]
    assert not optimizer.is_perturbed
    assert optimizer.steps == 0
    for param, start in zip(model.parameters(), before, strict=True):
        assert torch.equal(param, start)
    routed_step(optimizer, model, form, {}, {})  # type: ignore[arg-type]
    assert optimizer.steps == 1


def test_a_frozen_networks_cached_weights_are_no_reason_to_refuse() -> None:
    """A frozen teacher run inside ``cached()`` around the whole step caches weights without
    gradient: nothing the step moves is reused, and the step goes through."""
    teacher = parametrized_net().requires_grad_(False)
    model = Net()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, model=model)
    tokens, labels = tokens_and_labels()
    with parametrize.cached():
        teacher(tokens)
        optimizer.zero_grad()
        with optimizer.first_pass():
            F.cross_entropy(model(tokens), labels).backward()
        assert optimizer.first_step()
        F.cross_entropy(model(tokens), labels).backward()
        optimizer.second_step()
    assert optimizer.steps == 1


def test_the_parametrize_caches_private_names_exist() -> None:
    """tram._parametrize_cache reads and sets them: a torch that renames them fails here."""
    assert parametrize._cache_enabled == 0
    with parametrize.cached():
        assert parametrize._cache_enabled == 1
        model = parametrized_net()
        assert model.head.weight is parametrize._cache[(id(model.head), "weight")]


@pytest.mark.parametrize("name", ALL)
def test_parametrize_cached_inside_the_closure_is_the_uncached_step(name: str) -> None:
    """Entered around each forward, the cache holds one pass's values: the step is bit for bit
    the one without it."""
    finals = []
    for cache_each_pass in (False, True):
        model = parametrized_net()
        torch.manual_seed(11)
        optimizer = make_wrapper(name, model, torch.optim.SGD(model.parameters(), lr=0.1))
        for _ in range(2):
            parametrized_step(optimizer, model, cache_each_pass=cache_each_pass)
        finals.append([p.detach().clone() for p in model.parameters()])
    for cached, uncached in zip(finals[1], finals[0], strict=True):
        assert torch.equal(cached, uncached)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ALL)
def test_a_non_finite_gradient_on_a_weight_only_the_second_pass_reaches_skips_the_step(
    name: str, form: str
) -> None:
    """The second-pass check covers every gradient, not only the perturbed weights': a weight
    with no gradient at θ (no ascent moved it) used to take its nan into the weights."""
    model = RoutedNet()
    optimizer = make_wrapper(name, model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = snapshot(model)
    with pytest.warns(RuntimeWarning, match=r"skipped the base step .* second pass"):
        routed_step(optimizer, model, form, {}, {"gate": True})
    assert optimizer.skipped_steps == 1
    assert optimizer.steps == 0
    assert_unchanged(model, before)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ALL)
def test_a_batch_with_a_zero_gradient_takes_the_base_step(name: str, form: str) -> None:
    """A flat batch (every margin met, every label masked): the gradient is zero at θ, so
    ε = 0, and zero again at θ+ε. The base step is AdamW's on a zero gradient (its weight decay),
    as without the wrapper; the second-pass check used to read the zeros as a missing second
    backward and raise."""
    model = RoutedNet()
    plain = copy.deepcopy(model)
    start = model.expert.weight.detach().clone()
    optimizer = make_wrapper(
        name, model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.3)
    )
    reference = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.3)
    tokens, _ = tokens_and_labels()

    def flat_closure() -> Tensor:
        optimizer.zero_grad()
        loss = (model(tokens) * 0.0).sum()
        loss.backward()
        return loss

    if form == "step(closure)":
        optimizer.step(flat_closure)
    else:
        with optimizer.first_pass():
            flat_closure()
        assert optimizer.first_step()
        (model(tokens) * 0.0).sum().backward()
        optimizer.second_step()
    (plain(tokens) * 0.0).sum().backward()
    reference.step()
    assert optimizer.steps == 1
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(model.expert.weight, start)  # the weight decay moved it


@pytest.mark.parametrize("name", [case.name for case in SAM_FAMILY])
def test_a_closure_that_backpropagates_a_loss_computed_before_it_is_refused(name: str) -> None:
    """``loss = f(model(x))`` outside, ``closure = lambda: (zero_grad(), loss.backward(
    retain_graph=True), loss)[-1]``: the second backward runs through the graph built at θ.
    On a linear model autograd saves no weight for it, so it silently gave the first pass's
    gradient and a plain base step (MLPs get autograd's in-place error instead; TRAM refuses
    it at ``first_step``, its first pass having recorded no forward)."""
    torch.manual_seed(4)
    model = nn.Linear(5, 3)
    optimizer = make_wrapper(name, model, torch.optim.SGD(model.parameters(), lr=0.1))
    inputs, labels = torch.randn(8, 5), torch.randint(0, 3, (8,))
    before = snapshot(model)
    loss = F.cross_entropy(model(inputs), labels)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss.backward(retain_graph=True)
        return loss

    with pytest.raises(RuntimeError, match="second call returned its first call's loss"):
        optimizer.step(closure)
    assert optimizer.steps == 0
    assert not optimizer.is_perturbed
    assert_unchanged(model, before)
    optimizer.step(cross_entropy_closure(optimizer, model, inputs, labels))  # and then trains
    assert optimizer.steps == 1
    placeholder = torch.zeros(())  # one tensor returned by both calls, with no graph: accepted

    def placeholder_closure() -> Tensor:
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        return placeholder

    optimizer.step(placeholder_closure)
    assert optimizer.steps == 2


# ----------------------------------------------------------------------------- no second backward
@pytest.mark.parametrize("set_to_none", [False, True])
@pytest.mark.parametrize("name", ALL)
def test_second_step_without_a_second_backward_raises(name: str, set_to_none: bool) -> None:
    model = Net()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.3)
    optimizer = make_wrapper(name, model, base)
    closure = NanOnSecondPass(optimizer, model, 1.0)
    weights = [p.detach().clone() for p in model.parameters()]
    with optimizer.first_pass():
        closure()
    assert optimizer.first_step()
    optimizer.zero_grad(set_to_none=set_to_none)
    with pytest.raises(RuntimeError, match="no gradient from a second pass"):
        optimizer.second_step()
    assert not optimizer.is_perturbed
    assert optimizer.steps == 0
    assert not base.state  # AdamW never stepped: no weight decay on a zero gradient
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p, w)


def test_restore_then_step_without_a_second_backward_raises() -> None:
    """The GradScaler recipe's order (restore, then step()) is checked the same way."""
    model = Net()
    optimizer = tram.SAM(
        torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.3), model=model
    )
    NanOnSecondPass(optimizer, model, 1.0)()
    assert optimizer.first_step()
    optimizer.restore()
    with pytest.raises(RuntimeError, match="no gradient from a second pass"):
        optimizer.step()


# ----------------------------------------------------------------------------- driven by step()
def test_step_without_ascent_is_refused_with_the_fix() -> None:
    model = Net()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    tokens, labels = tokens_and_labels()
    F.cross_entropy(model(tokens), labels).backward()
    before = [p.detach().clone() for p in model.parameters()]
    gradients = [p.grad.clone() for p in model.parameters()]
    for _ in range(2):  # every time, not once
        with pytest.raises(tram.MissingAscentError) as raised:
            optimizer.step()
        message = str(raised.value)
        assert "plain SGD step, so no step was taken" in message
        assert "TramTrainer" in message
        assert "step(closure)" in message
    assert isinstance(raised.value, RuntimeError)
    assert optimizer.steps == 0
    for p, b, g in zip(model.parameters(), before, gradients):
        assert torch.equal(p, b)
        assert torch.equal(p.grad, g)
    # The refused step is not half-taken: the next step(closure) is the ordinary two-pass one.
    optimizer.step(NanOnSecondPass(optimizer, model, 1.0))
    assert optimizer.steps == 1


@pytest.mark.parametrize(
    "drive",
    ["step_closure", "explicit", "explicit_skipped_ascent", "off_step"],
)
def test_the_supported_forms_are_not_refused(drive: str) -> None:
    model = Net()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), model=model, ascent_every=2)
    closure = NanOnSecondPass(optimizer, model, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step(closure)  # step 0: an ascent step
        if drive == "step_closure":
            optimizer.step(closure)
        elif drive == "off_step":
            closure()
            optimizer.step()  # step 1 is an off-step: no ascent was due
        else:
            optimizer.step(closure)  # step 1 off, step 2 due
            closure()
            if drive == "explicit_skipped_ascent":
                for p in model.parameters():
                    p.grad.fill_(math.nan)
                with pytest.warns(RuntimeWarning):
                    perturbed = optimizer.first_step()
                assert not perturbed
                with pytest.warns(RuntimeWarning):
                    optimizer.second_step()
            else:
                assert optimizer.first_step()
                closure()
                optimizer.second_step()


def test_grad_scaler_step_alone_is_refused() -> None:
    model = Net()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    tokens, labels = tokens_and_labels()
    scaler.scale(F.cross_entropy(model(tokens), labels)).backward()
    with pytest.raises(tram.MissingAscentError, match=r"tram\.scaled_step"):
        scaler.step(optimizer)


def test_plain_hf_trainer_given_a_wrapper_is_refused_naming_tram_trainer(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net()

        def forward(self, tokens: Tensor, labels: Tensor) -> dict[str, Tensor]:
            logits = self.net(tokens)
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    tokens, labels = tokens_and_labels()
    data = [{"tokens": t, "labels": y} for t, y in zip(tokens, labels, strict=True)]
    model = Model()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, optimizers=(optimizer, scheduler)
    )
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(tram.MissingAscentError, match="TramTrainer"):
        trainer.train()
    assert optimizer.steps == 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# ----------------------------------------------------------------------------- TRAM's reference
@pytest.mark.parametrize("region", REFERENCE_REGIONS)
def test_tram_reference_forward_leaves_batchnorm_statistics_alone(region: str) -> None:
    model = Net()
    plain = copy.deepcopy(model)
    optimizer = tram.TRAM(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model,
        trust_region=region,
        **TRAM_KWARGS[region],
    )
    tokens, labels = tokens_and_labels()
    F.cross_entropy(plain(tokens), labels)  # one forward at θ: the statistics a step may keep

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(tokens), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert int(model.norm.num_batches_tracked) == 1
    torch.testing.assert_close(model.norm.running_mean, plain.norm.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(model.norm.running_var, plain.norm.running_var, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("region", "kwargs"),
    [("noise", {"sigma": 0.0}), ("pretrained", {}), ("previous", {}), ("ema", {"ema_decay": 0.8})],
)
def test_tram_reference_runs_under_the_callers_autocast(region: str, kwargs: dict) -> None:
    """At the first step every target equals the model: d must be exactly zero under bf16."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 16), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 5))
    optimizer = tram.TRAM(
        torch.optim.SGD(model.parameters(), lr=0.1), model, trust_region=region, **kwargs
    )
    tokens = torch.randint(0, 30, (8, 6))
    labels = torch.randint(0, 5, (8, 6))

    def closure() -> Tensor:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens)
        loss = F.cross_entropy(logits.float().reshape(-1, 5), labels.reshape(-1))
        loss.backward()
        return loss

    optimizer.step(closure)
    assert optimizer.last_radius == 0.0


# ----------------------------------------------------------------------------- unwrapping
class NamedModule(nn.Module):
    """A model whose body happens to be called ``module``: it is not a wrapper."""

    def __init__(self, body_name: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        setattr(self, body_name, nn.Embedding(20, 8))
        self.body_name = body_name
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(getattr(self, self.body_name)(tokens).mean(dim=1))


@pytest.mark.parametrize("region", ["noise", "pretrained", "previous", "ema"])
def test_a_child_called_module_trains_like_any_other_name(region: str) -> None:
    runs = {}
    for body_name in ("module", "body"):
        model = NamedModule(body_name)
        optimizer = tram.TRAM(
            torch.optim.SGD(model.parameters(), lr=0.5),
            model,
            trust_region=region,
            **TRAM_KWARGS[region],
        )
        assert optimizer.module is model
        train(optimizer, model, steps=3)
        runs[body_name] = (list(optimizer.radius_history), [p.detach() for p in model.parameters()])
    assert runs["module"][0] == runs["body"][0]
    assert runs["module"][0][-1] > 0
    for a, b in zip(runs["module"][1], runs["body"][1], strict=True):
        assert torch.equal(a, b)


def test_unwrap_model_unwraps_real_wrappers_only() -> None:
    inner = nn.Linear(3, 2)
    assert unwrap_model(nn.DataParallel(nn.DataParallel(inner))) is inner
    named = NamedModule("module")
    assert unwrap_model(named) is named
    reference = tram.ReferenceWeights(named)
    assert reference.names == ["module.weight", "head.weight", "head.bias"]


def test_unwrap_model_unwraps_torch_compile() -> None:
    inner = nn.Linear(3, 2)
    compiled = torch.compile(inner, backend="eager")
    assert unwrap_model(compiled) is inner


# ----------------------------------------------------------------------------- explicit form
def test_step_closure_after_first_step_with_a_loss_refuses() -> None:
    model = Net()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    closure = NanOnSecondPass(optimizer, model, 1.0)
    weights = [p.detach().clone() for p in model.parameters()]
    closure()
    assert optimizer.first_step()
    closure()
    with pytest.raises(RuntimeError, match="closure returned a loss"):
        optimizer.step(closure)
    assert not optimizer.is_perturbed
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p, w)


def test_step_with_a_hooks_only_closure_finishes_the_explicit_step() -> None:
    """Lightning's manual optimization calls step(closure) with a closure that returns None."""
    runs = []
    for finish in ("second_step", "hooks_closure"):
        model = Net()
        optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), model=model, rho=0.07)
        closure = NanOnSecondPass(optimizer, model, 1.0)
        calls: list[int] = []
        closure()
        assert optimizer.first_step()
        closure()
        if finish == "second_step":
            optimizer.second_step()
        else:
            assert optimizer.step(functools.partial(calls.append, 1)) is None
            assert calls == [1]
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_state_is_shared_by_copies_of_the_wrappers_dict() -> None:
    """A proxy that copies the optimizer's __dict__ (as Lightning's does) shares one state."""
    model = Net()
    optimizer = tram.TRAM(torch.optim.SGD(model.parameters(), lr=0.1), model, sigma=0.3)
    proxy = object.__new__(type(optimizer))
    proxy.__dict__ = dict(optimizer.__dict__)
    closure = NanOnSecondPass(optimizer, model, 1.0)
    with proxy.first_pass():
        closure()
    assert proxy.first_step()
    assert optimizer.is_perturbed
    assert optimizer.last_radius == proxy.last_radius
    optimizer.restore()
    assert not proxy.is_perturbed


# ----------------------------------------------------------------------------- state dicts
def test_a_davda54_sam_state_dict_is_refused_with_what_to_do() -> None:
    model = Net()
    optimizer = tram.SAM(torch.optim.AdamW(model.parameters(), lr=1e-2), model=model)
    foreign = {
        "state": {i: {"old_p": p.detach().clone()} for i, p in enumerate(model.parameters())},
        "param_groups": [
            {"rho": 0.05, "adaptive": False, "lr": 1e-2, "params": list(range(4))},
        ],
    }
    with pytest.raises(ValueError, match=r"'old_p'.*base_optimizer\.load_state_dict"):
        optimizer.load_state_dict(foreign)


def test_resuming_with_another_rho_says_the_checkpoints_is_used() -> None:
    """torch's load_state_dict restores every saved hyperparameter: a run resumed with another
    rho trains with the checkpoint's. Kept (torch's contract), but said; repr shows it too."""
    model = Net()
    first = tram.ASAM(torch.optim.SGD(model.parameters(), lr=0.1), model=model, rho=0.05, eta=0.03)
    first.step(NanOnSecondPass(first, model, 1.0))
    state = first.state_dict()
    resumed = tram.ASAM(torch.optim.SGD(model.parameters(), lr=0.1), model=model, rho=0.2, eta=0.03)
    with pytest.warns(UserWarning, match=r"rho=0.2 -> 0.05 \(param group 0\)"):
        resumed.load_state_dict(state)
    assert resumed.param_groups[0]["rho"] == 0.05
    assert "rho=0.05" in repr(resumed)
    same = tram.ASAM(torch.optim.SGD(model.parameters(), lr=0.1), model=model, rho=0.05, eta=0.03)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(state)


def test_distributed_checkpoint_state_dicts_resume_exactly() -> None:
    """torch.distributed.checkpoint's optimizer state dict (the one accelerate and Lightning use
    under FSDP2) keeps 'state' and 'param_groups' only, with every key of every group: tram's
    own state rides in the first group, so the step counter survives and the next steps are the
    uninterrupted run's. (Sharded, two processes: tests/test_distributed.py.)"""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    def run(optimizer: tram.SAM, model: nn.Module, steps: int) -> None:
        for _ in range(steps):
            optimizer.step(NanOnSecondPass(optimizer, model, 1.0))

    model = Net()
    optimizer = tram.SAM(
        torch.optim.AdamW(model.parameters(), lr=0.1), model=model, rho=0.05, ascent_every=2
    )
    run(optimizer, model, 3)
    saved = get_optimizer_state_dict(model, optimizer)
    assert set(saved) == {"state", "param_groups"}
    # Through a file, as a resume reads it: the dict shares its tensors with the optimizer.
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = copy.deepcopy(model)  # a resumed process: no gradients yet, no optimizer state
    for param in fresh.parameters():
        param.grad = None
    resumed = tram.SAM(
        torch.optim.AdamW(fresh.parameters(), lr=0.1), model=fresh, rho=0.05, ascent_every=2
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_optimizer_state_dict(fresh, resumed, saved)
    # Its zero-gradient, lr-0 step() that creates AdamW's state is not a training step.
    assert resumed.steps == optimizer.steps == 3
    assert "tram" not in resumed.param_groups[0]
    run(optimizer, model, 2)
    run(resumed, fresh, 2)
    for straight, again in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(straight, again)


def test_a_state_dict_without_trams_state_says_the_resume_is_not_exact() -> None:
    """A base optimizer's state dict, or torch.distributed.checkpoint's flattened one (which
    keeps only the keys the live param groups have), loads the base state and says that the
    step counter and TRAM's target state were not restored."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model = Net()
    optimizer = tram.SAM(torch.optim.AdamW(model.parameters(), lr=0.1), model=model, rho=0.05)
    for _ in range(2):
        optimizer.step(NanOnSecondPass(optimizer, model, 1.0))
    flattened = StateDictOptions(flatten_optimizer_state_dict=True)
    saved = get_optimizer_state_dict(model, optimizer, options=flattened)
    fresh = Net()
    resumed = tram.SAM(torch.optim.AdamW(fresh.parameters(), lr=0.1), model=fresh, rho=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_optimizer_state_dict(fresh, resumed, saved, options=flattened)
    assert [str(w.message).split(".load_state_dict")[0] for w in caught] == ["SAM"]
    assert "without tram's own state" in str(caught[0].message)
    assert "flatten_optimizer_state_dict=True" in str(caught[0].message)
    assert resumed.steps == 0
    with pytest.warns(UserWarning, match="without tram's own state"):
        resumed.load_state_dict(optimizer.base_optimizer.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(optimizer.state_dict())  # tram's own: exact, nothing to say
    assert resumed.steps == 2


def test_trams_state_saved_again_by_a_plain_optimizer_that_stepped_is_ignored() -> None:
    """A TRAM checkpoint loaded into a plain AdamW (switching TRAM off) leaves tram's entry in
    its param groups, and the AdamW's next checkpoint carries it again: after AdamW's own
    steps, its θt−1 and step counter are stale. Loaded back into TRAM, the entry is ignored
    with a warning, as a missing one is; before, it was loaded silently (θt−1 three steps old).
    Saved again before any plain step, it still describes the base state and loads."""
    model = Net()
    optimizer = tram.TRAM(
        torch.optim.AdamW(model.parameters(), lr=0.1), model, trust_region="previous"
    )
    for _ in range(2):
        optimizer.step(NanOnSecondPass(optimizer, model, 1.0))
    plain = torch.optim.AdamW(model.parameters(), lr=0.1)
    plain.load_state_dict(optimizer.state_dict())
    untouched = copy.deepcopy(plain.state_dict())
    tokens, labels = tokens_and_labels()
    for _ in range(3):
        plain.zero_grad()
        F.cross_entropy(model(tokens), labels).backward()
        plain.step()
    stepped = plain.state_dict()
    assert "tram" in stepped["param_groups"][0]  # torch kept it in the live group

    resumed = tram.TRAM(
        torch.optim.AdamW(model.parameters(), lr=0.1), model, trust_region="previous"
    )
    with pytest.warns(UserWarning, match=r"ignored tram's own state .* had taken 2 steps.* 5"):
        resumed.load_state_dict(stepped)
    assert resumed.steps == 0
    for reference, weight in zip(resumed.reference.tensors.values(), model.parameters()):
        assert torch.equal(reference, weight)  # θt−1 built from the weights, not the stale one
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(untouched)
    assert resumed.steps == 2


def test_checkpoints_of_earlier_versions_load() -> None:
    """Checkpoints of earlier versions kept the wrapper's state beside 'state' and
    'param_groups'; such a checkpoint loads exactly, and one that holds the entry twice is
    refused rather than guessed at."""
    model = Net()
    optimizer = tram.SAM(
        torch.optim.SGD(model.parameters(), lr=0.1), model=model, rho=0.05, ascent_every=3
    )
    for _ in range(2):
        optimizer.step(NanOnSecondPass(optimizer, model, 1.0))
    current = optimizer.state_dict()
    earlier = {
        "state": current["state"],
        "param_groups": [
            {k: v for k, v in g.items() if k != "tram"} for g in current["param_groups"]
        ],
        "tram": current["param_groups"][0]["tram"],
    }
    resumed = tram.SAM(torch.optim.SGD(Net().parameters(), lr=0.1), rho=0.05, ascent_every=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(earlier)
    assert resumed.steps == 2
    assert "tram" not in resumed.param_groups[0]
    twice = {**current, "tram": current["param_groups"][0]["tram"]}
    with pytest.raises(ValueError, match=r"tram's own state \('tram'\) 2 times"):
        resumed.load_state_dict(twice)


def test_local_ascent_refuses_a_static_graph_ddp(one_process_group: None) -> None:
    """DDP(static_graph=True) cannot run a backward under no_sync(); its reducer would fail on
    an internal assert in the middle of the step. Refused before the first forward."""
    model = Net()
    static = nn.parallel.DistributedDataParallel(model, static_graph=True)
    optimizer = tram.SAM(
        torch.optim.SGD(model.parameters(), lr=0.1), model=static, local_ascent=True
    )
    with pytest.raises(ValueError, match=r"static_graph=True"), optimizer.first_pass():
        pass
    dynamic = nn.parallel.DistributedDataParallel(Net())
    other = tram.SAM(
        torch.optim.SGD(dynamic.parameters(), lr=0.1), model=dynamic, local_ascent=True
    )
    with other.first_pass():
        pass


@pytest.mark.parametrize("method", ["ASAM", "FisherSAM"])
def test_an_eta_set_after_construction_is_checked_where_it_is_used(method: str) -> None:
    """A group added through the base optimizer (or a schedule) skips the constructor's checks:
    a negative eta would make |θ| + η zero or negative for some weights."""
    model = Net()
    base = torch.optim.SGD(list(model.parameters())[:-1], lr=0.1)
    optimizer = getattr(tram, method)(base, eta=0.01)
    base.add_param_group({"params": [list(model.parameters())[-1]], "eta": -0.5})
    NanOnSecondPass(optimizer, model, 1.0)()
    with pytest.raises(ValueError, match=r"Invalid eta: -0\.5"):
        optimizer.first_step()


class WiderHead(Net):
    """Net's parameter names with another head shape."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 4)


REFUSED_LOADS: dict[str, tuple[Callable[[], nn.Module], dict[str, Any], dict[str, Any], str]] = {
    # name: (model saved from, saved TRAM options, loading TRAM options, error)
    "another target": (Net, {"trust_region": "noise"}, {"trust_region": "pretrained"}, "target"),
    "other shapes": (
        WiderHead,
        {"trust_region": "pretrained"},
        {"trust_region": "pretrained"},
        "shapes",
    ),
    "an earlier noise state": (
        Net,
        {"trust_region": "noise"},
        {"trust_region": "noise"},
        "noise_draws",
    ),
    "a noise state without its seed, into a stream whose seed was left out": (
        Net,
        {"trust_region": "noise"},
        {"trust_region": "noise"},
        "noise_seed",
    ),
}


def consolidated_state_dict(optimizer: tram.TwoPassOptimizer) -> dict[str, Any]:
    """``optimizer.state_dict()``, its ``ZeroRedundancyOptimizer`` base consolidated first."""
    consolidate = getattr(optimizer, "consolidate_state_dict", None)
    if consolidate is not None:
        consolidate(to=0)
    return optimizer.state_dict()


@pytest.mark.parametrize("base_kind", ["AdamW", "ZeroRedundancyOptimizer"])
@pytest.mark.parametrize("refusal", list(REFUSED_LOADS))
def test_a_refused_state_dict_leaves_the_optimizer_as_it_was(
    refusal: str, base_kind: str, request: pytest.FixtureRequest
) -> None:
    """tram's own part of a state dict is checked after torch loaded the base optimizer's part
    (torch checks its own first). Before, a refusal there left the base optimizer with the
    checkpoint's moments and step counts (of wrong shapes, for a model of other shapes) under
    this optimizer's target: a caller that caught the error and trained on ("resume if you
    can") trained from a mix. Now the optimizer is as it was, and trains as its untouched twin,
    bit for bit; also over a ZeroRedundancyOptimizer (one rank), whose load writes into its
    local optimizer in place."""
    source, saved_options, options, error = REFUSED_LOADS[refusal]
    if base_kind == "ZeroRedundancyOptimizer":
        request.getfixturevalue("one_process_group")

    def build(model: nn.Module, kwargs: dict[str, Any]) -> tram.TwoPassOptimizer:
        if base_kind == "AdamW":
            base = torch.optim.AdamW(model.parameters(), lr=1e-2)
        else:
            base = zero_redundancy_adamw(model.parameters(), lr=1e-2)
        return tram.TRAM(base, model, **{**TRAM_KWARGS[kwargs["trust_region"]], **kwargs})

    saved_model = source()
    saved_optimizer = build(saved_model, saved_options)
    train(saved_optimizer, saved_model, steps=2)
    checkpoint = consolidated_state_dict(saved_optimizer)
    if refusal == "an earlier noise state":
        entry = checkpoint["param_groups"][0]["tram"]
        entry["generator"] = torch.Generator().get_state()
        del entry["noise_draws"]
    if refusal.startswith("a noise state without its seed"):
        del checkpoint["param_groups"][0]["tram"]["noise_seed"]
    model, twin = Net(), Net()
    optimizer, untouched = build(model, options), build(twin, options)
    train(optimizer, model, steps=1)
    train(untouched, twin, steps=1)
    before = copy.deepcopy(consolidated_state_dict(optimizer))
    with pytest.raises((ValueError, KeyError), match=error):
        optimizer.load_state_dict(checkpoint)
    assert_same_state(consolidated_state_dict(optimizer), before)
    assert optimizer.param_groups is optimizer.base_optimizer.param_groups
    train(optimizer, model, steps=2)
    train(untouched, twin, steps=2)
    for (key, got), want in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(got, want), key
    assert_same_state(consolidated_state_dict(optimizer), consolidated_state_dict(untouched))


def test_a_state_dict_of_another_shape_is_refused() -> None:
    model = Net()
    optimizer = tram.SAM(torch.optim.AdamW(model.parameters(), lr=1e-2), model=model)
    with pytest.raises(ValueError, match=r"Invalid state_dict: .*keys \['model'\]"):
        optimizer.load_state_dict({"model": model.state_dict()})


# ----------------------------------------------------------------------------- first_step raising
@pytest.mark.parametrize("name", ["SAM", "ASAM", "FisherSAM"])
def test_a_first_step_that_raises_forgets_the_step(name: str) -> None:
    """A rho below 0 set after construction (a group added through the base optimizer, or a
    schedule) is refused where it is used, by first_step(). The refusal leaves nothing behind:
    the weights at θ, and a step() without a new first pass refused as one without an ascent.
    Before, that step() took a plain base step along the first pass's gradient. Once the value
    is fixed, step(closure) takes the step a fresh wrapper takes, bit for bit."""

    def build(model: Net, rho: float) -> tuple[tram.TwoPassOptimizer, torch.optim.Optimizer]:
        params = list(model.parameters())
        base = torch.optim.SGD(params[:-1], lr=0.1, momentum=0.9)
        optimizer = make_wrapper(name, model, base)
        base.add_param_group({"params": params[-1:], "rho": rho})
        return optimizer, base

    model = Net()
    optimizer, base = build(model, -0.5)
    closure = NanOnSecondPass(optimizer, model, 1.0)  # finite in both passes
    closure()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Invalid rho: -0\.5"):
        optimizer.first_step()
    assert not optimizer.is_perturbed
    assert_unchanged(model, before)
    with pytest.raises(tram.MissingAscentError):
        optimizer.step()
    assert_unchanged(model, before)
    assert not base.state  # no base step was taken
    base.param_groups[1]["rho"] = 0.02
    optimizer.step(closure)
    fresh = Net()
    fresh.load_state_dict(before)
    reference, _ = build(fresh, 0.02)
    reference.step(NanOnSecondPass(reference, fresh, 1.0))
    for (key, got), want in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(got, want), key


def test_an_ascent_that_raises_part_way_puts_the_moved_weights_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Out of memory in the second bucket's ascent (injected into tram's own ascent function),
    after the first bucket's weights moved: they are put back to θ, and the step is forgotten
    as above."""
    import tram._wrapper as wrapper_module

    model = Net()
    params = list(model.parameters())
    base = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:], "rho": 0.02}], lr=0.1)
    optimizer = tram.SAM(base, rho=0.07, model=model)
    real_ascent = wrapper_module.apply_ascent_
    calls: list[int] = []

    def ascent_out_of_memory_at_the_second_bucket(*args: Any, **kwargs: Any) -> None:
        calls.append(len(calls))
        if len(calls) == 2:
            raise torch.OutOfMemoryError("injected: out of memory")
        real_ascent(*args, **kwargs)

    monkeypatch.setattr(wrapper_module, "apply_ascent_", ascent_out_of_memory_at_the_second_bucket)
    assert_a_raising_first_step_is_forgotten(
        optimizer, model, torch.OutOfMemoryError, match="injected"
    )
    assert calls == [0, 1]  # the first bucket had moved


def assert_a_raising_first_step_is_forgotten(
    optimizer: tram.TwoPassOptimizer,
    model: nn.Module,
    error: type[BaseException],
    match: str | None = None,
) -> None:
    """After a first pass, first_step() raises ``error`` (its message matching ``match``) with
    the weights at θ, and a step() that follows is refused and moves nothing."""
    NanOnSecondPass(optimizer, model, 1.0)()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        optimizer.first_step()
    assert not optimizer.is_perturbed
    assert_unchanged(model, before)
    with pytest.raises(tram.MissingAscentError):
        optimizer.step()
    assert_unchanged(model, before)


def test_an_ascent_interrupted_inside_a_bucket_puts_its_weights_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A KeyboardInterrupt between two weights of one bucket's ascent (the loop path, foreach
    off), after the first had moved: the bucket is put back to θ (every backup already held θ)
    and the step is forgotten. Before, the moved weight stayed at θ+ε: a checkpoint written on
    the interrupt (Lightning's OnExceptionCheckpoint) would have saved it."""
    import tram._wrapper as wrapper_module

    model = Net()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = tram.SAM(base, rho=0.07, model=model, foreach=False)
    real_ascent, real_add = wrapper_module.apply_ascent_, torch.Tensor.add_
    adds: list[int] = []

    def add_interrupted_at_the_second_weight(self: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        adds.append(len(adds))
        if len(adds) == 2:
            raise KeyboardInterrupt
        return real_add(self, *args, **kwargs)

    def ascent(*args: Any, **kwargs: Any) -> None:
        with monkeypatch.context() as inside:
            inside.setattr(torch.Tensor, "add_", add_interrupted_at_the_second_weight)
            real_ascent(*args, **kwargs)

    monkeypatch.setattr(wrapper_module, "apply_ascent_", ascent)
    assert_a_raising_first_step_is_forgotten(optimizer, model, KeyboardInterrupt)
    assert adds == [0, 1]  # the first weight had moved


# ----------------------------------------------------------------------------- docstrings
def _documented_arguments(obj: Callable[..., Any]) -> list[str]:
    doc = inspect.getdoc(obj) or ""
    if "Args:" not in doc:
        return []
    section = doc.split("Args:", 1)[1]
    section = re.split(r"\n\S[^\n]*:\n", "\n" + section.split("\n\n", 1)[0])[0]
    names: list[str] = []
    for line in section.splitlines():
        match = re.match(r"^    (\w[\w, ]*):", line)
        if match:
            names += [name.strip() for name in match.group(1).split(",")]
    return names


PUBLIC_CLASSES = [tram.SAM, tram.ASAM, tram.FisherSAM, tram.TRAM, tram.TwoPassOptimizer]
PUBLIC_CLASSES += [tram.R3F, tram.R4F, tram.TRPO, tram.MESA, tram.ReferenceWeights]


@pytest.mark.parametrize("cls", PUBLIC_CLASSES, ids=lambda cls: cls.__name__)
def test_documented_arguments_exist(cls: type) -> None:
    documented = _documented_arguments(cls)
    assert documented, f"{cls.__name__} documents no arguments"
    parameters = set(inspect.signature(cls.__init__).parameters)
    assert set(documented) <= parameters, set(documented) - parameters


def test_library_docstrings_cite_no_files_outside_the_repository() -> None:
    root = Path(tram.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        for pattern in (
            r"reference/\w+\.md",
            r"\b(?:paper|prior_art|integration|offline_assets|style|radius_trajectory)\.md",
            r"\bshared/",
            r"\bissue #?\d+",
            r"DESIGN\.md",
        ):
            offenders += [f"{path.relative_to(root)}: {m}" for m in re.findall(pattern, text)]
    assert not offenders


# ----------------------------------------------------------------------------- clients
class NanOnCall(nn.Module):
    """A Trainer-style model whose training forward number ``nan_call`` returns a NaN loss."""

    def __init__(self, nan_call: int) -> None:
        super().__init__()
        self.net = Net()
        self.nan_call = nan_call
        self.calls = 0

    def forward(self, tokens: Tensor, labels: Tensor) -> dict[str, Tensor]:
        logits = self.net(tokens)
        loss = F.cross_entropy(logits, labels)
        if self.training and torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.nan_call:
                loss = loss * math.nan
        return {"loss": loss, "logits": logits}


def trainer_data() -> list[dict[str, Tensor]]:
    tokens, labels = tokens_and_labels()
    return [{"tokens": t, "labels": y} for t, y in zip(tokens, labels, strict=True)]


@pytest.mark.parametrize("method", ["sam", "tram"])
def test_tram_trainer_skips_a_non_finite_second_pass(tmp_path: Path, method: str) -> None:
    transformers = pytest.importorskip("transformers")
    from tram.integrations.hf import TramTrainer

    model = NanOnCall(nan_call=2)  # step 1: call 1 is the first pass, call 2 the second
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        lr_scheduler_type="linear",
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        max_grad_norm=1.0,
    )
    kwargs = {"trust_region": "pretrained"} if method == "tram" else {"rho": 0.07}
    trainer = TramTrainer(
        model=model, args=args, train_dataset=trainer_data(), method=method, method_kwargs=kwargs
    )
    with pytest.warns(RuntimeWarning, match="second pass"):
        trainer.train()
    wrapper = trainer.two_pass_optimizer
    assert wrapper is not None
    assert (wrapper.skipped_steps, wrapper.steps) == (1, 1)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # The skipped step did not advance the schedule: one scheduler step for one base step.
    assert trainer.lr_scheduler.last_epoch == 1


def test_accelerate_two_pass_backward_skips_a_non_finite_second_pass() -> None:
    pytest.importorskip("accelerate")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from tram.integrations.accelerate import TwoPassBackward

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        accelerator = Accelerator(cpu=True)
        model = NanOnCall(nan_call=2)
        optimizer = tram.SAM(torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, rho=0.07)
        model, optimizer = accelerator.prepare(model, optimizer)
        weights = [p.detach().clone() for p in model.parameters()]
        two_pass = TwoPassBackward(
            accelerator, model, optimizer, lambda m, batch: m(**batch)["loss"]
        )
        tokens, labels = tokens_and_labels()
        two_pass({"tokens": tokens, "labels": labels})
        with pytest.warns(RuntimeWarning, match="second pass"):
            optimizer.step()
        wrapper = two_pass.optimizer
        assert (wrapper.skipped_steps, wrapper.steps) == (1, 0)
        for p, w in zip(model.parameters(), weights, strict=True):
            assert torch.equal(p, w)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_tram_on_a_compiled_model_equals_eager() -> None:
    runs = []
    for compiled in (False, True):
        net = Net()
        model = torch.compile(net, backend="eager") if compiled else net
        optimizer = tram.TRAM(
            torch.optim.SGD(net.parameters(), lr=0.5), model, trust_region="pretrained"
        )
        train(optimizer, model, steps=3)
        runs.append((list(optimizer.radius_history), [p.detach() for p in net.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert runs[0][0][-1] > 0
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- shared groups
@pytest.mark.parametrize("name", ["SAM", "ASAM", "FisherSAM", "TRAM-fisher"])
def test_a_base_optimizer_with_a_hyperparameter_of_the_same_name_is_refused(name: str) -> None:
    """Adadelta's decay is called rho: SAM's radius would silently be Adadelta's 0.9."""
    model = Net()
    with pytest.raises(ValueError, match=r"hyperparameter 'rho' has the name of one of Adadelta"):
        make_wrapper(name, model, torch.optim.Adadelta(model.parameters(), rho=0.85))


def test_tram_wraps_adadelta_and_leaves_its_rho_alone() -> None:
    model = Net()
    base = torch.optim.Adadelta(model.parameters(), rho=0.85)
    optimizer = tram.TRAM(base, model, trust_region="pretrained")
    train(optimizer, model, steps=2)
    assert base.param_groups[0]["rho"] == 0.85
    assert optimizer.radius_history[-1] > 0


@pytest.mark.parametrize(
    "failure", ["raises_at_theta_plus_epsilon", "returns_a_loss_when_finishing"]
)
def test_an_abandoned_step_is_forgotten(failure: str) -> None:
    """After a step that raised, step() alone is a step without an ascent again, and says so."""
    model = Net()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), model=model, rho=0.07)
    closure = NanOnSecondPass(optimizer, model, 1.0)
    if failure == "raises_at_theta_plus_epsilon":

        def failing() -> Tensor:
            if optimizer.is_perturbed:
                raise KeyError("boom")
            return closure()

        with pytest.raises(KeyError, match="boom"):
            optimizer.step(failing)
    else:
        closure()
        assert optimizer.first_step()
        closure()
        with pytest.raises(RuntimeError, match="closure returned a loss"):
            optimizer.step(closure)
    assert not optimizer.is_perturbed
    closure()
    with pytest.raises(tram.MissingAscentError):
        optimizer.step()


def _steps_on(
    model: nn.Module, called: nn.Module, method: str, *, traced_before: bool = True
) -> tram.TwoPassOptimizer:
    base = torch.optim.SGD(model.parameters(), lr=0.3)
    if method == "SAM":
        optimizer: tram.TwoPassOptimizer = tram.SAM(base, rho=0.2, model=called)
    elif method == "TRAM-x":
        optimizer = tram.TRAM(base, model=called, trust_region="noise", sigma=0.4)
    elif method == "TRAM-theta0":
        optimizer = tram.TRAM(base, model=called, trust_region="pretrained")
    elif method == "TRAM-previous":
        optimizer = tram.TRAM(base, model=called, trust_region="previous")
    else:
        optimizer = tram.TRAMFisher(base, called, rho=0.1, eta=0.3)
    closure = NanOnSecondPass(optimizer, called, 1.0)  # finite at θ+ε too: a plain closure
    # One forward before training (eager and compiled alike, for the BatchNorm statistics):
    # the compiled one traces its training graph there, outside any hook's block, from a fresh
    # cache (dynamo's is per code object, shared by every Net of the process).
    torch._dynamo.reset()
    if traced_before:
        closure.loss()
    for _ in range(3):
        optimizer.step(closure)
    return optimizer


@pytest.mark.parametrize("method", ["SAM", "TRAM-x", "TRAM-theta0"])
def test_a_compiled_model_steps_as_the_eager_one(method: str) -> None:
    """torch.compile's graph ignores hooks added after compilation; the wrappers' BatchNorm
    freeze and TRAM's targets do not rely on them in the compiled forward (TRAM's targets run
    the uncompiled module), so three steps are the eager run's, bit for bit."""
    eager, compiled_model = Net(), Net()
    compiled = torch.compile(compiled_model, backend="aot_eager")
    first = _steps_on(eager, eager, method)
    second = _steps_on(compiled_model, compiled, method)
    for a, b in zip(
        [*eager.parameters(), *eager.buffers()],
        [*compiled_model.parameters(), *compiled_model.buffers()],
        strict=True,
    ):
        assert torch.equal(a, b)
    if method != "SAM":
        assert second.radius_history == first.radius_history
        assert min(first.radius_history[1:]) > 0


@pytest.mark.parametrize("how", ["torch.compile(model)", "model.compile()"])
def test_tram_previous_traced_in_its_first_pass_steps_as_the_eager_one(how: str) -> None:
    """A model whose graph dynamo first traces inside TRAM's first pass (as Lightning and
    Fabric do: the training loop's first forward is recorded) runs TRAM's reference forward
    through dynamo too, whose graph then refers to TRAM-θt−1's reference weights weakly;
    ``torch.utils.swap_tensors`` refuses such tensors, so the reference is refreshed by a copy
    (``tram.targets._can_take_storage``) and the steps are the eager run's, bit for bit."""
    eager, compiled_model = Net(), Net()
    backend, graphs = counting_backend()
    called: nn.Module = compiled_model
    if how == "torch.compile(model)":
        called = torch.compile(compiled_model, backend=backend)  # type: ignore[assignment]
    else:
        compiled_model.compile(backend=backend)
    first = _steps_on(eager, eager, "TRAM-previous", traced_before=False)
    second = _steps_on(compiled_model, called, "TRAM-previous", traced_before=False)
    assert graphs
    for a, b in zip(
        [*eager.parameters(), *eager.buffers()],
        [*compiled_model.parameters(), *compiled_model.buffers()],
        strict=True,
    ):
        assert torch.equal(a, b)
    assert second.radius_history == first.radius_history
    assert min(first.radius_history[1:]) > 0


def test_tram_fisher_refuses_a_compiled_model() -> None:
    """TRAM-Fisher noises the training forward itself: a graph compiled without its hook runs
    it clean. Refused at the ascent, naming torch.compile."""
    model = Net()
    with pytest.raises(RuntimeError, match=r"ignores the noise hook .* call model._orig_mod"):
        _steps_on(model, torch.compile(model, backend="aot_eager"), "TRAM-Fisher")


def test_tram_fisher_on_a_model_compiled_in_place_steps_as_the_eager_one() -> None:
    """Module.compile() leaves nothing to unwrap: TRAM-Fisher runs its noised first pass with
    the compiled call set aside (tram.noise.eager_forward), so the noise is there and the
    steps are the eager model's."""
    eager, compiled = Net(), Net()
    compiled.compile(backend="aot_eager")
    _steps_on(eager, eager, "TRAM-Fisher")
    _steps_on(compiled, compiled, "TRAM-Fisher")
    for a, b in zip(
        [*eager.parameters(), *eager.buffers()],
        [*compiled.parameters(), *compiled.buffers()],
        strict=True,
    ):
        assert torch.equal(a, b)
