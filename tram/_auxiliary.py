"""Forwards that are not a step's training forward: a regularizer's extra passes.

TRAM measures d on the training forward of its first pass, and TRAM-Fisher noises that forward.
A regularizer called inside the first pass (R3F's noised forward, TRPO's and MESA's reference
forwards) runs the model again; those forwards are neither recorded nor noised. The
:class:`tram.regularizers.Regularizer` base class marks its penalty with
:func:`auxiliary_forwards`; the recorder and TRAM-Fisher's noise ask
:func:`in_auxiliary_forward`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

__all__ = ["auxiliary_forwards", "in_auxiliary_forward"]

_AUXILIARY = contextvars.ContextVar("tram_auxiliary_forward", default=False)


@contextlib.contextmanager
def auxiliary_forwards() -> Iterator[None]:
    """Mark the forwards run inside the block as auxiliary (not the training forward)."""
    token = _AUXILIARY.set(True)
    try:
        yield
    finally:
        _AUXILIARY.reset(token)


def in_auxiliary_forward() -> bool:
    """Whether the current forward runs inside :func:`auxiliary_forwards`."""
    return _AUXILIARY.get()
