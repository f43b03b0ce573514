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

A wrapper built without ``model=`` cannot freeze what it cannot find; it refuses instead. Three
mechanisms see the BatchNorms that would update at θ+ε: a global module hook, for every module
that runs eagerly and for the compiled modules it can judge when they are called
(:func:`refuse_running_stats_updates`); a search of the garbage collector's objects for modules
compiled in place, whose call runs no hook (:func:`batchnorms_compiled_in_place`, before the
ascent); and a record of the running statistics of the BatchNorms a compiled function may run
(:func:`watch_running_stats`, checked after the second pass, the statistics put back). A
wrapper whose ``model=`` holds every perturbed weight freezes that model's BatchNorms and arms no
hook; its ``second_pass()`` (``step(closure)``'s second call of its closure, an integration's
replay) records those outside it (:func:`every_batchnorm`), since any update there is a second
one.
"""

from __future__ import annotations

import gc
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_forward_pre_hook,
)
from torch.utils.hooks import RemovableHandle

from tram._forward_state import SavedBuffer, save_own_buffers
from tram._model_io import compiled_in_place, compiled_wrapper_inner, uncompiled_forward

__all__ = [
    "WatchedRunningStats",
    "batchnorms_compiled_in_place",
    "disarm",
    "every_batchnorm",
    "every_module_with_buffers",
    "freeze_running_stats",
    "frozen_running_stats",
    "refuse_running_stats_updates",
    "running_stats_refusal",
    "search_compiled_in_place",
    "unfreeze_running_stats",
    "updated_a_second_time",
    "updating_running_stats",
    "watch_running_stats",
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
    saved_buffers: list[SavedBuffer] | None = None,
) -> weakref.finalize:
    """Until the returned finalizer is called (:func:`disarm`), a forward of a BatchNorm whose
    affine weights are among ``parameters`` and that would update its running statistics raises
    ``RuntimeError`` (before it runs), while ``armed()`` is True.

    What a wrapper arms between ``first_step`` and ``restore``, with the parameters it
    perturbed: without ``model=`` it cannot freeze statistics it cannot find, and the second
    pass at θ+ε would update them a second time in the step; with a ``model=`` (``model_given``)
    that leaves some of them out, the BatchNorms inside it are frozen and pass, and one outside
    it is refused. A BatchNorm in eval mode, frozen (:func:`frozen_running_stats`) or with
    ``momentum=0`` updates nothing and passes. A BatchNorm is taken as the perturbed model's
    when its affine weights are among ``parameters``; one with no trainable weights of its own
    (``affine=False``, or frozen) when its input was computed from them (its autograd graph
    reaches one). Others pass: another model's, and one whose input does not depend on the
    perturbed weights (a BatchNorm on the raw inputs, which cannot be told apart from another
    model's) — except while ``replaying()`` is True: in the wrapper's ``second_pass()`` (which
    ``step(closure)`` enters to call its closure a second time, and tram's integrations for
    their replay), every BatchNorm that runs is the first pass's run again and updates a second
    time in the step, whatever feeds it (a frozen backbone's, one on the raw inputs). The hook
    is global (torch's module forward pre-hook) and holds ``armed`` and ``replaying`` (bound
    methods of one object) weakly: the finalizer removes it when called, or when that object is
    collected (a wrapper dropped while perturbed).

    With ``saved_buffers``, every module that runs while armed has its other buffers, and its
    descendants', copied into it before its first run
    (:func:`tram._forward_state.save_own_buffers`), for the wrapper to put back what the
    forwards at θ+ε wrote (a spectral norm's power-iteration vectors); modules already in it are
    skipped.
    """
    weak_armed = weakref.WeakMethod(armed)
    weak_replaying = None if replaying is None else weakref.WeakMethod(replaying)
    perturbed = {id(param) for param in parameters}

    def in_the_second_pass() -> bool:
        is_replaying = None if weak_replaying is None else weak_replaying()
        return is_replaying is not None and is_replaying()

    saved_modules = {id(entry.module) for entry in saved_buffers or ()}

    def save(module: nn.Module) -> None:
        if saved_buffers is None or id(module) in saved_modules:
            return
        armed_now = weak_armed()
        if armed_now is None or not armed_now():
            return
        # The whole subtree: a module may write its children's buffers without calling them
        # (a fused fake-quantise module writes its observer's minima and maxima).
        for inner in module.modules():
            if id(inner) not in saved_modules:
                saved_modules.add(id(inner))
                saved_buffers.extend(save_own_buffers(inner))

    def check(module: nn.Module, args: Any) -> None:
        save(module)
        if isinstance(module, _BatchNorm):
            if _updates_running_stats(module) and (
                in_the_second_pass() or _runs_at_perturbed_weights(module, args, perturbed)
            ):
                refuse(module, "")
            return
        # A compiled graph runs the BatchNorms inside it without calling this hook (hooks added
        # after compilation are not in the graph), so they are judged here, before it runs.
        for subtree in _compiled_subtrees(module):
            holds_perturbed = _holds_perturbed(subtree, perturbed)
            for inner in subtree.modules():
                if (
                    isinstance(inner, _BatchNorm)
                    and _updates_running_stats(inner)
                    and (in_the_second_pass() or _is_the_models(inner, holds_perturbed, perturbed))
                ):
                    refuse(inner, " inside a torch.compile'd module")

    def refuse(batchnorm: _BatchNorm, where: str) -> None:
        is_armed = weak_armed()
        if is_armed is None or not is_armed():
            return
        raise running_stats_refusal(method, batchnorm, f"{where} ran", model_given=model_given)

    handle = register_module_forward_pre_hook(check)
    return weakref.finalize(armed.__self__, handle.remove)  # type: ignore[attr-defined]


def running_stats_refusal(
    method: str, batchnorm: _BatchNorm, where_it_ran: str, *, model_given: bool
) -> RuntimeError:
    """The error for a BatchNorm that runs, or would run, in training mode at θ+ε unfrozen."""
    fix = (
        f"It is not inside the model= given to {method}, whose BatchNorms are frozen "
        "between first_step() and restore(): pass a model= that contains every BatchNorm in "
        "training mode (a frozen backbone's too), put the ones not trained in eval mode"
        if model_given
        else f"Pass model= to {method} (it freezes them between first_step() and restore())"
    )
    return RuntimeError(
        f"{method}: a {type(batchnorm).__name__} in training mode{where_it_ran} at the "
        "perturbed weights θ+ε, and would update its running statistics a second time in "
        f"this step. {fix}, or run the second pass inside tram.frozen_running_stats(model)"
    )


class _CompiledInPlace:
    """The modules compiled in place (``module.compile()``) and the BatchNorms with running
    statistics, found among the objects the garbage collector tracks in one walk.

    The walk visits every tracked object (about 0.1 s in a process with transformers and a
    BERT loaded), so its result is kept until dynamo compiles something again: a module
    compiled in place compiles at its first call, and dynamo's compile-end callbacks
    (``torch._dynamo.callback.callback_handler``) say when. ``torch._dynamo.reset()`` drops
    the callback; its absence is noticed and the next search walks again. Nothing is walked
    while dynamo has compiled nothing (since it was imported or reset), except once for
    :func:`every_batchnorm`, which then hears of every BatchNorm built. These are private torch
    names: in a torch without them every search walks."""

    def __init__(self) -> None:
        self.compilations = 0  # dynamo compilations heard of, plus one per (re)registration
        self.walks = 0
        self._walked_at: int | None = None
        self._found: list[weakref.ref[nn.Module]] = []
        self._batchnorms: list[weakref.ref[_BatchNorm]] = []
        # Once every_batchnorm() was asked: the BatchNorms built since the last walk.
        self._built: list[weakref.ref[_BatchNorm]] = []
        # Every module with buffers, by id: found by the walk, and once every_batchnorm() or
        # every_module_with_buffers() was asked, heard of when it registers a buffer.
        self._with_buffers: dict[int, weakref.ref[nn.Module]] = {}
        self._construction: RemovableHandle | None = None

    def modules(self) -> list[nn.Module]:
        """The live modules compiled in place."""
        if not _anything_compiled():
            return []
        self._refresh()
        return [module for module in (reference() for reference in self._found) if module]

    def batchnorms(self) -> list[_BatchNorm]:
        """The live BatchNorms with running statistics that existed at the last compilation
        (a BatchNorm inside a compiled graph was traced, so it did); none while dynamo has
        compiled nothing."""
        if not _anything_compiled():
            return []
        self._refresh()
        return [module for module in (reference() for reference in self._batchnorms) if module]

    def every_batchnorm(self) -> list[_BatchNorm]:
        """The live BatchNorms with running statistics: those found by the last walk (the first
        call walks, whatever was compiled; the search for compiled modules walks again after a
        compilation) and every one built since, heard of when its ``running_mean`` buffer is
        registered (torch's global buffer registration hook, which runs when a module is built,
        never in a forward)."""
        self._listen_to_construction()
        live = {}
        for reference in (*self._batchnorms, *self._built):
            module = reference()
            if module is not None and module.running_mean is not None:
                live[id(module)] = module
        self._built = [reference for reference in self._built if reference() is not None]
        return list(live.values())

    def every_module_with_buffers(self) -> list[nn.Module]:
        """The live modules that have buffers: found by the last walk (the first call of this
        or :meth:`every_batchnorm` walks) and heard of when built since, as
        :meth:`every_batchnorm` finds BatchNorms."""
        self._listen_to_construction()
        live = []
        for key, reference in list(self._with_buffers.items()):
            module = reference()
            if module is None:
                del self._with_buffers[key]
            else:
                live.append(module)
        return live

    def _listen_to_construction(self) -> None:
        if self._construction is None:
            self._construction = register_module_buffer_registration_hook(self._heard_a_buffer)
            self._walk()

    def _heard_a_buffer(self, module: nn.Module, name: str, buffer: Tensor | None) -> None:
        self._with_buffers[id(module)] = weakref.ref(module)
        if name == "running_mean" and isinstance(module, _BatchNorm):
            self._built.append(weakref.ref(module))

    def _refresh(self) -> None:
        if not self._listening() or self._walked_at != self.compilations:
            self._walk()

    def _walk(self) -> None:
        self._listening()  # a compilation from now on is heard of
        self._walked_at = self.compilations
        self.walks += 1
        self._found, self._batchnorms, self._built = [], [], []
        self._with_buffers = {}
        for candidate in gc.get_objects():
            # type(), not isinstance(): the latter asks the object (a dead weak proxy raises).
            kind = type(candidate)
            if not issubclass(kind, nn.Module):
                continue
            if getattr(candidate, "_buffers", None):
                self._with_buffers[id(candidate)] = weakref.ref(candidate)
            if compiled_in_place(candidate) is not None:
                self._found.append(weakref.ref(candidate))
            if issubclass(kind, _BatchNorm) and candidate.running_mean is not None:
                self._batchnorms.append(weakref.ref(candidate))

    def _heard_a_compilation(self, arguments: Any) -> None:
        self.compilations += 1

    def _listening(self) -> bool:
        handler = getattr(sys.modules.get("torch._dynamo.callback"), "callback_handler", None)
        callbacks = getattr(handler, "end_callbacks", None)
        if handler is None or not isinstance(callbacks, list):
            return False
        if self._heard_a_compilation not in callbacks:  # first use, or after a reset
            handler.register_end_callback(self._heard_a_compilation)
            self.compilations += 1  # what was compiled unheard is found by a new walk
        return True


_compiled_in_place = _CompiledInPlace()


def _anything_compiled() -> bool:
    """False while dynamo has compiled no frame (since it was imported or reset): no module
    can run a compiled graph then. True when that cannot be told."""
    convert_frame = sys.modules.get("torch._dynamo.convert_frame")
    if convert_frame is None:
        return False  # not imported: nothing was compiled
    frames = getattr(convert_frame, "FRAME_COUNTER", None)
    return not isinstance(frames, int) or frames > 0


@torch._disable_dynamo
def batchnorms_compiled_in_place(
    parameters: Iterable[Tensor], *, excluding: nn.Module | None = None
) -> list[weakref.ref[_BatchNorm]]:
    """The BatchNorms that :func:`refuse_running_stats_updates` cannot see: those of the model
    whose ``parameters`` are perturbed, inside a module compiled in place
    (``module.compile()``).

    Such a module's call runs its compiled graph and no module hook at all, its own included,
    and a graph does not run hooks added after it was compiled: when it is the model itself
    (``model.compile()``), nothing calls the guard (a child compiled in place is judged when
    its parent's hook runs). Without ``model=`` the wrapper does not know the module, so it
    is found among the objects the garbage collector tracks (:class:`_CompiledInPlace`). A
    BatchNorm is the model's when its affine weights are among ``parameters``, or when it has
    no trainable weights of its own and the compiled module holds some of ``parameters``.
    BatchNorms inside ``excluding`` (the ``model=`` whose BatchNorms the wrapper freezes) and
    those built without running statistics are left out. Returns weak references: whether one
    would update its statistics (training mode, momentum) is a question for each step.
    """
    modules = _compiled_in_place.modules()
    if not modules:
        return []
    perturbed = {id(param) for param in parameters}
    excluded = set() if excluding is None else {id(module) for module in excluding.modules()}
    found: dict[int, weakref.ref[_BatchNorm]] = {}
    for module in modules:
        holds_perturbed = _holds_perturbed(module, perturbed)
        for inner in module.modules():
            if (
                isinstance(inner, _BatchNorm)
                and inner.running_mean is not None
                and id(inner) not in excluded
                and _is_the_models(inner, holds_perturbed, perturbed)
            ):
                found[id(inner)] = weakref.ref(inner)
    return list(found.values())


@torch._disable_dynamo
def every_module_with_buffers() -> list[nn.Module]:
    """Every live module that has buffers, found and heard of as :func:`every_batchnorm` finds
    BatchNorms (the same walk and the same hook)."""
    return _compiled_in_place.every_module_with_buffers()


def every_batchnorm() -> list[_BatchNorm]:
    """Every live BatchNorm with running statistics: found among the objects the garbage
    collector tracks at the first call (one walk per process; the search for modules compiled
    in place walks again after a compilation), and heard of when built after it
    (:meth:`_CompiledInPlace.every_batchnorm`). One made after the last walk without being built
    (``copy.deepcopy``, unpickled by ``torch.load``) is not among them."""
    return _compiled_in_place.every_batchnorm()


@torch._disable_dynamo
def search_compiled_in_place() -> int:
    """Walk the garbage collector's objects for modules compiled in place again if dynamo
    compiled something since the last walk (:class:`_CompiledInPlace`), and return how many
    walks there were: while it is unchanged, :func:`batchnorms_compiled_in_place` answers the
    same for the same parameters."""
    _compiled_in_place.modules()
    return _compiled_in_place.walks


class WatchedRunningStats(NamedTuple):
    """A BatchNorm's running statistics as they were when the weights went to θ+ε."""

    batchnorm: _BatchNorm
    own_weights_perturbed: bool
    versions: tuple[int, ...]
    values: tuple[Tensor, ...]


@torch._disable_dynamo
@torch.no_grad()
def watch_running_stats(
    parameters: Iterable[Tensor], *, batchnorms: Iterable[_BatchNorm] | None = None
) -> list[WatchedRunningStats]:
    """Record the running statistics of every BatchNorm that would update them now among
    ``batchnorms`` (those of a ``model=`` are frozen then, and update nothing); by default
    among those that existed at dynamo's last compilation (:class:`_CompiledInPlace`): the
    ones a compiled graph may run at θ+ε, where the guard's hook does not run (a compiled
    function that calls the model, ``torch.compile(step_fn)``), and none while dynamo has
    compiled nothing. :func:`updated_a_second_time` tells which were updated."""
    if batchnorms is None:
        batchnorms = _compiled_in_place.batchnorms()
    updating = [batchnorm for batchnorm in batchnorms if _updates_running_stats(batchnorm)]
    if not updating:
        return []
    perturbed = {id(param) for param in parameters}
    watched = []
    for batchnorm in updating:
        buffers = _running_buffers(batchnorm)
        watched.append(
            WatchedRunningStats(
                batchnorm,
                _holds_perturbed(batchnorm, perturbed, recurse=False),
                tuple(buffer._version for buffer in buffers),
                tuple(buffer.clone() for buffer in buffers),
            )
        )
    return watched


@torch._disable_dynamo
@torch.no_grad()
def updated_a_second_time(
    watched: Iterable[WatchedRunningStats], *, replayed: bool
) -> list[_BatchNorm]:
    """The watched BatchNorms whose running statistics changed since
    :func:`watch_running_stats`, at θ+ε, where each is a second update in the step: one with
    its own weights perturbed, and any when the wrapper's ``second_pass()`` was entered
    (``replayed``), as the guard's hook judges them. Their statistics are put back as the
    first pass left them. Another model's BatchNorm run between the passes of the explicit
    form outside ``second_pass()`` is left alone."""
    updated = []
    for record in watched:
        buffers = _running_buffers(record.batchnorm)
        if tuple(buffer._version for buffer in buffers) == record.versions:
            continue
        if record.own_weights_perturbed or replayed:
            for buffer, value in zip(buffers, record.values, strict=True):
                buffer.copy_(value)
            updated.append(record.batchnorm)
    return updated


def _running_buffers(batchnorm: _BatchNorm) -> list[Tensor]:
    buffers = [batchnorm.running_mean, batchnorm.running_var, batchnorm.num_batches_tracked]
    return [buffer for buffer in buffers if isinstance(buffer, Tensor)]


def updating_running_stats(batchnorms: Iterable[weakref.ref[_BatchNorm]]) -> _BatchNorm | None:
    """The first of ``batchnorms`` still alive whose forward now would update its running
    statistics, or None."""
    for reference in batchnorms:
        batchnorm = reference()
        if batchnorm is not None and _updates_running_stats(batchnorm):
            return batchnorm
    return None


@torch._disable_dynamo
def disarm(guard: weakref.finalize) -> None:
    """Remove the hook of :func:`refuse_running_stats_updates` now (call its finalizer).

    Arming and disarming run eagerly, outside any graph dynamo traces (a compiled
    ``optimizer.step``): traced, the change to torch's
    dictionary of global hooks failed inside dynamo ("dictionary changed size during
    iteration") when a dropped wrapper's finalizer removed its own hook during the trace."""
    guard()


def _is_the_models(batchnorm: _BatchNorm, holds_perturbed: bool, perturbed: set[int]) -> bool:
    """Whether a BatchNorm inside a compiled module belongs to the model whose ``perturbed``
    weights are at θ+ε. Its input cannot be inspected inside a graph: one without trainable
    weights of its own is taken as the model's when the compiled module holds perturbed
    weights (``holds_perturbed``)."""
    if _holds_perturbed(batchnorm, perturbed, recurse=False):
        return True
    own = batchnorm.parameters(recurse=False)
    return holds_perturbed and not any(param.requires_grad for param in own)


def _holds_perturbed(module: nn.Module, perturbed: set[int], *, recurse: bool = True) -> bool:
    """Whether some of ``module``'s parameters (its own only, unless ``recurse``) are among the
    ``perturbed`` ones (their ids)."""
    return any(id(param) in perturbed for param in module.parameters(recurse=recurse))


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
    # The guard asks this of every module called while it is armed: the registered children
    # are read directly (children() builds a generator and a set of those seen, ~2 us a call).
    for child in module._modules.values():
        if child is not None and compiled_in_place(child) is not None and child is not inner:
            subtrees.append(child)
    return subtrees


def _runs_at_perturbed_weights(module: nn.Module, args: Any, perturbed: set[int]) -> bool:
    """Whether this BatchNorm forward belongs to the model whose ``perturbed`` weights are at
    θ+ε: its affine weights are among them, or, when it has no trainable weights of its own,
    its input's autograd graph reaches one of them. A BatchNorm with trainable weights that are
    not perturbed is another model's."""
    if _holds_perturbed(module, perturbed, recurse=False):
        return True
    if any(param.requires_grad for param in module.parameters(recurse=False)):
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
