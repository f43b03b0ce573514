"""Put back what a forward wrote into a model's buffers.

A two-pass step runs the model's forward a second time at θ+ε, and TRAM runs a reference forward
(θ0, θt−1, a noised input) before each recorded one. A module that keeps state in a buffer and
updates it in a training forward would update it in those forwards too, and the step would not
be the step without the wrapper: spectral normalisation's power-iteration vectors
(``torch.nn.utils.parametrizations.spectral_norm``: one power iteration per training forward;
the old ``torch.nn.utils.spectral_norm`` alike), the observers of quantisation-aware training
(``torch.ao.quantization``'s fake-quantise modules keep running minima and maxima), a counter.
A reference forward that writes them also changes the training forward after it (TRAM's
reference runs in the recorded forward's pre-hook: the spectral norm of the training forward
would start from the vector iterated at θ0).

BatchNorm's running statistics are frozen instead, so that no forward writes them
(:mod:`tram.batchnorm`). Every other buffer of the model is copied before such a forward and put
back after it when it was written (its version counter moved) or replaced: the second pass and
the reference forwards compute as before, with the state as they find it, and leave none
behind. This is the rule the original SAM code applies to BatchNorm (statistics of the first
pass only), for every buffer. The copy is of the model's buffers, which in the usual models are
small beside its weights (a transformer's position ids, a rotary embedding's frequencies, the
power-iteration vectors): it costs one copy of them per ascent and per reference forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "SavedBuffer",
    "buffers_put_back",
    "restore_buffers",
    "save_buffers",
    "save_own_buffers",
]


class SavedBuffer(NamedTuple):
    module: nn.Module
    name: str
    tensor: Tensor
    copy: Tensor
    version: int


_RUNNING_STATS = frozenset({"running_mean", "running_var", "num_batches_tracked"})


def save_buffers(model: nn.Module) -> list[SavedBuffer]:
    """A copy of each buffer of ``model`` that a forward could write, to put back with
    :func:`restore_buffers`. BatchNorm's running statistics are left out (frozen by the
    caller, so unwritten), and inference tensors (no forward outside inference mode can write
    one in place)."""
    return [entry for module in model.modules() for entry in save_own_buffers(module)]


def save_own_buffers(module: nn.Module) -> list[SavedBuffer]:
    """:func:`save_buffers` of ``module``'s own buffers (not its children's). A function per
    module without a ``no_grad`` context (its entry and exit would cost more than the walk):
    the copy is of the detached buffer."""
    buffers = module._buffers
    if not buffers:
        return []
    frozen_batchnorm = isinstance(module, _BatchNorm)
    return [
        SavedBuffer(module, name, buffer, buffer.detach().clone(), buffer._version)
        for name, buffer in buffers.items()
        if buffer is not None
        and not buffer.is_inference()
        and not (frozen_batchnorm and name in _RUNNING_STATS)
    ]


@torch.no_grad()
def restore_buffers(saved: list[SavedBuffer]) -> None:
    """Put back every buffer of ``saved`` written in place (its version moved) or replaced
    (another tensor, or none, under its name) since :func:`save_buffers`."""
    for entry in saved:
        if entry.module._buffers.get(entry.name) is not entry.tensor:
            entry.module._buffers[entry.name] = entry.tensor
        if entry.tensor._version != entry.version:
            entry.tensor.copy_(entry.copy)


@contextmanager
def buffers_put_back(model: nn.Module) -> Iterator[None]:
    """Inside the block, forwards of ``model`` may write its buffers; they are put back on
    leaving it (BatchNorm's running statistics excepted: freeze those)."""
    saved = save_buffers(model)
    try:
        yield
    finally:
        restore_buffers(saved)
