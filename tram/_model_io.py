"""Running a model on a recorded call: unwrapping, calling, finding logits and padding.

Shared by TRAM, its targets and the regularizers; re-exported from :mod:`tram.targets`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from tram._ascent import is_dtensor

__all__ = ["call_model", "extract_logits", "logits_mask", "unwrap_model"]

LogitsFn = Callable[[Any], Tensor]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside wrappers that only distribute or compile it.

    Unwrapped: ``DistributedDataParallel`` and ``DataParallel`` (what accelerate's ``prepare``
    returns too), FSDP1's ``FullyShardedDataParallel``, DeepSpeed's engine (all keep the model in
    ``.module``) and ``torch.compile``'s ``OptimizedModule`` (``._orig_mod``). Any other module is
    the model itself, whatever its children are called: a model with a child named ``module``
    is not a wrapper.
    """
    for _ in range(_MAX_WRAPPER_DEPTH):
        inner = _wrapped_module(model)
        if inner is None:
            return model
        model = inner
    raise ValueError(f"{type(model).__name__}: more than {_MAX_WRAPPER_DEPTH} nested wrappers")


_MAX_WRAPPER_DEPTH = 16


def _wrapped_module(model: nn.Module) -> nn.Module | None:
    """The module a known wrapper holds, or None when ``model`` is not one."""
    inner: Any = None
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or is_instance_of(
        model, "torch.distributed.fsdp.fully_sharded_data_parallel", "FullyShardedDataParallel"
    ):
        inner = model.module
    elif compiled_wrapper_inner(model) is not None:
        inner = model._orig_mod
    elif any(cls.__name__ == "DeepSpeedEngine" for cls in type(model).__mro__):
        inner = model.module
    return inner if isinstance(inner, nn.Module) else None


def uncompiled(model: nn.Module) -> nn.Module:
    """``model`` without the ``torch.compile`` wrappers around it (the module that runs its
    forward hooks; a compiled graph ignores hooks added after compilation). Distribution
    wrappers are kept."""
    for _ in range(_MAX_WRAPPER_DEPTH):
        inner = compiled_wrapper_inner(model)
        if inner is None:
            return model
        model = inner
    raise ValueError(f"{type(model).__name__}: more than {_MAX_WRAPPER_DEPTH} nested wrappers")


# The three ways torch.compile marks a module, named once here (torch's attribute names).
def compiled_wrapper_inner(module: nn.Module) -> nn.Module | None:
    """The module a ``torch.compile(module)`` wrapper (``OptimizedModule``) compiles, or None
    when ``module`` is not such a wrapper."""
    if not is_instance_of(module, "torch._dynamo.eval_frame", "OptimizedModule"):
        return None
    inner = module._orig_mod
    return inner if isinstance(inner, nn.Module) else None


def compiled_in_place(module: nn.Module) -> Callable[..., Any] | None:
    """The compiled call ``module.compile()`` set (what ``Module.__call__`` runs instead of the
    module's own call, hooks included), or None."""
    compiled_call: Callable[..., Any] | None = vars(module).get("_compiled_call_impl")
    return compiled_call


def uncompiled_forward(module: nn.Module) -> Callable[..., Any] | None:
    """The eager forward kept by ``module.forward = torch.compile(module.forward)``, or None
    when ``module``'s forward is not a compiled one."""
    forward = vars(module).get("forward")
    original: Callable[..., Any] | None = getattr(forward, "_torchdynamo_orig_callable", None)
    return original


def is_instance_of(value: object, module_name: str, class_name: str) -> bool:
    """Whether ``value`` is an instance of ``module_name.class_name`` (or a subclass), looked up
    only when that module is already imported: an instance cannot exist otherwise, and
    importing FSDP, dynamo or accelerate here would cost seconds on every call."""
    module = sys.modules.get(module_name)
    cls = getattr(module, class_name, None) if module is not None else None
    return isinstance(cls, type) and isinstance(value, cls)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on a batch: a mapping as keyword arguments, a tuple/list as positional
    arguments, anything else as the single argument."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def extract_logits(output: Any, logits_fn: LogitsFn | None = None) -> Tensor:
    """The logits of a model output: ``logits_fn(output)``, the output itself, or ``.logits``."""
    logits: Any
    if logits_fn is not None:
        logits = logits_fn(output)
    elif isinstance(output, Tensor):
        logits = output
    else:
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, Mapping):
            logits = output.get("logits")
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"cannot find logits in a model output of type {type(output).__name__}: the model "
            "must return a Tensor or an object with a .logits Tensor; otherwise pass logits_fn="
        )
    return logits


def logits_mask(kwargs: Mapping[str, Any], logits: Tensor) -> Tensor | None:
    """Which positions of ``logits`` count, from the batch's ``attention_mask`` or ``labels``.

    Only for per-token logits ``[B, T, V]``: the mask is ``attention_mask != 0`` when its shape is
    ``[B, T]``, else ``labels != -100`` when the labels are ``[B, T]``. Classification logits
    ``[B, C]`` have one distribution per example and need no mask. For causal language models the
    logits at position ``t`` are the distribution of token ``t + 1``; the attention mask marks
    exactly the positions whose prediction is conditioned on real tokens, so it is the right mask
    for a divergence between two models' next-token distributions.
    """
    if logits.dim() != 3:
        return None
    positions = logits.shape[:2]
    attention_mask = kwargs.get("attention_mask")
    if isinstance(attention_mask, Tensor) and attention_mask.shape == positions:
        return attention_mask != 0
    labels = kwargs.get("labels")
    if isinstance(labels, Tensor) and labels.shape == positions:
        return labels != -100
    return None


def parameters_are_sharded(model: nn.Module, module: nn.Module) -> bool:
    """Whether ``module``'s parameters are sharded (FSDP, FSDP2, DeepSpeed).

    Their forward gathers the parameters and scatters them again afterwards, so the reference
    forward must not run inside it (:class:`tram.TRAM` measures d of such models in ``first_step``,
    from the logits kept until then). Replicating wrappers (DDP, DataParallel) and
    ``torch.compile`` leave the parameters whole.
    """
    wrapper = model
    while wrapper is not module:
        inner = _replicating_wrapper_inner(wrapper)
        if inner is None:
            return True  # FSDP1, DeepSpeed: a wrapper that shards
        wrapper = inner
    sharding = ("FullyShardedDataParallel", "DeepSpeedEngine")
    for child in module.modules():
        names = {cls.__name__ for cls in type(child).__mro__}
        if names & set(sharding) or any(name.startswith("FSDP") for name in names):
            return True  # FSDP1 inside, or FSDP2's fully_shard (which renames the class FSDP...)
    return any(is_dtensor(param) for param in module.parameters())


def _replicating_wrapper_inner(wrapper: nn.Module) -> nn.Module | None:
    """The module inside DDP, DataParallel or ``torch.compile``'s wrapper; None otherwise."""
    if isinstance(wrapper, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return wrapper.module
    inner = getattr(wrapper, "_orig_mod", None)  # torch.compile's OptimizedModule
    return inner if isinstance(inner, nn.Module) else None
