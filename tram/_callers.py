"""Recognise frameworks that call ``step(closure)`` in a way a two-pass step cannot honour.

``TwoPassOptimizer.step(closure)`` calls the closure twice. PyTorch Lightning's automatic
optimization hands the optimizer a closure that runs ``training_step``, backward and its
gradient-clipping hook, and with ``accumulate_grad_batches=k > 1`` it runs the first k−1
micro-batches itself, outside ``step``: the second call of the closure then replays only the last
micro-batch at θ+ε and the update is that micro-batch's gradient divided by k, silently. Lightning
also clips after each call (the first pass's gradient too, which changes the ascent of a
value-clipped or Fisher step) and logs the loss of the last call, at θ+ε.

:func:`check_step_closure` recognises such a closure without importing Lightning (the closure is
``functools.partial(Precision._wrap_closure, module, optimizer, closure)``, built in
``lightning/pytorch/plugins/precision/precision.py``) and refuses the steps that would differ, or
warns once where only the logged loss differs. ``tram.integrations.lightning.TramCallback`` calls
``first_step()`` itself before the step, so it never reaches this check.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

__all__ = ["check_step_closure"]

_LIGHTNING_MODULES = ("lightning.", "pytorch_lightning.")


def _lightning_trainer(closure: Any) -> Any:
    """The Lightning ``Trainer`` whose precision plugin built ``closure`` under automatic
    optimization, else None."""
    if not isinstance(closure, functools.partial):
        return None
    owner = getattr(closure.func, "__self__", None)
    if owner is None or not type(owner).__module__.startswith(_LIGHTNING_MODULES):
        return None
    module = closure.args[0] if closure.args else None
    if not getattr(module, "automatic_optimization", False):
        return None  # manual optimization: the caller's own closure and logging
    return getattr(module, "_trainer", None)


def check_step_closure(optimizer: Any, closure: Any) -> None:
    """Refuse a ``step(closure)`` from Lightning's automatic optimization without ``TramCallback``.

    Raises:
        RuntimeError: ``accumulate_grad_batches > 1`` or gradient clipping (the step would differ
            from the two-pass step, silently).

    Warns:
        UserWarning: once per optimizer otherwise: the step is exact, but Lightning logs the loss
            at θ+ε.
    """
    trainer = _lightning_trainer(closure)
    if trainer is None:
        return
    name = type(optimizer).__name__
    fix = (
        "Add tram.integrations.lightning.TramCallback() to the Trainer's callbacks "
        "(Trainer(callbacks=[TramCallback()])): it takes the exact two-pass step"
    )
    accumulate = getattr(trainer, "accumulate_grad_batches", 1)
    if accumulate > 1:
        raise RuntimeError(
            f"{name} is stepped by Lightning's automatic optimization with "
            f"accumulate_grad_batches={accumulate}: Lightning runs the first micro-batches "
            "outside step(closure), so the second pass would replay only the last one and the "
            f"update would be that micro-batch's gradient divided by {accumulate}. {fix}"
        )
    clip = getattr(trainer, "gradient_clip_val", None)
    if clip:
        raise RuntimeError(
            f"{name} is stepped by Lightning's automatic optimization with "
            f"gradient_clip_val={clip}: Lightning would clip the first pass's gradient too, "
            f"before the ascent. {fix}"
        )
    state = optimizer._step_state
    if state.warned_lightning_logging:
        return
    state.warned_lightning_logging = True
    warnings.warn(
        f"{name} is stepped by Lightning's automatic optimization without TramCallback: the "
        "step is exact, but training_step runs at θ+ε last, so self.log and the progress bar "
        f"show the loss at the perturbed weights. {fix}, which logs the loss at θ",
        UserWarning,
        stacklevel=4,
    )
