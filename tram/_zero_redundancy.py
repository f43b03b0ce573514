"""torch's ``ZeroRedundancyOptimizer`` as the base optimizer.

``torch.distributed.optim.ZeroRedundancyOptimizer`` shards an optimizer's state across the
ranks: each rank's local optimizer (its ``optim`` attribute) holds the state of the parameters
it owns and steps them, then ``step()`` broadcasts the updated parameters to every rank. The
gradients are the full, all-reduced ones of DDP and every rank perturbs every parameter alike,
so a two-pass step around it is the one around the unsharded optimizer, bit for bit
(``tests/test_distributed.py``). Three of its ways need the wrapper's care:

- ``overlap_with_ddp=True`` moves the step into DDP's gradient communication hook, inside the
  backward: the first pass would take a plain step along the gradient at θ before the ascent
  (which then saves and perturbs the stepped weights), the second pass another one that the
  restore overwrites, and ``step()`` does nothing. It is refused at construction.
- ``state_dict()`` needs ``consolidate_state_dict(to=rank)`` on every rank first: the wrapper
  has that method when its base optimizer does (Lightning and Fabric look for it before they
  save), and its error says so.
- ``load_state_dict()`` writes the loaded state into the local optimizer in place, so undoing a
  refused load (``TwoPassOptimizer.load_state_dict``) must put the local optimizer's state and
  hyperparameters back as well (:class:`LocalOptimizerSnapshot`).

``tests/test_contract.py`` pins the private flag read here against the installed torch.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from tram._model_io import is_instance_of

__all__ = [
    "LocalOptimizerSnapshot",
    "is_zero_redundancy_optimizer",
    "refuse_overlap_with_ddp",
    "unconsolidated_state_error",
]

_MODULE = "torch.distributed.optim.zero_redundancy_optimizer"


def is_zero_redundancy_optimizer(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` is a ``ZeroRedundancyOptimizer`` (or a subclass of it); ``import
    tram`` stays clear of ``torch.distributed.optim``."""
    return is_instance_of(optimizer, _MODULE, "ZeroRedundancyOptimizer")


def refuse_overlap_with_ddp(method: str, optimizer: Optimizer) -> None:
    """Raise when ``optimizer`` is a ``ZeroRedundancyOptimizer`` built with
    ``overlap_with_ddp=True``: its updates run inside every backward, not in ``step()``."""
    if is_zero_redundancy_optimizer(optimizer) and getattr(optimizer, "_overlap_with_ddp", False):
        raise ValueError(
            f"{method} cannot wrap a ZeroRedundancyOptimizer built with overlap_with_ddp=True: "
            "it updates the weights inside DDP's backward (its communication hook), so both "
            "passes of the two-pass step would update them, at θ and at θ+ε, and its step() "
            "does nothing. Build it with overlap_with_ddp=False"
        )


def unconsolidated_state_error(method: str, error: RuntimeError) -> RuntimeError:
    """The error of the wrapper's ``state_dict()`` when the base ``ZeroRedundancyOptimizer``'s
    state was not consolidated, with the fix."""
    return RuntimeError(
        f"{method}.state_dict(): the base ZeroRedundancyOptimizer refused ({error}). Call "
        "optimizer.consolidate_state_dict(to=rank) (the base optimizer's) on every rank, then "
        "optimizer.state_dict() on that rank"
    )


class LocalOptimizerSnapshot:
    """The local optimizer of a ``ZeroRedundancyOptimizer``, as it was, to put back when a
    load is refused after the base optimizer took its part.

    ``ZeroRedundancyOptimizer.load_state_dict`` replaces the local optimizer's per-parameter
    state entries (new dicts) and sets its param groups' hyperparameters in place, so a
    shallow copy of each is enough; for any other optimizer there is nothing to keep."""

    def __init__(self, optimizer: Optimizer) -> None:
        zero = is_zero_redundancy_optimizer(optimizer)
        local: Optimizer | None = getattr(optimizer, "optim", None) if zero else None
        self._local = local
        self._state: dict[Any, Any] = dict(local.state) if local is not None else {}
        self._groups: list[dict[str, Any]] = (
            [dict(group) for group in local.param_groups] if local is not None else []
        )

    def restore(self) -> None:
        if self._local is None:
            return
        self._local.state.clear()
        self._local.state.update(self._state)
        for group, saved in zip(self._local.param_groups, self._groups, strict=True):
            group.clear()
            group.update(saved)
