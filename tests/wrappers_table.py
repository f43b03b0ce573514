"""The table of wrappers every contract test runs over, with reference ascents.

The reference ascents are written from the papers' formulas with plain tensor arithmetic; they
do not call the library's maths. TRAM's is Eq. 7 of Sherborne et al. (ICLR 2024),
ε = d T² g / ‖T g‖ with T = |θ| + η, where d (forward KL from the trust-region target to the
current outputs) is measured here by hand on the first pass's logits; TRAM-Fisher is Fisher
SAM's ascent from the gradient of a first pass on noised inputs (the paper's Algorithm 2 as
``tram/_tram.py`` documents it).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tram
from tests.helpers import NoiseDraws

EPS = 1e-12


def sam_reference(params: list[Tensor], grads: list[Tensor], rho: float) -> list[Tensor]:
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    return [(rho * g.double() / (norm + EPS)).to(g.dtype) for g in grads]


def asam_reference(
    params: list[Tensor], grads: list[Tensor], rho: float, eta: float
) -> list[Tensor]:
    scales = [p.double().abs() + eta for p in params]
    norm = torch.sqrt(sum(((t * g.double()) ** 2).sum() for t, g in zip(scales, grads)))
    return [(rho * t**2 * g.double() / (norm + EPS)).to(g.dtype) for t, g in zip(scales, grads)]


def fisher_reference(
    params: list[Tensor], grads: list[Tensor], rho: float, eta: float
) -> list[Tensor]:
    fisher = [1 + eta * g.double() ** 2 for g in grads]
    norm = torch.sqrt(sum((g.double() ** 2 / f).sum() for g, f in zip(grads, fisher)))
    return [(rho * (g.double() / f) / (norm + EPS)).to(g.dtype) for g, f in zip(grads, fisher)]


class Ascent:
    """One reference run's ascent: the first-pass forward, ε, and the state kept across steps."""

    def __init__(self, formula: Callable[[list[Tensor], list[Tensor]], list[Tensor]]) -> None:
        self.formula = formula

    def first_forward(self, model: nn.Module, x: Tensor) -> Tensor:
        return model(x)

    def epsilon(
        self, model: nn.Module, x: Tensor, logits: Tensor, params: list[Tensor], grads: list[Tensor]
    ) -> list[Tensor]:
        return self.formula(params, grads)

    def before_base_step(self, model: nn.Module) -> None:
        """After the second pass and the restore, before the base optimizer's step."""

    def after_base_step(self, model: nn.Module) -> None:
        """After the base optimizer's step."""


def first_linear(model: nn.Module) -> nn.Module:
    """Where the contract models' "embeddings" are: their first ``nn.Linear``."""
    return next(m for m in model.modules() if isinstance(m, nn.Linear))


def mean_forward_kl(target: Tensor, current: Tensor) -> Tensor:
    """Mean over rows of KL(softmax(target) || softmax(current)), in float64."""
    log_p = F.log_softmax(target.double(), dim=-1)
    log_q = F.log_softmax(current.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


class TramAscent(Ascent):
    """TRAM's ascent by hand, for one trust region (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        trust_region: str,
        *,
        sigma: float,
        eta: float,
        rho: float,
        fisher_eta: float,
        ema_decay: float,
        seed: int = 0,
    ) -> None:
        self.trust_region = trust_region
        self.sigma, self.eta, self.rho, self.fisher_eta = sigma, eta, rho, fisher_eta
        self.ema_decay = ema_decay
        self.draws = NoiseDraws(seed)  # TRAM's own noise stream
        self.target = copy.deepcopy(model) if trust_region in TARGETS_WITH_WEIGHTS else None

    def noised_forward(self, model: nn.Module, x: Tensor) -> Tensor:
        """The model with z ~ N(0, σ²) added to its first layer's output, one draw per call."""

        generator = self.draws.next()

        def add_noise(module: nn.Module, args: Any, output: Tensor) -> Tensor:
            z = torch.randn(output.shape, generator=generator, dtype=output.dtype)
            return output + z * self.sigma

        handle = first_linear(model).register_forward_hook(add_noise)
        try:
            return model(x)
        finally:
            handle.remove()

    def first_forward(self, model: nn.Module, x: Tensor) -> Tensor:
        if self.trust_region == "fisher":
            return self.noised_forward(model, x)
        return model(x)

    def radius(self, model: nn.Module, x: Tensor, logits: Tensor) -> float:
        with torch.no_grad():
            if self.trust_region == "noise":
                target = self.noised_forward(model, x)
            else:
                assert self.target is not None
                target = self.target(x)
        return float(mean_forward_kl(target, logits.detach()))

    def epsilon(
        self, model: nn.Module, x: Tensor, logits: Tensor, params: list[Tensor], grads: list[Tensor]
    ) -> list[Tensor]:
        if self.trust_region == "fisher":
            return fisher_reference(params, grads, self.rho, self.fisher_eta)
        d = self.radius(model, x, logits)
        scales = [p.double().abs() + self.eta for p in params]
        norm = torch.sqrt(sum(((t * g.double()) ** 2).sum() for t, g in zip(scales, grads)))
        return [(d * t**2 * g.double() / (norm + EPS)).to(g.dtype) for t, g in zip(scales, grads)]

    def before_base_step(self, model: nn.Module) -> None:
        if self.trust_region == "previous":
            assert self.target is not None
            self.target.load_state_dict(model.state_dict())

    def after_base_step(self, model: nn.Module) -> None:
        if self.trust_region == "ema":
            assert self.target is not None
            with torch.no_grad():
                for t, p in zip(self.target.parameters(), model.parameters()):
                    t.mul_(self.ema_decay).add_(p, alpha=1 - self.ema_decay)


TARGETS_WITH_WEIGHTS = ("pretrained", "previous", "ema")


@dataclasses.dataclass(frozen=True)
class WrapperCase:
    """One wrapper with its options, its hand-written ascent and its zero-radius options.

    ``group_defaults`` are the hyperparameters the wrapper adds to every param group;
    ``zero_radius`` the options under which it must be its bare base optimizer.
    """

    name: str
    cls: type[tram.TwoPassOptimizer]
    kwargs: dict[str, Any]
    reference: Callable[[list[Tensor], list[Tensor]], list[Tensor]] | None
    zero_radius: dict[str, Any]
    group_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    needs_model: bool = False
    noise: bool = False
    """Options that depend on the model: TRAM's noise goes on the first layer's output."""
    tram_reference: dict[str, Any] = dataclasses.field(default_factory=dict)
    """TRAM's hyperparameters for :class:`TramAscent` (TRAM's own options differ per target)."""

    def make(
        self,
        base: torch.optim.Optimizer,
        model: nn.Module | None = None,
        *,
        bind_model: bool = False,
        **overrides: Any,
    ) -> tram.TwoPassOptimizer:
        """The wrapper around ``base``; TRAM always gets ``model``, the SAM family only with
        ``bind_model=True`` (for BatchNorm)."""
        options = {**self.kwargs, **overrides}
        if self.needs_model:
            if model is None:
                raise TypeError(f"{self.name} needs the model")
            if self.noise:
                options.setdefault("embeddings", first_linear(model))
            return self.cls(base, model, **options)
        if bind_model:
            options["model"] = model
        return self.cls(base, **options)

    def ascent(self, model: nn.Module) -> Ascent:
        """A fresh hand-written ascent for a run that starts from ``model``'s weights."""
        if self.reference is not None:
            return Ascent(self.reference)
        return TramAscent(model, **self.tram_reference)

    @property
    def is_tram(self) -> bool:
        return self.cls is tram.TRAM

    def __str__(self) -> str:
        return self.name


def _sam_family(name: str, cls: type, kwargs: dict[str, Any], reference: Callable) -> WrapperCase:
    return WrapperCase(name, cls, kwargs, reference, {"rho": 0.0}, group_defaults=dict(kwargs))


def _tram(trust_region: str) -> WrapperCase:
    """TRAM with values that are no fixed point of a likely mistake: σ = 0.3, EMA decay 0.8,
    TRAM-Fisher's ρ = 0.05 != η = 0.5, and η = 0.02 in T = |θ| + η.

    Each target takes its own options only (``tram/_tram.py``); ``"fisher"`` builds a
    ``tram.TRAMFisher``, a Fisher SAM whose groups hold ``rho`` and ``eta``.
    """
    # The noise seed is given: the default follows torch.manual_seed (test_noise_stream).
    values = {
        "sigma": 0.3,
        "eta": 0.02,
        "rho": 0.05,
        "fisher_eta": 0.5,
        "ema_decay": 0.8,
        "seed": 17,
    }
    kwargs: dict[str, Any] = {"trust_region": trust_region}
    if trust_region == "fisher":
        kwargs |= {"sigma": 0.3, "rho": 0.05, "fisher_eta": 0.5, "seed": 17}
        group, zero = {"rho": 0.05, "eta": 0.5}, {"rho": 0.0}
    else:
        kwargs["eta"] = 0.02
        if trust_region == "noise":
            kwargs |= {"sigma": 0.3, "seed": 17}
        if trust_region == "ema":
            kwargs["ema_decay"] = 0.8
        group, zero = {"eta": 0.02}, {"max_radius": 0.0}
    return WrapperCase(
        f"TRAM-{trust_region}",
        tram.TRAM,
        kwargs,
        None,
        zero,
        group_defaults=group,
        needs_model=True,
        noise=trust_region in ("noise", "fisher"),
        tram_reference={"trust_region": trust_region, **values},
    )


SAM_FAMILY = [
    _sam_family("SAM", tram.SAM, {"rho": 0.05}, lambda p, g: sam_reference(p, g, 0.05)),
    _sam_family(
        "ASAM",
        tram.ASAM,
        {"rho": 0.5, "eta": 0.01},
        lambda p, g: asam_reference(p, g, 0.5, 0.01),
    ),
    _sam_family(
        "FisherSAM",
        tram.FisherSAM,
        {"rho": 0.1, "eta": 0.1},
        lambda p, g: fisher_reference(p, g, 0.1, 0.1),
    ),
]
TRAMS = [
    _tram("noise"),
    _tram("pretrained"),
    _tram("previous"),
    _tram("ema"),
    _tram("fisher"),
]
WRAPPERS = SAM_FAMILY + TRAMS
