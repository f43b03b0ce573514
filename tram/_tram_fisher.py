r"""TRAM-Fisher: Fisher SAM from the gradient on noised inputs (Sherborne et al. 2024, Algorithm 2).

TRAM-Fisher measures no divergence. Its first pass runs on noised input embeddings
:math:`x + z`, and that pass's gradient :math:`\tilde g` gives both the direction and the
diagonal Fisher :math:`\tilde g^2`, with the Fisher SAM ascent

.. math::

    \epsilon = \rho \, \frac{\tilde g / (1 + \eta \tilde g^2)}
        {\sqrt{\sum \tilde g^2 / (1 + \eta \tilde g^2)}},
    \qquad \rho = 0.1,\ \eta = 0.1 \text{ (the FSAM values the paper uses)}

This is the reading of the paper's ambiguous Algorithm 2 that keeps its stated cost of 2 forward
and 2 backward passes; the loss ``step(closure)`` returns is the noised one. On an
``ascent_every`` off-step the pass is clean.

A first pass that ran outside ``first_pass()`` (the explicit form) went through no noise: its
ascent would silently be Fisher SAM's. ``first_step()`` refuses it, as TRAM refuses a first pass
it did not record.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.optim import Optimizer

from tram._fisher import FisherSAM
from tram._model_io import unwrap_model
from tram.noise import NoiseDistribution, eager_forward
from tram.targets import NoisedInputs, refuse_unexpected_options

__all__ = ["TRAMFisher"]


@dataclass
class _NoisedForwards:
    """How many forwards of this step's first pass went through the noise hook. One object per
    optimizer, shared by copies of its ``__dict__`` (Lightning's ``LightningOptimizer``)."""

    count: int = 0


class TRAMFisher(FisherSAM):
    """TRAM-Fisher around any optimizer (see the module docstring).

    Args:
        base_optimizer: the optimizer instance to wrap.
        model: the model being trained (a DDP or ``torch.compile`` wrapper is unwrapped).
        sigma, noise, embeddings, seed: the noise of the first pass
            (:class:`tram.targets.NoisedInputs`: σ, its distribution, where it goes, the seed of
            its stream, by default ``torch.initial_seed()``; seed and count of draws are
            checkpointed).
        rho: the neighbourhood size γ of the Fisher SAM ascent.
        eta: the Fisher regularisation η.
        ascent_every, local_ascent, foreach: see :class:`tram.TwoPassOptimizer`.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        model: nn.Module,
        *,
        sigma: float = 0.1,
        noise: NoiseDistribution = "gaussian",
        embeddings: nn.Module | str | None = None,
        seed: int | None = None,
        rho: float = 0.1,
        eta: float = 0.1,
        ascent_every: int = 1,
        local_ascent: bool = False,
        foreach: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
        self.noised_inputs = NoisedInputs(
            sigma=sigma, noise=noise, embeddings=embeddings, seed=seed
        )
        self.module = unwrap_model(model)
        self._noised_forwards = _NoisedForwards()
        super().__init__(
            base_optimizer,
            rho=rho,
            eta=eta,
            model=model,
            ascent_every=ascent_every,
            local_ascent=local_ascent,
            foreach=foreach,
        )
        self.noised_inputs.bind(self.module)

    @classmethod
    def from_tram_arguments(
        cls,
        base_optimizer: Optimizer,
        model: nn.Module,
        *,
        trust_region: str | None = None,
        target: str | None = None,
        rho: float = 0.1,
        fisher_eta: float = 0.1,
        **kwargs: Any,
    ) -> TRAMFisher:
        """Build from ``TRAM(..., trust_region="fisher", ...)``'s arguments.

        ``fisher_eta`` is this class's ``eta``; TRAM's own ``eta`` (of the ASAM operator) has no
        meaning here and is refused, like every other option of TRAM's divergence.
        """
        refuse_unexpected_options(
            kwargs,
            {"sigma", "noise", "embeddings", "seed", *_SHARED},
            trust_region="fisher",
            why=", which measures no divergence",
        )
        return cls(base_optimizer, model, rho=rho, eta=fisher_eta, **kwargs)

    @property
    def trust_region(self) -> str:
        """``"fisher"``."""
        return "fisher"

    @property
    def sigma(self) -> float:
        """σ of the first pass's noise."""
        return self.noised_inputs.sigma

    @property
    def last_radius(self) -> None:
        """TRAM-Fisher measures no radius (its ascent radius is ``rho``)."""
        return None

    @property
    def reference(self) -> None:
        """None: TRAM-Fisher holds no reference weights."""
        return None

    @property
    def embeddings(self) -> nn.Module:
        """Where the first pass's noise goes."""
        return self.noised_inputs.embeddings

    @property
    def radius_history(self) -> list[float]:
        """Empty: TRAM-Fisher measures no radius."""
        return []

    def _observe_first_pass(self) -> contextlib.AbstractContextManager[Any]:
        if not self.ascent_due:
            return contextlib.nullcontext()
        return self._noised_first_pass()

    @contextlib.contextmanager
    def _noised_first_pass(self) -> Iterator[None]:
        # Eagerly: a model compiled in place (Module.compile(), a compiled forward) would run
        # a graph that skips the noise hook.
        with eager_forward(self.module), self.noised_inputs.noised() as handle:
            handle.training_forwards_only = True
            yield
        # Counted only when the pass completed: a failed one leaves nothing to ascend from.
        self._noised_forwards.count += handle.calls

    def _forget_first_passes(self) -> None:
        self._noised_forwards.count = 0

    def _radii(self) -> list[float] | None:
        forwards, self._noised_forwards.count = self._noised_forwards.count, 0
        if forwards == 0:
            raise RuntimeError(
                "TRAMFisher.first_step() found no first pass on noised inputs: run the first "
                "forward and backward inside `with optimizer.first_pass():`, or use "
                "optimizer.step(closure). A model compiled with torch.compile(model) runs a "
                "graph that ignores the noise hook TRAM-Fisher adds: call model._orig_mod in "
                "the closure, or compile in place (model.compile())"
            )
        return super()._radii()

    def _extra_state(self) -> dict[str, Any]:
        return self.noised_inputs.state_dict()

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if "noise_draws" in state or "generator" in state:
            self.noised_inputs.load_state_dict(state)

    def _upgrade_state_dict(self, state_dict: Any) -> Any:
        """A state dict saved by ``TRAM(trust_region="fisher")`` before TRAM-Fisher was its own
        class (its groups named this class's ``eta`` ``fisher_eta``), in this class's names."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if groups and all("fisher_eta" in group for group in groups):
            state_dict = dict(state_dict)
            state_dict["param_groups"] = [
                {
                    **{k: v for k, v in group.items() if k != "fisher_eta"},
                    "eta": group["fisher_eta"],
                }
                for group in groups
            ]
        return state_dict


_SHARED = ("ascent_every", "local_ascent", "foreach")
