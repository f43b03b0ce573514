"""Trust-region targets: reference weights and the plumbing to run a model on a recorded batch.

TRAM (and the loss-side regularizers TRPO and MESA) compare the model's output distribution with
the output of a *reference*: the pre-trained weights θ0, the previous step's weights θt−1, or an
exponential moving average of past weights. :class:`ReferenceWeights` holds such weights for the
trainable parameters only and runs the live module with them through
``torch.func.functional_call``: no second module, frozen parameters and buffers shared with the
live model, and the live model untouched afterwards. With ``dtype=torch.bfloat16`` the copy
takes half the memory and the reference forward runs under autocast.

The helpers :func:`call_model`, :func:`extract_logits` and :func:`logits_mask` turn a recorded
forward call back into logits and a padding mask.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from tram._ascent import foreach_copy_

__all__ = [
    "ReferenceWeights",
    "call_model",
    "extract_logits",
    "logits_mask",
    "unwrap_model",
]

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
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or _is_instance_of(
        model, "torch.distributed.fsdp.fully_sharded_data_parallel", "FullyShardedDataParallel"
    ):
        inner = model.module
    elif _is_instance_of(model, "torch._dynamo.eval_frame", "OptimizedModule"):
        inner = model._orig_mod
    elif any(cls.__name__ == "DeepSpeedEngine" for cls in type(model).__mro__):
        inner = model.module
    return inner if isinstance(inner, nn.Module) else None


def _is_instance_of(value: object, module_name: str, class_name: str) -> bool:
    # Only when the defining module is already imported: an instance cannot exist otherwise,
    # and importing FSDP or dynamo here would cost seconds on every call.
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


class ReferenceWeights:
    """A copy of a model's trainable parameters that can stand in for them in a forward pass.

    Args:
        model: the live model (unwrapped from DDP first). Only parameters with
            ``requires_grad`` are copied; frozen parameters and buffers are read from the live
            module at call time.
        dtype: storage dtype of the copy (e.g. ``torch.bfloat16`` to halve its memory); the
            reference forward then runs under autocast in that dtype.
    """

    def __init__(self, model: nn.Module, *, dtype: torch.dtype | None = None) -> None:
        self.model = unwrap_model(model)
        self.dtype = dtype
        self.names: list[str] = []
        self.live: list[Tensor] = []
        self.tensors: dict[str, Tensor] = {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            self.names.append(name)
            self.live.append(param)
            self.tensors[name] = param.detach().to(dtype=dtype or param.dtype, copy=True)
        if not self.names:
            raise ValueError(f"{type(self.model).__name__} has no trainable parameters")

    @torch.no_grad()
    def copy_from_model(self) -> None:
        """Set the reference to the live weights (θt−1 snapshots)."""
        foreach_copy_(list(self.tensors.values()), self.live)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """reference ← decay · reference + (1 − decay) · live weights."""
        tensors = list(self.tensors.values())
        if all(t.dtype == p.dtype for t, p in zip(tensors, self.live, strict=True)):
            torch._foreach_lerp_(tensors, self.live, 1.0 - decay)
        else:
            for t, p in zip(tensors, self.live, strict=True):
                t.lerp_(p.to(t.dtype), 1.0 - decay)

    def forward(self, inputs: Any) -> Any:
        """Run the live module with the reference weights on ``inputs`` (see :func:`call_model`)."""
        args: tuple[Any, ...]
        kwargs: dict[str, Any]
        if isinstance(inputs, Mapping):
            args, kwargs = (), dict(inputs)
        elif isinstance(inputs, (tuple, list)):
            args, kwargs = tuple(inputs), {}
        else:
            args, kwargs = (inputs,), {}
        return self.call(args, kwargs)

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the live module with the reference weights on ``(args, kwargs)``."""
        live_dtype = self.live[0].dtype
        if self.dtype is None or self.dtype == live_dtype:
            return functional_call(self.model, self.tensors, args, kwargs, strict=False)
        device_type = self.live[0].device.type
        with torch.autocast(device_type=device_type, dtype=self.dtype):
            return functional_call(self.model, self.tensors, args, kwargs, strict=False)

    def state_dict(self) -> dict[str, Tensor]:
        """The reference tensors by parameter name (weights-only loadable)."""
        return dict(self.tensors)

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Copy saved reference tensors in place; names must match."""
        missing = set(self.tensors) - set(state)
        unexpected = set(state) - set(self.tensors)
        if missing or unexpected:
            raise KeyError(
                "reference weights do not match the model: "
                f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        for name, tensor in self.tensors.items():
            tensor.copy_(state[name])
