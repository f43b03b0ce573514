"""Argument checks shared by the wrappers, the targets and the regularizers.

Each raises with torch's wording (``ValueError("Invalid lr: -1")``, ``TypeError`` for a wrong
kind of object) and names the argument and the value it got.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from tram._model_io import is_instance_of
from tram._zero_redundancy import refuse_overlap_with_ddp

__all__ = [
    "check_base_optimizer",
    "check_non_negative",
    "check_parameters",
    "check_positive_int",
    "check_unit_interval",
    "inverse_grad_scale",
    "refuse_fsdp1_parameters",
]


def check_non_negative(name: str, value: object) -> float:
    """Return ``value`` as a float, or raise ``ValueError("Invalid <name>: <value>")``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: {value!r} (expected a non-negative number)")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name}: {value}")
    return float(value)


def check_unit_interval(name: str, value: object) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` unless it is a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"Invalid {name}: {value!r} (expected a number in [0, 1])")
    return float(value)


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an int >= 1, or raise ``ValueError("Invalid <name>: <value>")``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= 1)")
    return value


def inverse_grad_scale(grad_scale: float | Tensor | None) -> float:
    """``1 / grad_scale`` (1 without a scale), or ``ValueError`` unless it is a positive number."""
    if grad_scale is None:
        return 1.0
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float, Tensor)):
        raise ValueError(
            f"Invalid grad_scale: {grad_scale!r} (expected a positive number or tensor)"
        )
    value = float(grad_scale)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"Invalid grad_scale: {value}")
    return 1.0 / value


def check_base_optimizer(
    method: str, base_optimizer: Any, defaults: dict[str, Any], model: Any
) -> None:
    """Refuse what a two-pass wrapper cannot wrap, saying how to fix it.

    ``defaults`` are the method's hyperparameters: they live in the param groups shared with the
    base optimizer, so a name the base optimizer also uses (Adadelta's ``rho``) would make the
    ascent read the base optimizer's value, silently.
    """
    from tram._wrapper import TwoPassOptimizer  # the wrapper imports this module

    if isinstance(base_optimizer, type):
        raise TypeError(
            f"base_optimizer must be an optimizer instance, but got the class "
            f"{base_optimizer.__name__}; construct it first, e.g. "
            f"{method}({base_optimizer.__name__}(model.parameters(), lr=...))"
        )
    if not isinstance(base_optimizer, Optimizer):
        raise TypeError(
            "base_optimizer must be a torch.optim.Optimizer instance, but got "
            f"{type(base_optimizer).__name__}"
        )
    cls = type(base_optimizer)
    _refuse_incomplete_optimizer(method, base_optimizer)
    if isinstance(base_optimizer, TwoPassOptimizer):
        raise TypeError(
            f"base_optimizer is already a two-pass optimizer ({cls.__name__}); wrap the "
            "underlying optimizer instead"
        )
    if is_instance_of(base_optimizer, "accelerate.optimizer", "AcceleratedOptimizer"):
        # accelerate's prepared optimizer, or a subclass (its DeepSpeed and Megatron-LM ones):
        # its step() and zero_grad() do nothing on the micro-batches that do not close an
        # accumulation window, and under fp16 its step() unscales: inside the two passes.
        raise TypeError(
            f"base_optimizer is accelerate's prepared optimizer (AcceleratedOptimizer): {method} "
            "would run its two passes inside accelerate's step rules (steps and zero_grad() "
            "skipped inside an accumulation window, gradients unscaled at the base step). Build "
            f"the {method} around the optimizer first, then accelerator.prepare() the {method}, "
            "and drive it with tram.integrations.accelerate.TwoPassBackward"
        )
    own_passes = _own_two_pass_methods(base_optimizer)
    if own_passes:
        # Another library's sharpness-aware optimizer (pytorch_optimizer's SAM, WSAM, LookSAM,
        # GSAM, the SAM paper's reference code): its step() runs both passes itself from a
        # closure.
        raise TypeError(
            f"base_optimizer is already a two-pass optimizer ({cls.__module__}.{cls.__qualname__}"
            f", with {' and '.join(name + '()' for name in own_passes)}): {method} would take a "
            "third pass; wrap the optimizer it wraps instead"
        )
    refuse_overlap_with_ddp(method, base_optimizer)
    if not any(group["params"] for group in base_optimizer.param_groups):
        raise ValueError("base_optimizer has an empty parameter list")
    if _step_needs_a_closure(base_optimizer):
        raise TypeError(
            f"{method} cannot wrap {type(base_optimizer).__name__}: its step() needs a closure, "
            "which it calls itself for the gradients it steps with (LBFGS's line search, the "
            "schedule-free *Closure optimizers' gradient at their own point), whereas the "
            "two-pass step hands the base optimizer the gradient of the second pass, with no "
            "closure"
        )
    check_parameters(
        method, [param for group in base_optimizer.param_groups for param in group["params"]]
    )
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
    collisions = sorted(set(defaults) & set(base_optimizer.defaults))
    if collisions:
        raise ValueError(
            f"{method}'s hyperparameter {', '.join(map(repr, collisions))} has the name of one "
            f"of {type(base_optimizer).__name__}'s own, and both live in the shared param "
            "groups: the ascent would use the base optimizer's value, and setting the method's "
            "would change the base optimizer. This base optimizer cannot be wrapped by this method"
        )


_PARTS_OF_AN_OPTIMIZER = ("defaults", "state", "param_groups")


def _refuse_incomplete_optimizer(method: str, optimizer: Optimizer) -> None:
    """Refuse a subclass of ``Optimizer`` that never ran ``Optimizer.__init__``, so lacks part
    of what the wrapper shares with it (torch's ``PostLocalSGDOptimizer`` has no ``defaults``
    and re-exposes its inner optimizer's ``param_groups`` as they were at construction: after
    ``load_state_dict`` a scheduler would drive groups the inner optimizer no longer reads)."""
    missing = [name for name in _PARTS_OF_AN_OPTIMIZER if not hasattr(optimizer, name)]
    if not missing:
        return
    cls = type(optimizer)
    advice = ""
    if cls.__name__ == "PostLocalSGDOptimizer":
        advice = (
            ". Wrap the optimizer it wraps, and after each optimizer.step() average the weights "
            "with its averager: averager.average_parameters(model.parameters())"
        )
    raise TypeError(
        f"{method} cannot wrap {cls.__module__}.{cls.__qualname__}: it is not a complete "
        f"torch.optim.Optimizer (it has no {', '.join(missing)}; its __init__ does not run "
        f"Optimizer.__init__), and the wrapper shares its param groups and state{advice}"
    )


_OWN_TWO_PASS_METHODS = (("first_step", "second_step"), ("perturb_weights", "un_perturb"))


def _own_two_pass_methods(optimizer: Optimizer) -> tuple[str, ...]:
    """The pair of methods by which ``optimizer`` moves to its own ascent point and back, or ()
    when it has none: ``first_step``/``second_step`` (the SAM paper's code and most libraries
    that follow it), ``perturb_weights``/``un_perturb`` (pytorch_optimizer's GSAM)."""
    for pair in _OWN_TWO_PASS_METHODS:
        if all(callable(getattr(optimizer, name, None)) for name in pair):
            return pair
    return ()


def _step_needs_a_closure(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step`` has a ``closure`` argument without a default (LBFGS), or is
    one of the schedule-free package's ``*Closure`` optimizers: before schedulefree 1.3 their
    ``step(closure=None)`` declared a default yet called the closure unconditionally, after
    moving the weights to its extrapolated point (a subclass of one is one too)."""
    for cls in type(optimizer).__mro__:
        if cls.__module__.split(".")[0] == "schedulefree" and cls.__name__.endswith("Closure"):
            return True
    try:
        parameter = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):  # no signature to read: assume torch's contract
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty


def check_parameters(method: str, params: list[Tensor]) -> None:
    """Refuse what no wrapper can perturb exactly: FSDP1's shards, a tensor listed twice."""
    refuse_fsdp1_parameters(method, params)
    refuse_duplicate_parameters(method, params)


def refuse_fsdp1_parameters(method: str, params: Iterable[Tensor]) -> None:
    """Refuse parameters that FSDP1 (``FullyShardedDataParallel``) has flattened.

    FSDP1 marks every parameter it manages, its ``FlatParameter`` and (with
    ``use_orig_params=True``) the original parameters viewing into it, with ``_fsdp_flattened``.
    They are plain tensors holding one rank's shard: the ascent's ‖g‖ would be that shard's, so
    each rank would scale its part of ε by a different norm, none of them the model's. FSDP2's
    ``DTensor`` parameters reduce the norm over the shards, so the wrappers support it instead.
    """
    if any(getattr(param, "_fsdp_flattened", False) for param in params):
        raise RuntimeError(
            f"{method} does not support parameters flattened by FSDP1 "
            "(torch.distributed.fsdp.FullyShardedDataParallel): each rank holds a shard, and "
            "the ascent would scale each shard by its own gradient norm instead of the "
            "model's. Shard the model with FSDP2 instead (torch.distributed.fsdp.fully_shard; "
            "accelerate: FullyShardedDataParallelPlugin(fsdp_version=2); Hugging Face "
            "Trainer: fsdp_config={'version': 2}), or replicate it with "
            "DistributedDataParallel"
        )


def refuse_duplicate_parameters(method: str, params: Iterable[Tensor]) -> None:
    """Refuse a tensor listed twice (torch only warns, "in future, this will cause an error"):
    its gradient would count twice in the ascent's norm and ε would be added once per listing."""
    seen: set[int] = set()
    for param in params:
        if id(param) in seen:
            raise ValueError(
                f"{method}: the same parameter (shape {tuple(param.shape)}) is listed more than "
                "once in the param groups: its gradient would count twice in the ascent's "
                "norm and the ascent would move it twice. List each parameter once (e.g. "
                "model.parameters(), which lists tied weights once)"
            )
        seen.add(id(param))
