"""fp16 mixed precision with ``torch.amp.GradScaler``: the one supported recipe.

bf16 autocast needs nothing special (fp32 master weights and gradients). fp16 needs loss scaling,
and a two-pass step must respect how ``GradScaler`` works:

1. ``scaler.scale(loss).backward()`` at θ, inside ``optimizer.first_pass()`` (TRAM records
   this forward to measure d, TRAM-Fisher noises it, ``local_ascent`` suspends the gradient
   synchronisation);
2. ``optimizer.first_step(grad_scale=scaler.get_scale())``: the ascent is computed from the
   *scaled* gradients (the direction is scale-invariant; the Fisher operator is unscaled
   internally). Never ``unscale_`` here: ``unscale_`` may run once per step, so the second
   pass's gradients would reach the base step still scaled (``scaler.step`` refuses that, and
   a Fisher ascent without ``grad_scale``). A non-finite first pass skips the ascent and leaves
   the gradients alone;
3. if it perturbed: ``scaler.scale(loss).backward()`` at θ+ε, then ``optimizer.restore()``
   *before* ``scaler.step``, which skips ``optimizer.step()`` on overflow and would otherwise
   leave the weights perturbed;
4. ``scaler.unscale_(optimizer)`` (on the wrapper, never on ``optimizer.base_optimizer``: the
   scaler keys its bookkeeping by object and would unscale twice), optional clipping;
5. ``scaler.step(optimizer)`` and ``scaler.update()``: an overflow in either pass skips the step
   and backs the scale off, with the weights at θ.

Never pass a closure through ``scaler.step``: torch rejects ``closure=`` as a keyword, and the
wrapper refuses a positional one (both passes' gradients would stay scaled).
:func:`scaled_step` runs steps 1-5.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tram._wrapper import TwoPassOptimizer

__all__ = ["scaled_step"]


def scaled_step(
    optimizer: TwoPassOptimizer,
    scaler: torch.amp.GradScaler,
    loss_fn: Callable[[], Tensor],
    *,
    max_grad_norm: float | None = None,
) -> Tensor:
    """One two-pass step under fp16 loss scaling.

    Args:
        optimizer: a tram wrapper.
        scaler: the ``torch.amp.GradScaler``.
        loss_fn: runs the forward pass (under autocast) and returns the loss; no backward.
        max_grad_norm: clip the unscaled second-pass gradient to this norm.

    Returns:
        The first-pass loss, detached.
    """
    if not isinstance(optimizer, TwoPassOptimizer):
        raise TypeError(
            f"optimizer must be a tram two-pass optimizer, but got {type(optimizer).__name__}"
        )
    optimizer.zero_grad()
    with optimizer.first_pass():
        loss = loss_fn()
        scaler.scale(loss).backward()
    if optimizer.first_step(grad_scale=scaler.get_scale()):
        scaler.scale(loss_fn()).backward()
        optimizer.restore()
    scaler.unscale_(optimizer)
    if max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()
