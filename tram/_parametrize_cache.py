"""torch's cache of parametrized weights (``torch.nn.utils.parametrize.cached()``) and the
two passes of a step.

Inside ``cached()`` a parametrized weight (``module.weight`` computed from
``module.parametrizations.weight.original``) is computed once and reused until the context
ends, keyed by module and name. Two of tram's forwards must not share it with the training
forwards: TRAM's reference forward, which runs the same modules with the target's weights
(:mod:`tram.targets`) before each recorded forward and would leave its weights, computed without
gradient, for the training forward to reuse; and a second pass in the same context as the first,
which would reuse the weights computed at θ. torch keeps the cache in the module's private
``_cache`` while its private counter ``_cache_enabled`` is positive;
``tests/test_guarantees.py`` checks that both names still exist.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch.nn.utils import parametrize

__all__ = ["refuse_a_filled_cache", "uncached"]


def refuse_a_filled_cache(method: str) -> None:
    """Raise when ``first_step()`` runs inside ``cached()`` after a forward cached parametrized
    weights at θ that need a gradient: the second pass would reuse them and take the gradient at
    θ instead of θ+ε, a plain step, silently."""
    if not getattr(parametrize, "_cache_enabled", 0):
        return
    cache = getattr(parametrize, "_cache", None) or {}
    # A frozen network's cached weights (a teacher's) need no gradient and do not move.
    if any(getattr(value, "requires_grad", False) for value in cache.values()):
        raise RuntimeError(
            f"{method}: first_step() was called inside torch.nn.utils.parametrize.cached() "
            "after a forward had cached parametrized weights at θ: the second pass would "
            "reuse them, and take the gradient at θ instead of θ+ε. Enter cached() inside the "
            "closure (around each forward) instead of around the whole step. Nothing was moved"
        )


@contextlib.contextmanager
def uncached() -> Iterator[None]:
    """Compute parametrized weights afresh inside, neither reading nor filling the cache of an
    enclosing ``cached()``; a no-op outside one."""
    enabled = getattr(parametrize, "_cache_enabled", 0)
    if not enabled:
        yield
        return
    parametrize._cache_enabled = 0
    try:
        yield
    finally:
        parametrize._cache_enabled = enabled
