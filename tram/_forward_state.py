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
back after it (under its name, if replaced): the second pass and the reference forwards
compute as before, with the state as they find it, and leave none behind. This is the rule the
original SAM code applies to BatchNorm (statistics of the first pass only), for every buffer.
The copy is of the model's buffers, which in the usual models are small beside its weights (a
transformer's position ids, a rotary embedding's frequencies, the power-iteration vectors): it
costs a copy of them per ascent and per reference forward, and a comparison of each with its
copy where its version counter did not move (some writes move none).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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
    "save_buffers_outside",
    "save_own_buffers",
]


class SavedBuffer(NamedTuple):
    module: nn.Module
    name: str
    tensor: Tensor
    copy: Tensor | None
    """None for a buffer no write can reach in place (see :func:`_writable_in_place`)."""
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
        SavedBuffer(
            module,
            name,
            buffer,
            buffer.detach().clone() if _writable_in_place(buffer) else None,
            buffer._version,
        )
        for name, buffer in buffers.items()
        if buffer is not None
        and not buffer.is_inference()
        and not (frozen_batchnorm and name in _RUNNING_STATS)
    ]


def _writable_in_place(buffer: Tensor) -> bool:
    """False for an expanded tensor (a dimension longer than 1 with stride 0, as
    ``torch.arange(n).expand(b, n)`` makes), whose elements share memory: torch refuses an
    in-place write into it, and its copy would be the expanded size; and for a layout other
    than strided (a sparse buffer is replaced, not written in place)."""
    if buffer.layout != torch.strided:
        return False
    return all(
        stride != 0 or size <= 1 for size, stride in zip(buffer.shape, buffer.stride(), strict=True)
    )


def save_buffers_outside(model: nn.Module, modules: Iterable[nn.Module]) -> list[SavedBuffer]:
    """:func:`save_buffers` of each of ``modules`` that is not ``model``'s (another network
    that runs in the second pass: a GAN's other half, a teacher); the caller passes every live
    module with buffers (:func:`tram.batchnorm.every_module_with_buffers`)."""
    inside = {id(module) for module in model.modules()}
    outside = (module for module in modules if id(module) not in inside)
    return [entry for module in outside for entry in save_own_buffers(module)]


@torch.no_grad()
def restore_buffers(saved: list[SavedBuffer]) -> None:
    """Put back every buffer of ``saved`` that changed since :func:`save_buffers`: the tensor
    under its name (another one, or none, may have replaced it), and its values when they were
    written. Written is told by the version counter, and where it did not move by the values:
    a fused kernel (the fake-quantise observers of ``torch.ao.quantization``'s default QAT
    configuration) and a write through ``.data`` change a buffer without moving its version. An
    unchanged buffer is not written: a graph still to be backpropagated (R3F's noised forward
    comes before the backward) may hold it (an embedding's position ids), and a write would
    move the version its backward checks."""
    for entry in saved:
        buffers = entry.module._buffers  # a ScriptModule's has no get()
        current = buffers[entry.name] if entry.name in buffers else None  # noqa: SIM401
        if current is not entry.tensor:
            buffers[entry.name] = entry.tensor
        copy, live = entry.copy, entry.tensor
        if copy is None or (live._version == entry.version and torch.equal(live, copy)):
            continue
        if live.shape != copy.shape:  # resized in place (an observer's minimum starts empty)
            live.resize_(copy.shape)
        live.copy_(copy)


@contextmanager
def buffers_put_back(model: nn.Module) -> Iterator[None]:
    """Inside the block, forwards of ``model`` may write its buffers; they are put back on
    leaving it (BatchNorm's running statistics excepted: freeze those)."""
    saved = save_buffers(model)
    try:
        yield
    finally:
        restore_buffers(saved)
