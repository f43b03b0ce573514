"""Gradient accumulation for two-pass optimizers in hand-written loops.

SAM over an effective batch split into micro-batches needs one ascent per optimizer step, taken
from the gradient accumulated over *all* micro-batches, and then every micro-batch replayed at
θ+ε. Ascending on each micro-batch and restoring only at the end (the pattern of the TRAM
paper's released README) drifts the weights. The closure built here does the accumulation; the
wrapper's ``step(closure)`` calls it once at θ and once at θ+ε, which is exactly that recipe:

    closure = tram.accumulating_closure(optimizer, micro_batches, loss_fn, model=model)
    loss = optimizer.step(closure)

With equal-sized micro-batches and a mean-reduced loss the result equals one step on the
concatenated batch (tested). Under ``DistributedDataParallel`` the backward of every micro-batch
but the last runs under ``model.no_sync()``, so each pass all-reduces once. An FSDP2 module
(``fully_shard``) has no ``no_sync``: every micro-batch's backward reduce-scatters its gradient
and the shards accumulate the sum, which is exact too (``tests/test_distributed.py``). FSDP2's
``set_requires_gradient_sync(False)`` would save those reduce-scatters by holding unsharded
gradients on every rank until the last micro-batch; that trade of memory for communication is
left to the caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["accumulating_closure"]

_Batch = TypeVar("_Batch")


def accumulating_closure(
    optimizer: Optimizer,
    micro_batches: Sequence[_Batch],
    loss_fn: Callable[[_Batch], Tensor],
    *,
    model: nn.Module | None = None,
    weights: Sequence[float] | None = None,
) -> Callable[[], Tensor]:
    """Build a closure that accumulates the gradient of ``micro_batches``.

    Args:
        optimizer: its ``zero_grad`` is called at the start of each call.
        micro_batches: the micro-batches of one optimizer step (kept and replayed).
        loss_fn: maps a micro-batch to its mean loss (forward only; the closure backpropagates).
        model: when it has ``no_sync`` (DDP), all but the last backward run under it; an
            FSDP2 module reduce-scatters every micro-batch's gradient (see above).
        weights: the weight of each micro-batch loss; by default ``1 / len(micro_batches)``.
            Pass ``size_i / total_size`` for unequal micro-batches of a mean-reduced loss.

    Returns:
        A closure returning the weighted sum of the micro-batch losses (detached).
    """
    if len(micro_batches) == 0:
        raise ValueError("micro_batches is empty")
    if weights is None:
        weights = [1.0 / len(micro_batches)] * len(micro_batches)
    elif len(weights) != len(micro_batches):
        raise ValueError(
            f"weights has {len(weights)} entries but micro_batches has {len(micro_batches)}"
        )
    no_sync: Callable[[], Any] | None = getattr(model, "no_sync", None)

    def closure() -> Tensor:
        optimizer.zero_grad()
        total = None
        last = len(micro_batches) - 1
        for index, (batch, weight) in enumerate(zip(micro_batches, weights, strict=True)):
            context = (
                no_sync() if (no_sync is not None and index < last) else contextlib.nullcontext()
            )
            with context:
                loss = loss_fn(batch) * weight
                loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        assert total is not None
        return total

    return closure
