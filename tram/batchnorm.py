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

import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.module import register_module_forward_pre_hook

from tram._model_io import compiled_in_place, compiled_wrapper_inner, uncompiled_forward

__all__ = [
    "disarm",
    "freeze_running_stats",
    "frozen_running_stats",
    "refuse_running_stats_updates",
    "unfreeze_running_stats",
]


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


# Arming and disarming are optimizer bookkeeping that a compiled ``optimizer.step`` would
# trace: torch's own bookkeeping (``Optimizer.zero_grad``, ``add_param_group``) is kept out of
# dynamo with ``torch._disable_dynamo``, the lazy form of ``torch.compiler.disable`` that imports
# ``torch._dynamo`` (about a second) at the first call instead of at ``import tram``.
@torch._disable_dynamo
def refuse_running_stats_updates(
    method: str,
    armed: Callable[[], bool],
    parameters: Iterable[Tensor],
    *,
    model_given: bool = False,
    replaying: Callable[[], bool] | None = None,
) -> weakref.finalize:
    """Until the returned finalizer is called (:func:`disarm`), a forward of a BatchNorm whose
    affine weights are among ``parameters`` and that would update its running statistics raises
    ``RuntimeError`` (before it runs), while ``armed()`` is True.

    What a wrapper arms between ``first_step`` and ``restore``, with the parameters it
    perturbed: without ``model=`` it cannot freeze statistics it cannot find, and the second pass
    at θ+ε would update them a second time in the step; with ``model=`` (``model_given``), the
    BatchNorms inside it are frozen and pass, and one outside it is refused. A BatchNorm in eval
    mode, frozen (:func:`frozen_running_stats`) or with ``momentum=0`` updates nothing and
    passes. A BatchNorm is taken as the perturbed model's when its affine weights are among
    ``parameters``; one with no trainable weights of its own (``affine=False``, or frozen) when
    its input was computed from them (its autograd graph reaches one). Others pass: another
    model's, and one whose input does not depend on the perturbed weights (a BatchNorm on the
    raw inputs, which cannot be told apart from another model's) — except while ``replaying()``
    is True: ``step(closure)`` calling its closure a second time, where every BatchNorm that
    runs is the closure's and updates a second time in the step, whatever feeds it (a frozen
    backbone's, one on the raw inputs). The hook is global (torch's module forward pre-hook)
    and holds ``armed`` and ``replaying`` (bound methods of one object) weakly: the finalizer
    removes it when called, or when that object is collected (a wrapper dropped while
    perturbed).
    """
    weak_armed = weakref.WeakMethod(armed)
    weak_replaying = None if replaying is None else weakref.WeakMethod(replaying)
    perturbed = {id(param) for param in parameters}

    def in_the_closures_second_call() -> bool:
        is_replaying = None if weak_replaying is None else weak_replaying()
        return is_replaying is not None and is_replaying()

    def check(module: nn.Module, args: Any) -> None:
        if isinstance(module, _BatchNorm):
            if _updates_running_stats(module) and (
                in_the_closures_second_call() or _runs_at_perturbed_weights(module, args, perturbed)
            ):
                refuse(module, "")
            return
        # A compiled graph runs the BatchNorms inside it without calling this hook (hooks added
        # after compilation are not in the graph), so they are judged here, before it runs.
        for subtree in _compiled_subtrees(module):
            holds_perturbed = any(id(param) in perturbed for param in subtree.parameters())
            for inner in subtree.modules():
                if (
                    isinstance(inner, _BatchNorm)
                    and _updates_running_stats(inner)
                    and (in_the_closures_second_call() or _is_the_models(inner, holds_perturbed))
                ):
                    refuse(inner, " inside a torch.compile'd module")

    def _is_the_models(batchnorm: _BatchNorm, holds_perturbed: bool) -> bool:
        # Its input cannot be inspected inside the graph: one without trainable weights of its
        # own is taken as the model's when the compiled module holds perturbed weights.
        own = list(batchnorm.parameters(recurse=False))
        if any(id(param) in perturbed for param in own):
            return True
        return holds_perturbed and not any(param.requires_grad for param in own)

    def refuse(batchnorm: _BatchNorm, where: str) -> None:
        is_armed = weak_armed()
        if is_armed is None or not is_armed():
            return
        fix = (
            f"it is not inside the model= given to {method}, whose BatchNorms are frozen "
            "between first_step() and restore(): pass a model= that contains every trained "
            "BatchNorm"
            if model_given
            else f"Pass model= to {method} (it freezes them between first_step() and restore())"
        )
        raise RuntimeError(
            f"{method}: a {type(batchnorm).__name__} in training mode{where} ran at the "
            "perturbed weights θ+ε, and would update its running statistics a second time in "
            f"this step. {fix}, or run the second pass inside tram.frozen_running_stats(model)"
        )

    handle = register_module_forward_pre_hook(check)
    return weakref.finalize(armed.__self__, handle.remove)  # type: ignore[attr-defined]


@torch._disable_dynamo
def disarm(guard: weakref.finalize) -> None:
    """Remove the hook of :func:`refuse_running_stats_updates` now (call its finalizer).

    Arming and disarming run eagerly, outside any graph dynamo traces (a compiled
    ``optimizer.step``): traced, the change to torch's
    dictionary of global hooks failed inside dynamo ("dictionary changed size during
    iteration") when a dropped wrapper's finalizer removed its own hook during the trace."""
    guard()


def _updates_running_stats(module: _BatchNorm) -> bool:
    """Whether a forward of ``module`` now would update its running statistics."""
    return (
        module.training
        and module.track_running_stats
        and module.running_mean is not None
        and module.momentum != 0
    )


def _compiled_subtrees(module: nn.Module) -> list[nn.Module]:
    """The modules whose forward runs as a compiled graph when ``module`` is called:
    ``torch.compile(model)``'s wrapped model, ``module`` itself when its ``forward`` was replaced
    by ``torch.compile(module.forward)``, and the children compiled in place
    (``child.compile()``, which runs no module hook of its own). A root compiled in place runs
    no hook at all and is not seen here: wrappers freeze its BatchNorms when given ``model=``."""
    inner = compiled_wrapper_inner(module)
    subtrees = [] if inner is None else [inner]
    if uncompiled_forward(module) is not None:
        subtrees.append(module)
    subtrees.extend(
        child
        for child in module.children()
        if compiled_in_place(child) is not None and child is not inner
    )
    return subtrees


def _runs_at_perturbed_weights(module: nn.Module, args: Any, perturbed: set[int]) -> bool:
    """Whether this BatchNorm forward belongs to the model whose ``perturbed`` weights are at
    θ+ε: its affine weights are among them, or, when it has no trainable weights of its own,
    its input's autograd graph reaches one of them. A BatchNorm with trainable weights that are
    not perturbed is another model's."""
    own = list(module.parameters(recurse=False))
    if any(id(param) in perturbed for param in own):
        return True
    if any(param.requires_grad for param in own):
        return False
    inputs = args[0] if args else None
    if not isinstance(inputs, Tensor) or inputs.grad_fn is None:
        return False
    seen: set[Any] = set()
    pending: list[Any] = [inputs.grad_fn]
    while pending:  # depth-first: the perturbed layer just before it is found in a few nodes
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf tensor
        if variable is not None and id(variable) in perturbed:
            return True
        pending.extend(next_node for next_node, _ in node.next_functions)
    return False
