"""Fisher SAM: the ascent in the geometry of a diagonal Fisher information estimate."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from tram._ascent import Scaling
from tram._validation import check_non_negative
from tram._wrapper import TwoPassOptimizer

__all__ = ["FisherSAM"]


class FisherSAM(TwoPassOptimizer):
    r"""Fisher SAM: SAM whose ascent ball is an ellipsoid shaped by the Fisher information.

    The problem is :math:`\max_{\epsilon^\top F \epsilon \le \rho^2} L(\theta + \epsilon)`,
    solved to first order by :math:`\epsilon = \rho F^{-1} g / \sqrt{g^\top F^{-1} g}`. The
    Fisher is the diagonal of the squared batch gradient, :math:`\hat F = g^2` (TRAM paper
    Eq. 9), regularised as :math:`f = 1 + \eta g^2` so that it is invertible everywhere:

    .. math::

        \epsilon_i = \rho \, \frac{g_i / (1 + \eta g_i^2)}
            {\sqrt{\sum_j g_j^2 / (1 + \eta g_j^2)} + 10^{-12}}

    Choices where the sources are silent (the regularisation of the Fisher is not spelled out in
    the FSAM or TRAM papers): the ``1 + η g²`` regularisation, and the use of the
    same mini-batch gradient for the Fisher and for the direction, which keeps the cost at two
    forward and two backward passes. Under a ``GradScaler`` the Fisher is computed from the
    unscaled gradient (pass ``grad_scale`` to :meth:`first_step`).

    Args:
        base_optimizer: the optimizer instance to wrap.
        rho: the neighbourhood size γ (default 0.1, the value the TRAM paper used for FSAM).
        eta: the Fisher regularisation η (default 0.1, likewise).
        model, ascent_every, local_ascent, foreach: see :class:`tram.TwoPassOptimizer`.

    References:
        Kim, Li, Hu, Hospedales. Fisher SAM: Information Geometry and Sharpness Aware
        Minimisation. ICML 2022.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        *,
        rho: float = 0.1,
        eta: float = 0.1,
        model: nn.Module | None = None,
        ascent_every: int = 1,
        local_ascent: bool = False,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(
            base_optimizer,
            {"rho": rho, "eta": eta},
            model=model,
            ascent_every=ascent_every,
            local_ascent=local_ascent,
            foreach=foreach,
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_non_negative("rho", group["rho"])
        check_non_negative("eta", group["eta"])

    def _scaling(self, group: dict[str, Any], param: Tensor) -> tuple[Scaling, float]:
        # Checked where it is used: a schedule or the base optimizer's add_param_group can set it.
        return "fisher", check_non_negative("eta", group["eta"])
