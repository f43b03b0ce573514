"""A two-pass optimizer step in a hand-written accelerate loop.

accelerate's ``AcceleratedOptimizer`` runs ``step()`` and ``zero_grad()`` only on the micro-batch
that closes a gradient-accumulation window (``accelerator.sync_gradients``), does not forward
attributes such as ``first_step`` to the optimizer it wraps, and under fp16 hands ``step()`` to a
``GradScaler``, which skips it on overflow. :class:`TwoPassBackward` drives the two passes around
those rules, so the rest of an ordinary accelerate loop stays as it is::

    from tram.integrations.accelerate import TwoPassBackward

    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    backward = TwoPassBackward(accelerator, model, optimizer, loss_fn)   # loss_fn(model, batch)
    for batch in loader:
        with accelerator.accumulate(model):
            # replaces: loss = loss_fn(model, batch); accelerator.backward(loss)
            loss = backward(batch)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

``optimizer`` is the prepared ``AcceleratedOptimizer`` around a tram wrapper (build the wrapper
first, ``tram.SAM(torch.optim.AdamW(...))``, then ``prepare`` it). Each call runs the forward and
backward of one micro-batch at θ and keeps the micro-batch. On the micro-batch that closes the
window it then takes one ascent from the gradient accumulated over the whole window, replays every
micro-batch of the window at θ+ε (under ``no_sync`` except the last, so DDP all-reduces once),
and restores θ *before* ``optimizer.step()``: clipping then sees the second-pass gradient, and a
``GradScaler`` that skips the step on overflow leaves the weights at θ. Under fp16 the ascent is
computed from the scaled gradients with ``grad_scale=scaler.get_scale()``; an overflow in the
first pass skips the ascent (the scaler then skips the step and backs off), one in the second
pass skips the step.

The first pass of every micro-batch runs inside the wrapper's ``first_pass()``: under
``local_ascent=True`` (on ascent steps) it runs under ``no_sync``, so each DDP worker ascends
along its own gradient (one all-reduce per step instead of two; FSDP2 supports the synchronised
ascent only), and TRAM records the forward it measures its trust region on. A regularizer's
extra forward inside ``loss_fn`` is recorded with it; to combine TRAM with forward-running
regularizers (R3F, TRPO, MESA) use the Trainer integration, which keeps them apart. Both passes
go through ``accelerator.backward``, which divides by accelerate's accumulation steps, so they
are normalised alike. ``loss_fn`` runs in both passes: measure and log from the loss the call
returns (the first pass's, at θ), or inside ``loss_fn`` only while
``unwrap_optimizer(optimizer).is_perturbed`` is False.

This module does not import accelerate at import time; it works with any object that has
accelerate's ``Accelerator`` interface (``backward``, ``no_sync``, ``sync_gradients``,
``scaler``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from tram._wrapper import TwoPassOptimizer

__all__ = ["TwoPassBackward", "unwrap_optimizer"]

_MAX_UNWRAP_DEPTH = 8


def unwrap_optimizer(optimizer: Any) -> TwoPassOptimizer | None:
    """The tram wrapper inside ``optimizer`` (following ``.optimizer`` links), or None.

    accelerate's ``AcceleratedOptimizer`` (and similar framework wrappers) keep the optimizer
    they wrap in ``.optimizer`` and do not forward its methods.
    """
    current = optimizer
    for _ in range(_MAX_UNWRAP_DEPTH):
        if isinstance(current, TwoPassOptimizer):
            return current
        current = getattr(current, "optimizer", None)
        if current is None:
            return None
    return None


def grad_scale_of(accelerator: Any) -> float | None:
    """The loss scale of ``accelerator``'s enabled ``GradScaler``, or None without one."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return float(scaler.get_scale())


class TwoPassBackward:
    """Forward and backward of one micro-batch, plus the two-pass step at the window's end.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        model: the prepared model (DDP wrapper included) that ``loss_fn`` calls.
        optimizer: the prepared optimizer; a tram wrapper must be inside it.
        loss_fn: ``loss_fn(model, batch) -> loss`` runs the forward of one micro-batch and returns
            a scalar loss (no backward).

    Attributes:
        last_perturbed: whether the last window's ascent was taken (False on a skipped or an
            ``ascent_every`` off-step).
    """

    def __init__(
        self,
        accelerator: Any,
        model: nn.Module,
        optimizer: Any,
        loss_fn: Callable[[nn.Module, Any], Tensor],
    ) -> None:
        wrapper = unwrap_optimizer(optimizer)
        if wrapper is None:
            raise TypeError(
                "TwoPassBackward needs a tram two-pass optimizer (e.g. tram.SAM(AdamW(...))) "
                f"inside the prepared optimizer, but got {type(optimizer).__name__}"
            )
        if wrapper.local_ascent and getattr(accelerator, "is_fsdp2", False):
            raise ValueError(
                "local_ascent=True is not available under FSDP2 (gradients stay unsharded "
                "until a synchronised backward); use the synchronised ascent"
            )
        self.accelerator = accelerator
        self.model = model
        self.optimizer = wrapper
        self.loss_fn = loss_fn
        self.last_perturbed = False
        self._window: list[Any] = []

    def _no_sync(self) -> contextlib.AbstractContextManager[Any]:
        context: contextlib.AbstractContextManager[Any] = self.accelerator.no_sync(self.model)
        return context

    def __call__(self, batch: Any) -> Tensor:
        """Run one micro-batch; on the window's last one also ascend, replay and restore.

        Returns:
            The first-pass loss of ``batch``, detached.
        """
        optimizer = self.optimizer
        if optimizer.is_perturbed:
            raise RuntimeError("the weights are perturbed at the start of a micro-batch")
        self._window.append(batch)
        closing = bool(self.accelerator.sync_gradients)
        # first_pass() enters no_sync for local_ascent (on ascent steps) and lets the method
        # observe the forward (TRAM records it).
        no_sync = self._no_sync() if optimizer.local_ascent else None
        try:
            with optimizer.first_pass(no_sync=no_sync):
                loss = self.loss_fn(self.model, batch)
                self.accelerator.backward(loss)
            if not closing:
                return loss.detach()
            window = self._window
            self.last_perturbed = optimizer.first_step(grad_scale=grad_scale_of(self.accelerator))
            if self.last_perturbed:
                try:
                    last = len(window) - 1
                    with optimizer.second_pass():
                        for index, micro_batch in enumerate(window):
                            replay = self._no_sync() if index < last else contextlib.nullcontext()
                            with replay:
                                self.accelerator.backward(self.loss_fn(self.model, micro_batch))
                finally:
                    optimizer.restore()
            return loss.detach()
        finally:
            if closing:
                self._window = []
