"""The table of wrappers every contract test runs over, with reference ascents.

The reference ascents are written from the papers' formulas with plain tensor arithmetic; they
do not call the library's maths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import tram

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


@dataclasses.dataclass(frozen=True)
class WrapperCase:
    name: str
    cls: type[tram.TwoPassOptimizer]
    kwargs: dict[str, Any]
    reference: Callable[[list[Tensor], list[Tensor]], list[Tensor]]
    zero_radius: dict[str, Any]

    def make(self, base: torch.optim.Optimizer, **overrides: Any) -> tram.TwoPassOptimizer:
        return self.cls(base, **{**self.kwargs, **overrides})

    def __str__(self) -> str:
        return self.name


WRAPPERS = [
    WrapperCase(
        "SAM",
        tram.SAM,
        {"rho": 0.05},
        lambda p, g: sam_reference(p, g, 0.05),
        {"rho": 0.0},
    ),
    WrapperCase(
        "ASAM",
        tram.ASAM,
        {"rho": 0.5, "eta": 0.01},
        lambda p, g: asam_reference(p, g, 0.5, 0.01),
        {"rho": 0.0},
    ),
    WrapperCase(
        "FisherSAM",
        tram.FisherSAM,
        {"rho": 0.1, "eta": 0.1},
        lambda p, g: fisher_reference(p, g, 0.1, 0.1),
        {"rho": 0.0},
    ),
]
