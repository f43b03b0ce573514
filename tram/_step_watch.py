"""Which optimizer steps moved a model's parameters: what TRPO and MESA key their updates on.

Their references (θt−1, the moving average θ̄) must advance once per optimizer step. The
caller says when, with ``after_step(model)``; this module lets them check it against the steps
actually taken, through torch's global optimizer step post-hook (every
``torch.optim.Optimizer`` subclass's ``step`` runs it):

- ``after_step`` twice for one step (once per micro-batch, say, or by hand and by
  ``TramTrainer``) advances once;
- a step followed by a penalty without ``after_step`` in between is refused: the penalty would
  compare with a stale reference.

A model whose optimizer is not a ``torch.optim.Optimizer`` (or that is updated by hand) is
never seen stepping; the caller's ``after_step`` calls are then taken as they come.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_post_hook


class OptimizerStepWatch:
    """Records whether an optimizer stepped any of ``model``'s parameters since :meth:`reset`.

    The parameters are read at each step (a copy or an unpickled watch follows its own model).

    Attributes:
        stepped: a step moved some of the parameters since the last :meth:`reset`.
        observed: some step has ever been seen (the parameters' optimizer is observable).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.stepped = False
        self.observed = False
        self._register()

    def _register(self) -> None:
        this = weakref.ref(self)

        def hook(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
            watch = this()
            if watch is not None:
                watch._see(optimizer)

        handle = register_optimizer_step_post_hook(hook)
        # The hook holds the watch weakly: it goes when the watch does.
        weakref.finalize(self, handle.remove)

    def _see(self, optimizer: Optimizer) -> None:
        inner = getattr(optimizer, "base_optimizer", getattr(optimizer, "optimizer", None))
        if isinstance(inner, Optimizer):
            # A wrapper (tram's, accelerate's): the optimizer it wraps is seen if it steps; a
            # base step that the wrapper skipped is no step.
            return
        ids = {id(param) for param in self.model.parameters()}
        params = [
            param
            for group in optimizer.param_groups
            for param in group["params"]
            if id(param) in ids
        ]
        if not params or _initialises_state(optimizer, params):
            return
        self.stepped = True
        self.observed = True

    def reset(self) -> None:
        """Start a new step: :attr:`stepped` is False until the next one."""
        self.stepped = False

    def __getstate__(self) -> dict[str, Any]:
        return {"model": self.model, "stepped": self.stepped, "observed": self.observed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._register()


def _initialises_state(optimizer: Optimizer, params: list[Tensor]) -> bool:
    """The zero-gradient, lr-0 step that ``torch.distributed.checkpoint``'s
    ``set_optimizer_state_dict`` takes to create an optimizer's state before loading into it:
    it moves no weight and is no training step."""
    if any(float(group.get("lr", 1.0)) != 0.0 for group in optimizer.param_groups):
        return False
    with torch.no_grad():
        return all(param.grad is None or not bool(param.grad.any()) for param in params)
