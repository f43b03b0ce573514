"""SAM and ASAM: the fixed-radius members of the family."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from tram._ascent import Scaling
from tram._validation import check_non_negative
from tram._wrapper import TwoPassOptimizer

__all__ = ["ASAM", "SAM"]


class SAM(TwoPassOptimizer):
    r"""Sharpness-Aware Minimization around any optimizer.

    .. math::

        \epsilon = \rho \, \frac{\nabla L(\theta)}{\lVert \nabla L(\theta) \rVert_2 + 10^{-12}},
        \qquad \theta \leftarrow \mathrm{base\_step}\big(\theta, \nabla L(\theta + \epsilon)\big)

    The norm is global over every parameter with a gradient, across param groups; a
    per-group ``rho`` scales that group's share of the step.

    Example::

        base = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
        optimizer = tram.SAM(base, rho=0.05)

        def closure():
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        loss = optimizer.step(closure)

    Args:
        base_optimizer: the optimizer instance to wrap.
        rho: the radius ρ of the ascent (default 0.05, the SAM paper's and TRAM's baseline).
        model, ascent_every, local_ascent, foreach: see :class:`tram.TwoPassOptimizer`.

    References:
        Foret, Kleiner, Mobahi, Neyshabur. Sharpness-Aware Minimization for Efficiently
        Improving Generalization. ICLR 2021, Eq. 2.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        *,
        rho: float = 0.05,
        model: nn.Module | None = None,
        ascent_every: int = 1,
        local_ascent: bool = False,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(
            base_optimizer,
            {"rho": rho},
            model=model,
            ascent_every=ascent_every,
            local_ascent=local_ascent,
            foreach=foreach,
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_non_negative("rho", group["rho"])


class ASAM(TwoPassOptimizer):
    r"""Adaptive SAM: the ascent is taken in the parameter-scaled space.

    .. math::

        T_\theta = \mathrm{diag}(|\theta| + \eta), \qquad
        \epsilon = \rho \, \frac{T_\theta^2 \nabla L}{\lVert T_\theta \nabla L \rVert_2 + 10^{-12}}

    ``eta`` is added to every parameter, so a parameter at zero still moves. With
    ``exclude_1d=True``, parameters with fewer than two dimensions (biases, normalisation
    weights) use :math:`T = 1`, close to the official ASAM code, which scales only parameters
    named ``weight``; names are not available to an optimizer, so dimension is the criterion.
    ``eta`` and ``exclude_1d`` may be set per param group.

    Args:
        base_optimizer: the optimizer instance to wrap.
        rho: the radius ρ (default 0.5, the ASAM paper's and TRAM's baseline).
        eta: the offset η of the operator (default 0.01, as in the official ASAM code).
        exclude_1d: leave 1-D parameters unscaled (default False).
        model, ascent_every, local_ascent, foreach: see :class:`tram.TwoPassOptimizer`.

    References:
        Kwon, Kim, Park, Choi. ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
        Learning of Deep Neural Networks. ICML 2021, Eq. 11.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        *,
        rho: float = 0.5,
        eta: float = 0.01,
        exclude_1d: bool = False,
        model: nn.Module | None = None,
        ascent_every: int = 1,
        local_ascent: bool = False,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(
            base_optimizer,
            {"rho": rho, "eta": eta, "exclude_1d": exclude_1d},
            model=model,
            ascent_every=ascent_every,
            local_ascent=local_ascent,
            foreach=foreach,
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_non_negative("rho", group["rho"])
        check_non_negative("eta", group["eta"])

    def _scaling(self, group: dict[str, Any], param: Tensor) -> tuple[Scaling, float]:
        if group["exclude_1d"] and param.dim() < 2:
            return "identity", 0.0
        # Checked where it is used: a schedule or the base optimizer's add_param_group can set it.
        return "adaptive", check_non_negative("eta", group["eta"])
