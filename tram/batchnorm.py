"""Keep BatchNorm running statistics from the first (unperturbed) pass only.

A two-pass optimizer runs the model twice per step. Without care, BatchNorm's running mean and
variance (and ``num_batches_tracked``) are updated by both passes, the second one at perturbed
weights. The official SAM code keeps the statistics of the first pass only; this module does the
same in PyTorch.

The mechanism: while frozen, each BatchNorm module has ``track_running_stats = False``. In
training mode PyTorch then normalises with the batch statistics exactly as before, but passes no
running buffers to the kernel, so nothing is updated. This is exact for every ``momentum``
(including ``None``, the cumulative average, which the common "set momentum to 0" trick gets
wrong) and touches no buffer values.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["freeze_running_stats", "frozen_running_stats", "unfreeze_running_stats"]


def freeze_running_stats(model: nn.Module) -> list[_BatchNorm]:
    """Stop the running-statistics updates of every BatchNorm in ``model``.

    Returns the modules that were changed, to pass to :func:`unfreeze_running_stats`. Modules
    that do not track running statistics are left alone.
    """
    frozen = []
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            module.track_running_stats = False
            frozen.append(module)
    return frozen


def unfreeze_running_stats(modules: list[_BatchNorm]) -> None:
    """Undo :func:`freeze_running_stats`."""
    for module in modules:
        module.track_running_stats = True


@contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[list[_BatchNorm]]:
    """Context manager: BatchNorm running statistics of ``model`` are not updated inside it.

    Example::

        loss_fn(model(x), y).backward()      # first pass updates the statistics
        optimizer.first_step()
        with tram.frozen_running_stats(model):
            loss_fn(model(x), y).backward()  # second pass at the perturbed weights does not
        optimizer.second_step()

    Wrappers built with ``model=`` do this themselves between ``first_step`` and ``restore``.
    """
    frozen = freeze_running_stats(model)
    try:
        yield frozen
    finally:
        unfreeze_running_stats(frozen)
