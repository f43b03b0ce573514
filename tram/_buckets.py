"""Parameters grouped for the fused ascent: one bucket per group, operator, device and dtype.

The ``torch._foreach_*`` kernels need lists of tensors of one device and dtype, and the ascent
applies one operator ``T`` (and one ``eta``) per call; a bucket is such a list, with the
gradients and the weight backups that go with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from tram._ascent import Scaling
from tram._validation import refuse_fsdp1_parameters

__all__ = ["Bucket", "collect_buckets", "use_foreach"]


class Bucket:
    """Parameters of one group that share an operator, a device and a dtype."""

    __slots__ = ("backups", "eta", "grads", "group_index", "params", "scaling")

    def __init__(self, group_index: int, scaling: Scaling, eta: float) -> None:
        self.group_index = group_index
        self.scaling: Scaling = scaling
        self.eta = eta
        self.params: list[Tensor] = []
        self.grads: list[Tensor] = []
        self.backups: list[Tensor] = []


def collect_buckets(
    param_groups: list[dict[str, Any]],
    scaling: Callable[[dict[str, Any], Tensor], tuple[Scaling, float]],
    *,
    method: str,
) -> list[Bucket]:
    """The parameters that have a gradient, bucketed; ``scaling`` gives each one's ``T``."""
    buckets: dict[tuple[Any, ...], Bucket] = {}
    for index, group in enumerate(param_groups):
        for param in group["params"]:
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(
                    f"{method} does not support sparse gradients, but got one for a parameter "
                    f"of shape {tuple(param.shape)} in param group {index}: the ascent is "
                    "taken along the whole gradient. Build the embedding with sparse=False "
                    "(nn.Embedding(..., sparse=False)) and a dense base optimizer"
                )
            kind, eta = scaling(group, param)
            key = (index, kind, eta, param.device, param.dtype)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = Bucket(index, kind, eta)
            bucket.params.append(param)
            bucket.grads.append(grad)
    return list(buckets.values())


def backup_for(backups: dict[Tensor, Tensor], param: Tensor, *, method: str) -> Tensor:
    """The buffer that holds ``param``'s weights while perturbed, allocated once per parameter.

    A parameter's first ascent is also where FSDP1 parameters are refused when FSDP1 wrapped
    the model after the optimizer was built (the constructor saw them unflattened).
    """
    backup = backups.get(param)
    if backup is None:
        refuse_fsdp1_parameters(method, [param])
        backup = torch.empty_like(param, memory_format=torch.preserve_format)
        backups[param] = backup
    return backup


def use_foreach(foreach: bool | None, params: list[Tensor]) -> bool:
    """``foreach`` if set, else whether every parameter is on CUDA (``torch.optim``'s default)."""
    if foreach is not None:
        return foreach
    return all(p.device.type == "cuda" for p in params)
