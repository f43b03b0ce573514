"""Error inputs: one table of bad calls, each with its exception type and message.

Like torch's ``OptimizerInfo`` error inputs: every case says how to build the bad call, which
exception it raises and what the message says (the argument and the value, in torch's
wording: ``Invalid rho: -0.1``). After every failing call the weights must be untouched and,
where a wrapper exists, not left perturbed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tram

WRAPPER_CLASSES: list[type[tram.TwoPassOptimizer]] = [tram.SAM, tram.ASAM, tram.FisherSAM]


class Env:
    """A small model, a batch and (after ``wrap``) a wrapper around SGD."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.x = torch.randn(8, 4)
        self.y = torch.randint(0, 3, (8,))
        self.optimizer: tram.TwoPassOptimizer | None = None

    def sgd(self) -> torch.optim.SGD:
        return torch.optim.SGD(self.model.parameters(), lr=0.1)

    def wrap(self, cls: type[tram.TwoPassOptimizer] = tram.SAM, **kwargs: Any) -> Env:
        self.optimizer = cls(self.sgd(), **kwargs)
        return self

    def wrap_params(self, params: list[torch.Tensor]) -> Env:
        self.optimizer = tram.SAM(torch.optim.SGD(params, lr=0.1))
        return self

    def backward(self) -> torch.Tensor:
        assert self.optimizer is not None
        self.optimizer.zero_grad()
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        return loss

    def first_step(self, **kwargs: Any) -> Env:
        self.backward()
        assert self.optimizer is not None
        assert self.optimizer.first_step(**kwargs)
        return self

    def closure_returning(self, value: object) -> Callable[[], object]:
        def closure() -> object:
            self.backward()
            return value

        return closure


@dataclasses.dataclass(frozen=True)
class ErrorCase:
    id: str
    call: Callable[[Env], object]
    error: type[Exception]
    match: str
    setup: Callable[[Env], object] = lambda env: None
    perturbed_after: bool = False
    """``is_perturbed`` after the failing call (True only where a valid first_step preceded)."""

    def __str__(self) -> str:
        return self.id


def _step_with_the_ascent(env: Any) -> None:
    """Take a due step with step(closure), so that the next one is an off-step."""
    env.optimizer.step(env.closure_returning(torch.tensor(0.0)))


class _HandWrittenSAM(torch.optim.SGD):
    """The shape of the SAM paper's reference optimizer: the two passes as methods."""

    def first_step(self, zero_grad: bool = False) -> None: ...

    def second_step(self, zero_grad: bool = False) -> None: ...


class _InitSkipped(torch.optim.SGD):
    """An optimizer whose __init__ keeps its own fields and never runs Optimizer.__init__."""

    def __init__(self, params: Any) -> None:
        self.param_groups = [{"params": list(params), "lr": 0.1}]


def _gsam(env: Any) -> Any:
    """pytorch_optimizer's GSAM around SGD, its surrogate gap weight at a value of its own."""

    class ConstantRadius:
        def step(self) -> float:
            return 0.03

    return pytest.importorskip("pytorch_optimizer").GSAM(
        env.model.parameters(),
        base_optimizer=torch.optim.SGD(env.model.parameters(), lr=0.1),
        model=env.model,
        rho_scheduler=ConstantRadius(),
        alpha=0.3,
    )


def _closure_with_a_default(env: Any) -> Any:
    """A schedule-free closure optimizer as schedulefree 1.2 declared it: ``step(closure=None)``,
    a default its step cannot run with (it calls the closure unconditionally)."""

    class DefaultedClosure(pytest.importorskip("schedulefree").SGDScheduleFreeClosure):
        def step(self, closure: Any = None) -> Any:
            return super().step(closure)

    return DefaultedClosure(env.model.parameters(), lr=0.1)


def _literal(message: str) -> str:
    return re.escape(message)


def _rho_cases() -> list[ErrorCase]:
    cases = []
    for cls in WRAPPER_CLASSES:
        name = cls.__name__
        for value, message in [
            (-0.1, "Invalid rho: -0.1"),
            (float("nan"), "Invalid rho: nan"),
            (float("inf"), "Invalid rho: inf"),
            (-math.inf, "Invalid rho: -inf"),
        ]:
            cases.append(
                ErrorCase(
                    f"{name}-rho={value}",
                    lambda env, cls=cls, value=value: cls(env.sgd(), rho=value),
                    ValueError,
                    _literal(message),
                )
            )
        cases += [
            ErrorCase(
                f"{name}-rho=True",
                lambda env, cls=cls: cls(env.sgd(), rho=True),
                ValueError,
                _literal("Invalid rho: True"),
            ),
            ErrorCase(
                f"{name}-rho=str",
                lambda env, cls=cls: cls(env.sgd(), rho="0.05"),
                ValueError,
                _literal("Invalid rho: '0.05'"),
            ),
            ErrorCase(
                f"{name}-ascent_every=0",
                lambda env, cls=cls: cls(env.sgd(), ascent_every=0),
                ValueError,
                _literal("Invalid ascent_every: 0"),
            ),
            ErrorCase(
                f"{name}-ascent_every=1.5",
                lambda env, cls=cls: cls(env.sgd(), ascent_every=1.5),
                ValueError,
                _literal("Invalid ascent_every: 1.5"),
            ),
            ErrorCase(
                f"{name}-group-rho-in-base",
                lambda env, cls=cls: cls(
                    torch.optim.SGD([{"params": env.model.parameters(), "rho": -2.0}], lr=0.1)
                ),
                ValueError,
                _literal("Invalid rho: -2.0"),
            ),
            ErrorCase(
                f"{name}-add_param_group-rho",
                lambda env: env.optimizer.add_param_group(
                    {"params": [nn.Parameter(torch.ones(2))], "rho": -0.1}
                ),
                ValueError,
                _literal("Invalid rho: -0.1"),
                setup=lambda env, cls=cls: env.wrap(cls),
            ),
        ]
    for cls in [tram.ASAM, tram.FisherSAM]:
        name = cls.__name__
        cases += [
            ErrorCase(
                f"{name}-eta=-0.01",
                lambda env, cls=cls: cls(env.sgd(), eta=-0.01),
                ValueError,
                _literal("Invalid eta: -0.01"),
            ),
            ErrorCase(
                f"{name}-eta=nan",
                lambda env, cls=cls: cls(env.sgd(), eta=float("nan")),
                ValueError,
                _literal("Invalid eta: nan"),
            ),
            ErrorCase(
                f"{name}-eta=False",
                lambda env, cls=cls: cls(env.sgd(), eta=False),
                ValueError,
                _literal("Invalid eta: False"),
            ),
            ErrorCase(
                f"{name}-add_param_group-eta",
                lambda env: env.optimizer.add_param_group(
                    {"params": [nn.Parameter(torch.ones(2))], "eta": -1.0}
                ),
                ValueError,
                _literal("Invalid eta: -1.0"),
                setup=lambda env, cls=cls: env.wrap(cls),
            ),
        ]
    return cases


CASES: list[ErrorCase] = [
    *_rho_cases(),
    # ------------------------------------------------------------------ the base optimizer
    ErrorCase(
        "base-is-a-list",
        lambda env: tram.SAM(list(env.model.parameters())),
        TypeError,
        _literal("base_optimizer must be a torch.optim.Optimizer instance, but got list"),
    ),
    ErrorCase(
        "base-is-a-module",
        lambda env: tram.SAM(env.model),
        TypeError,
        _literal("base_optimizer must be a torch.optim.Optimizer instance, but got Sequential"),
    ),
    ErrorCase(
        "base-is-a-class",
        lambda env: tram.ASAM(torch.optim.AdamW),
        TypeError,
        r"got the class AdamW; construct it first, e\.g\. ASAM\(AdamW\(model\.parameters\(\)",
    ),
    ErrorCase(
        "base-is-a-wrapper",
        lambda env: tram.SAM(tram.FisherSAM(env.sgd())),
        TypeError,
        _literal("base_optimizer is already a two-pass optimizer (FisherSAM)"),
    ),
    ErrorCase(
        "base-is-another-librarys-sam",
        lambda env: tram.TRAM(
            pytest.importorskip("pytorch_optimizer").SAM(
                env.model.parameters(), torch.optim.SGD, lr=0.1
            ),
            env.model,
            trust_region="pretrained",
        ),
        TypeError,
        _literal(
            "base_optimizer is already a two-pass optimizer (pytorch_optimizer.optimizer.sam.SAM, "
            "with first_step() and second_step()): TRAM would take a third pass"
        ),
    ),
    ErrorCase(
        "base-is-another-librarys-gsam",
        lambda env: tram.TRAM(_gsam(env), env.model, trust_region="pretrained"),
        TypeError,
        _literal(
            "base_optimizer is already a two-pass optimizer (pytorch_optimizer.optimizer.sam.GSAM, "
            "with perturb_weights() and un_perturb()): TRAM would take a third pass"
        ),
    ),
    ErrorCase(
        "base-skipped-optimizer-init",
        lambda env: tram.SAM(_InitSkipped(env.model.parameters())),
        TypeError,
        r"^SAM cannot wrap .*_InitSkipped: it is not a complete torch\.optim\.Optimizer \(it has "
        r"no defaults, state; its __init__ does not run Optimizer\.__init__\)",
    ),
    ErrorCase(
        "base-is-a-sam-written-by-hand",
        lambda env: tram.ASAM(_HandWrittenSAM(env.model.parameters())),
        TypeError,
        r"already a two-pass optimizer \(.*_HandWrittenSAM, with first_step\(\) and second_step",
    ),
    ErrorCase(
        "base-is-lbfgs",
        lambda env: tram.ASAM(torch.optim.LBFGS(env.model.parameters())),
        TypeError,
        _literal("ASAM cannot wrap LBFGS: its step() needs a closure, which it calls itself"),
    ),
    ErrorCase(
        "base-is-a-schedule-free-closure-optimizer",
        lambda env: tram.SAM(
            pytest.importorskip("schedulefree").SGDScheduleFreeClosure(
                env.model.parameters(), lr=0.1
            )
        ),
        TypeError,
        _literal("SAM cannot wrap SGDScheduleFreeClosure: its step() needs a closure"),
    ),
    ErrorCase(
        "base-is-a-schedule-free-closure-optimizer-whose-step-declares-a-default",
        lambda env: tram.SAM(_closure_with_a_default(env)),
        TypeError,
        _literal("SAM cannot wrap DefaultedClosure: its step() needs a closure"),
    ),
    ErrorCase(
        "base-lists-a-parameter-twice",
        lambda env: tram.TRAM(
            torch.optim.SGD([*env.model.parameters(), env.model[0].weight], lr=0.1),
            env.model,
            trust_region="pretrained",
        ),
        ValueError,
        _literal("TRAM: the same parameter (shape (5, 4)) is listed more than once"),
    ),
    ErrorCase(
        "add_param_group-lists-a-parameter-twice",
        lambda env: env.optimizer.add_param_group(
            {"params": [env.model[2].bias, env.model[2].bias]}
        ),
        ValueError,
        _literal("SAM: the same parameter (shape (3,)) is listed more than once"),
        setup=lambda env: env.wrap_params(list(env.model[0].parameters())),
    ),
    ErrorCase(
        "base-has-no-parameters",
        lambda env: tram.SAM(torch.optim.SGD([{"params": []}], lr=0.1)),
        ValueError,
        _literal("base_optimizer has an empty parameter list"),
    ),
    ErrorCase(
        "model-is-not-a-module",
        lambda env: tram.SAM(env.sgd(), model=[env.model]),
        TypeError,
        _literal("model must be a torch.nn.Module, but got list"),
    ),
    # ------------------------------------------------------------------ the two passes
    ErrorCase(
        "first_step-before-backward",
        lambda env: env.optimizer.first_step(),
        RuntimeError,
        _literal("first_step() found no gradients: call loss.backward() before first_step()"),
        setup=lambda env: env.wrap(),
    ),
    ErrorCase(
        "first_step-twice",
        lambda env: env.optimizer.first_step(),
        RuntimeError,
        _literal("first_step() called while the weights are perturbed"),
        setup=lambda env: env.wrap().first_step(),
        perturbed_after=True,
    ),
    ErrorCase(
        "second_step-without-first_step",
        lambda env: env.optimizer.second_step(),
        RuntimeError,
        _literal("second_step() called without first_step()"),
        setup=lambda env: env.wrap().backward(),
    ),
    ErrorCase(
        "closure-returns-None",
        lambda env: env.optimizer.step(env.closure_returning(None)),
        TypeError,
        _literal("closure must return the loss (a Tensor or a float), but it returned NoneType"),
        setup=lambda env: env.wrap(),
    ),
    ErrorCase(
        "closure-returns-str",
        lambda env: env.optimizer.step(env.closure_returning("0.5")),
        TypeError,
        _literal("closure must return the loss (a Tensor or a float), but it returned str"),
        setup=lambda env: env.wrap(),
    ),
    ErrorCase(
        "local_ascent-without-no_sync",
        lambda env: env.optimizer.step(env.closure_returning(torch.tensor(0.0))),
        ValueError,
        r"local_ascent=True needs model= with a no_sync\(\) context.*got model=Sequential",
        setup=lambda env: env.wrap(local_ascent=True, model=env.model),
    ),
    ErrorCase(
        "local_ascent-without-model",
        lambda env: env.optimizer.step(env.closure_returning(torch.tensor(0.0))),
        ValueError,
        r"local_ascent=True needs model= with a no_sync\(\) context.*got model=None",
        setup=lambda env: env.wrap(local_ascent=True),
    ),
    # ------------------------------------------------------------------ loss scale
    *[
        ErrorCase(
            f"grad_scale={value}",
            lambda env, value=value: env.optimizer.first_step(grad_scale=value),
            ValueError,
            _literal(message),
            setup=lambda env: (env.wrap(tram.FisherSAM), env.backward()),
        )
        for value, message in [
            (0, "Invalid grad_scale: 0"),
            (-1024.0, "Invalid grad_scale: -1024.0"),
            (float("nan"), "Invalid grad_scale: nan"),
            (float("inf"), "Invalid grad_scale: inf"),
            (torch.tensor(0.0), "Invalid grad_scale: 0.0"),
            ("1024", "Invalid grad_scale: '1024'"),
        ]
    ],
    ErrorCase(
        "grad_scale-invalid-on-an-off-step",
        lambda env: env.optimizer.first_step(grad_scale=-1.0),
        ValueError,
        _literal("Invalid grad_scale: -1.0"),
        setup=lambda env: (env.wrap(ascent_every=2), _step_with_the_ascent(env)),
    ),
    ErrorCase(
        "scaled_step-with-a-plain-optimizer",
        lambda env: tram.scaled_step(env.sgd(), torch.amp.GradScaler("cpu"), lambda: None),
        TypeError,
        _literal("optimizer must be a tram two-pass optimizer, but got SGD"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_error_inputs(case: ErrorCase) -> None:
    env = Env()
    case.setup(env)
    weights = [p.detach().clone() for p in env.model.parameters()]
    groups = len(env.optimizer.param_groups) if env.optimizer is not None else None

    with pytest.raises(case.error, match=case.match):
        case.call(env)

    for p, w in zip(env.model.parameters(), weights, strict=True):
        assert torch.equal(p, w)
    if env.optimizer is not None:
        assert env.optimizer.is_perturbed is case.perturbed_after
        assert len(env.optimizer.param_groups) == groups
        assert env.optimizer.param_groups is env.optimizer.base_optimizer.param_groups
        assert env.optimizer.steps == (1 if "off-step" in case.id else 0)
        if case.perturbed_after:
            env.optimizer.restore()
            assert not env.optimizer.is_perturbed


def test_a_failed_first_step_does_not_arm_second_step() -> None:
    """An invalid ``grad_scale`` is rejected before anything happens: no base step follows."""
    env = Env().wrap()
    env.backward()
    with pytest.raises(ValueError, match="Invalid grad_scale"):
        env.optimizer.first_step(grad_scale=0.0)
    with pytest.raises(RuntimeError, match=_literal("second_step() called without first_step()")):
        env.optimizer.second_step()
    assert env.optimizer.steps == 0


@pytest.mark.parametrize("cls", WRAPPER_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_radius_set_later_skips_the_ascent(
    cls: type[tram.TwoPassOptimizer], value: float
) -> None:
    """A radius made non-finite after construction (a schedule, a hand edit of the groups) is
    caught at the step: the ascent is skipped with a warning, the weights are not corrupted,
    and the step is a plain base step on the first-pass gradient."""
    env = Env().wrap(cls)
    optimizer = env.optimizer
    optimizer.param_groups[0]["rho"] = value
    plain = Env()
    sgd = plain.sgd()
    sgd.zero_grad()
    F.cross_entropy(plain.model(plain.x), plain.y).backward()
    sgd.step()

    with pytest.warns(RuntimeWarning, match="the ascent radius is not finite"):
        loss = optimizer.step(env.backward)
    assert math.isfinite(loss.item())
    assert optimizer.skipped_ascents == 1
    assert not optimizer.is_perturbed
    for p, q in zip(env.model.parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_error_messages_do_not_warn() -> None:
    """Constructing a valid wrapper emits no warning (the error checks are silent)."""
    env = Env()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for cls in WRAPPER_CLASSES:
            cls(env.sgd())
