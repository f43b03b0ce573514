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

Two more callers hand a closure to ``step`` that the two passes cannot honour, and are recognised
from the frames that call it (their own ``self``):

- an enabled ``torch.amp.GradScaler``'s ``step(optimizer, closure)`` (the closure passed by
  position; an enabled scaler refuses it by keyword only) unscales the gradients that are there
  *before* the closure runs, then calls ``optimizer.step(closure)``: both passes' gradients stay
  scaled, and the update is the scale times too large. accelerate's prepared optimizer does
  exactly this under fp16. A disabled scaler only calls ``optimizer.step(closure)``: accepted.
- accelerate's ``AcceleratedOptimizer.step(closure)`` inside ``accelerator.accumulate`` with
  ``gradient_accumulation_steps=k > 1`` calls the optimizer only on the micro-batch that closes
  the window: the closures of the other k−1 never ran. Outside ``accumulate()`` it calls it
  every time, but accelerate keeps nothing that tells the two apart, so any ``k > 1`` is
  refused.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Iterator
from types import CodeType, FrameType
from typing import Any

from torch.amp import GradScaler
from torch.amp.grad_scaler import OptState

__all__ = ["check_step_closure", "grad_scaler_stepping", "has_unscaled"]

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


# How far above ``TwoPassOptimizer.step`` to look for the caller: torch's step hooks, an LR
# scheduler's step counter, accelerate's patched step and GradScaler's _maybe_opt_step each
# put a frame of their own between the two.
_CALLER_FRAMES = 8


def _closure_callers() -> dict[CodeType, str]:
    """The code of the ``step`` methods that call ``optimizer.step(closure)`` in a way the two
    passes cannot honour, named: torch's ``GradScaler.step`` and, when accelerate is imported,
    its ``AcceleratedOptimizer.step``."""
    codes = {GradScaler.step.__code__: "GradScaler"}
    accelerate = sys.modules.get("accelerate.optimizer")
    prepared = getattr(accelerate, "AcceleratedOptimizer", None)
    if prepared is not None:
        codes[prepared.step.__code__] = "AcceleratedOptimizer"
    return codes


def _callers_above(
    frame: FrameType | None, codes: dict[CodeType, str]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The callers named in ``codes`` (by their code) among the ``_CALLER_FRAMES`` frames from
    ``frame`` up, innermost first, each with its locals: only theirs are read."""
    for _ in range(_CALLER_FRAMES):
        if frame is None:
            return
        caller = codes.get(frame.f_code)
        if caller is not None:
            yield caller, frame.f_locals
        frame = frame.f_back


def grad_scaler_stepping(frame: FrameType | None) -> tuple[GradScaler, Any] | None:
    """The enabled ``torch.amp.GradScaler`` whose ``step(optimizer)`` called the optimizer's
    ``step``, among the ``_CALLER_FRAMES`` frames from ``frame`` up, with the ``optimizer`` it
    was given (the wrapper, or a framework's proxy of it); else None."""
    for _, caller_locals in _callers_above(frame, {GradScaler.step.__code__: "GradScaler"}):
        owner = caller_locals.get("self")
        if isinstance(owner, GradScaler) and owner.is_enabled():
            return owner, caller_locals.get("optimizer")
        return None
    return None


def has_unscaled(scaler: GradScaler, optimizer_id: int) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` ran since the scaler's last ``update()``, for the
    optimizer whose ``id`` is ``optimizer_id``. The scaler keeps each optimizer's stage in its
    private ``_per_optimizer_states``, keyed by ``id(optimizer)`` (tests/test_amp.py pins both
    names); ``get`` leaves that defaultdict as it was for an optimizer it has not seen."""
    states = getattr(scaler, "_per_optimizer_states", None)
    entry = states.get(optimizer_id) if isinstance(states, dict) else None
    return entry is not None and entry.get("stage") is OptState.UNSCALED


def _refuse_closure_callers(name: str, frame: FrameType | None) -> None:
    """Refuse a ``GradScaler.step(optimizer, closure)`` or an accelerate
    ``AcceleratedOptimizer.step(closure)`` under gradient accumulation among the
    ``_CALLER_FRAMES`` frames from ``frame`` up (recognised by their code: only theirs have
    their locals read)."""
    fix = (
        "Run the passes with tram.scaled_step(optimizer, scaler, loss_fn), or in an accelerate "
        "loop with tram.integrations.accelerate.TwoPassBackward and optimizer.step() without a "
        "closure. No step was taken; the weights are at θ"
    )
    for caller, caller_locals in _callers_above(frame, _closure_callers()):
        owner = caller_locals.get("self")
        if caller == "GradScaler" and isinstance(owner, GradScaler) and owner.is_enabled():
            # A disabled scaler calls optimizer.step(closure) and nothing else.
            raise RuntimeError(
                f"{name}.step(closure) is called by torch.amp.GradScaler.step(optimizer, "
                "closure) (as accelerate's prepared optimizer does under fp16): the scaler "
                "unscales the gradients left before the closure runs (and judges overflow from "
                "them), so both passes' gradients would stay scaled, by "
                f"{owner.get_scale():g}, when the base optimizer steps with them. The scaler "
                "has unscaled those earlier gradients in place: call scaler.update() before the "
                f"next step. {fix}"
            )
        if caller == "AcceleratedOptimizer":
            steps = int(getattr(getattr(owner, "gradient_state", None), "num_steps", 1))
            if steps > 1:
                # Outside accelerator.accumulate() accelerate would call it every time, but
                # nothing it keeps tells the two apart.
                raise RuntimeError(
                    f"{name}.step(closure) is called by accelerate's prepared optimizer with "
                    f"gradient_accumulation_steps={steps}: inside accelerator.accumulate() it "
                    "calls the optimizer, closure included, only on the micro-batch that closes "
                    f"the accumulation window, so the closures of the other {steps - 1} "
                    "micro-batches never ran (refused whenever gradient_accumulation_steps > 1, "
                    f"as accelerate does not say whether accumulate() is active). {fix}"
                )


def check_step_closure(optimizer: Any, closure: Any) -> None:
    """Refuse a ``step(closure)`` whose caller would make it differ from the two-pass step:
    Lightning's automatic optimization without ``TramCallback``, ``GradScaler.step(optimizer,
    closure)``, accelerate's prepared optimizer under gradient accumulation.

    Raises:
        RuntimeError: Lightning with ``accumulate_grad_batches > 1`` or gradient clipping, a
            ``GradScaler`` or an accumulating accelerate optimizer calling (the step would differ
            from the two-pass step, silently).

    Warns:
        UserWarning: once per optimizer under Lightning otherwise: the step is exact, but
            Lightning logs the loss at θ+ε.
    """
    # Skip this function's frame and TwoPassOptimizer.step's.
    _refuse_closure_callers(type(optimizer).__name__, sys._getframe(2))
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
