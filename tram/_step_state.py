"""A wrapper's per-step state, and the checks that keep a step from going silently wrong.

:class:`_StepState` holds everything a step mutates, in one object shared by copies of the
wrapper's ``__dict__``; :class:`_SharedField` exposes its counters as wrapper attributes. The
refusals listed in the README's "Guarantees" that do not need the step's control flow live here
too: the skip warnings (:meth:`_StepState.skip_ascent`, :meth:`_StepState.skip_base_step`),
:func:`refuse_missing_ascent`, :func:`refuse_missing_second_pass` and
:func:`refuse_foreign_state_dict`; :mod:`tram._wrapper` decides when each applies.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar, overload

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from tram._ascent import is_dtensor, scaled_squared_norm
from tram._forward_state import SavedBuffer

if TYPE_CHECKING:
    from torch.amp import GradScaler

    from tram._buckets import Bucket
    from tram.batchnorm import WatchedRunningStats

__all__ = ["MissingAscentError", "refuse_foreign_state_dict"]

_V = TypeVar("_V")
_Version = tuple[int, int]
"""A gradient's version counter and its local shard's (see :func:`_version`)."""


class MissingAscentError(RuntimeError):
    """A two-pass optimizer was stepped without its ascent, on a step due one: no step was taken.

    Raised when ``step()`` is called with no closure and without ``first_step()`` on a step that
    was due an ascent: a caller that only knows the plain optimizer protocol
    (``transformers.Trainer`` or TRL given a tram optimizer, Lightning's ``"16-mixed"``
    precision, ``GradScaler.step``) drives it. A plain base step there would train with the base
    optimizer under the wrapper's name for the whole run, so the step is refused instead.
    """


class _StepState:
    """Everything a step of a wrapper mutates, in one object that is never replaced.

    Framework proxies copy an optimizer's ``__dict__`` and call its methods with the proxy as
    ``self`` (Lightning's ``LightningOptimizer`` does). An attribute that a method reassigns would
    then change on the proxy only, and the wrapper would lose track of perturbed weights. Both
    objects share this one, so the state stays in one place whichever object calls.
    """

    __slots__ = (
        "__weakref__",  # the BatchNorm guard holds the state weakly
        "ascent_attempted",
        "ascent_params",
        "batchnorm_guard",
        "first_pass_depth",
        "first_step_unscaled_fisher",
        "frozen_batchnorms",
        "grad_scaler",
        "gradient_not_finite",
        "in_second_pass",
        "last_ascent_norm",
        "perturbed_buckets",
        "resting_gradients",
        "restored_before_second_pass",
        "restored_gradient_sample",
        "running_stats_updated_twice",
        "saved_buffers",
        "second_pass_entered",
        "skipped_ascents",
        "skipped_steps",
        "steps",
        "warned_lightning_logging",
        "watched_outside_the_model",
        "watched_running_stats",
        "zero_grad_calls",
        "zero_grad_sets_to_none",
        "zeroed_gradients",
    )

    def __init__(self) -> None:
        self.steps = 0
        self.skipped_ascents = 0
        self.skipped_steps = 0
        self.last_ascent_norm: float | None = None
        # first_step() was called since the last base step (the explicit form is in progress).
        self.ascent_attempted = False
        # The weights that were perturbed since the last base step: the base step must then use
        # a gradient from the second pass, which is checked before stepping.
        self.ascent_params: list[Tensor] = []
        self.gradient_not_finite = False
        # How many first_pass() contexts are open: zero_grad() inside one keeps the pass.
        self.first_pass_depth = 0
        # Inside second_pass() (step(closure)'s second call of its closure, an integration's
        # replay): every BatchNorm that runs there updates a second time in the step. The
        # second flag stays set until restore() has judged the watched running statistics.
        self.in_second_pass = False
        self.second_pass_entered = False
        # The gradients as the last step or zero_grad() left them (weak references and version
        # counters): step(closure) tells from them whether a backward ran outside the closure.
        self.resting_gradients: dict[Tensor, tuple[weakref.ref[Tensor], _Version]] = {}
        self.zero_grad_calls = 0
        # Whether a zero_grad() through the wrapper while perturbed (a closure's, before its
        # second pass) freed the gradients (torch's default) or zeroed them in place: a gradient
        # the second pass does not reach is left as it left it. Reset by restore().
        self.zero_grad_sets_to_none = True
        # The gradients first_step() zeroed, and whether restore() came before any backward
        # wrote them (the second pass then ran at θ, not θ+ε).
        self.zeroed_gradients: dict[Tensor, tuple[weakref.ref[Tensor], _Version]] = {}
        self.restored_before_second_pass = False
        # A gradient of the second pass as restore() left it, and its largest magnitude (a
        # GradScaler's unscale_ changes it without bumping the version counter), and whether
        # first_step() took a Fisher ascent without being told the gradients' loss scale: a
        # GradScaler stepping after either is refused (the step would differ, silently).
        self.restored_gradient_sample: tuple[weakref.ref[Tensor], float] | None = None
        self.first_step_unscaled_fisher = False
        # The last enabled GradScaler seen stepping this optimizer, held weakly, and the id of
        # the object it stepped (the wrapper or a framework's proxy): first_step() asks it
        # whether it has unscaled the gradients already in this step.
        self.grad_scaler: tuple[weakref.ref[GradScaler], int] | None = None
        self.perturbed_buckets: list[Bucket] = []
        self.frozen_batchnorms: list[_BatchNorm] = []
        # The model's other buffers as the first pass left them, put back by restore().
        self.saved_buffers: list[SavedBuffer] = []
        # Without a model to freeze (or with one that leaves perturbed weights out), a hook that
        # refuses BatchNorm updates while perturbed (its finalizer removes it).
        self.batchnorm_guard: weakref.finalize | None = None
        # With the guard: the running statistics that a compiled graph could update at θ+ε
        # unseen, and those restore() found updated there (the base step refuses then).
        self.watched_running_stats: list[WatchedRunningStats] = []
        self.running_stats_updated_twice: list[_BatchNorm] = []
        # The record is of the BatchNorms outside a model= that holds every perturbed weight, for
        # the second pass (no guard armed): not a compiled graph's.
        self.watched_outside_the_model = False
        self.warned_lightning_logging = False

    def still_perturbed(self) -> bool:
        return bool(self.perturbed_buckets)

    def in_the_second_pass(self) -> bool:
        """Whether the second pass runs (``second_pass()``): every forward there is the
        second of its kind in this step."""
        return self.in_second_pass

    def abandon(self) -> None:
        """Forget a step that raised or was refused: the next step starts afresh."""
        self.ascent_attempted = False
        self.ascent_params = []
        self.restored_before_second_pass = False
        self.restored_gradient_sample = None
        self.first_step_unscaled_fisher = False

    def skip_ascent(self, method: str, reason: str) -> bool:
        """Count and warn an ascent skipped by ``first_step``; returns False, its result."""
        self.skipped_ascents += 1
        warnings.warn(
            f"{method}: skipped the ascent because {reason} "
            f"({self.skipped_ascents} skipped so far)",
            RuntimeWarning,
            stacklevel=5,  # past this, _ascend, first_step and its no_grad decorator
        )
        return False

    def skip_base_step(self, method: str, reason: str) -> None:
        """Count and warn a base step skipped with the weights at θ."""
        self.skipped_steps += 1
        warnings.warn(
            f"{method}: skipped the base step because {reason}; the weights are "
            f"unchanged ({self.skipped_steps} skipped so far)",
            RuntimeWarning,
            stacklevel=5,  # past this, the base step, step() and torch's wrapper of it
        )

    def for_copy(self) -> _StepState:
        """A copy for pickling: counters kept, references to live tensors dropped."""
        copy = _StepState()
        copy.steps = self.steps
        copy.skipped_ascents = self.skipped_ascents
        copy.skipped_steps = self.skipped_steps
        copy.last_ascent_norm = self.last_ascent_norm
        copy.warned_lightning_logging = self.warned_lightning_logging
        return copy


class _SharedField(Generic[_V]):
    """A wrapper attribute stored in its :class:`_StepState`, read and written through it."""

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> _SharedField[_V]: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> _V: ...

    def __get__(self, instance: object | None, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return getattr(instance._step_state, self.name)  # type: ignore[attr-defined]

    def __set__(self, instance: object, value: _V) -> None:
        setattr(instance._step_state, self.name, value)  # type: ignore[attr-defined]


def refuse_missing_ascent(method: str, base: str) -> NoReturn:
    """Raise :class:`MissingAscentError`: ``step()`` alone on a step due an ascent."""
    raise MissingAscentError(
        f"{method}.step() was called without a closure and without first_step() on a step "
        f"due an ascent: it would be a plain {base} step, so no step was taken (the weights "
        "and gradients are as they were). A caller that only calls step() "
        "(transformers.Trainer or TRL given this optimizer, Lightning's 16-mixed precision, "
        "GradScaler.step) never takes the two-pass step. Use "
        "tram.integrations.hf.TramTrainer for the Hugging Face Trainer and TRL, "
        "tram.integrations.lightning for Lightning, tram.scaled_step for a GradScaler, "
        "or step(closure) / first_step() and second_step() in your own loop"
    )


def _version(grad: Tensor) -> _Version:
    """What changes when ``grad`` is written in place: its version counter, and that of its
    local shard for a ``DTensor``. FSDP2 adds a backward's gradient to an existing one with
    ``grad._local_tensor += ...`` (``torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py``,
    ``foreach_reduce``), which bumps the local tensor's counter only."""
    if not is_dtensor(grad):
        return grad._version, 0
    with torch.no_grad():  # to_local() then returns the shard itself, not a view
        local = grad.to_local()  # type: ignore[attr-defined]
    return grad._version, local._version


def gradients_at_rest(
    params: Iterable[Tensor],
) -> dict[Tensor, tuple[weakref.ref[Tensor], _Version]]:
    """Each parameter's gradient, held weakly, with its version (see :func:`_version`)."""
    return {p: (weakref.ref(p.grad), _version(p.grad)) for p in params if p.grad is not None}


def largest_magnitude(grad: Tensor) -> float:
    """``max |g|`` over ``grad`` (its local shard for a ``DTensor``: no collective), 0 if empty."""
    with torch.no_grad():
        local = grad.to_local() if is_dtensor(grad) else grad  # type: ignore[attr-defined]
        return float(local.abs().max()) if local.numel() else 0.0


def gradient_sample(params: Iterable[Tensor]) -> tuple[weakref.ref[Tensor], float] | None:
    """The smallest gradient of ``params`` (fewest elements), held weakly, with its largest
    magnitude: a witness, costing one small reduction, of an in-place rescaling of the gradients
    after this call (a ``GradScaler``'s ``unscale_``, which bumps no version counter). None
    when that magnitude is 0 or not finite, which a rescaling leaves unchanged."""
    grads = [p.grad for p in params if p.grad is not None and p.grad.numel()]
    if not grads:
        return None
    grad = min(grads, key=lambda g: g.numel())
    value = largest_magnitude(grad)
    if value == 0.0 or not math.isfinite(value):
        return None
    return weakref.ref(grad), value


def gradients_written_since(
    resting: dict[Tensor, tuple[weakref.ref[Tensor], _Version]], params: Iterable[Tensor]
) -> dict[Tensor, weakref.ref[Tensor]]:
    """The gradients that a backward (or any in-place write) produced after ``resting`` was
    taken (a new gradient tensor, or the same one with a newer version), held weakly."""
    written = {}
    for param in params:
        grad = param.grad
        if grad is None:
            continue
        before = resting.get(param)
        if before is None or before[0]() is not grad or before[1] != _version(grad):
            written[param] = weakref.ref(grad)
    return written


def squared_gradient_norm(grads: list[Tensor], foreach: bool) -> float:
    """``Σ‖g‖²`` over ``grads`` as a float (0.0 for none), in one fused norm."""
    if not grads:
        return 0.0
    squared = scaled_squared_norm(grads, grads, [], scaling="identity", eta=0.0, foreach=foreach)
    return to_float(squared)


def zero_learning_rate_and_gradient(
    param_groups: list[dict[str, Any]], grads: list[Tensor], foreach: bool
) -> bool:
    """Every learning rate of ``param_groups`` is 0 and every gradient of ``grads`` is zero
    (true of none): the step with which ``torch.distributed.checkpoint``'s
    ``set_optimizer_state_dict`` creates an optimizer's state before loading into it. It moves
    no weight and is no training step."""
    if any(float(group.get("lr", 1.0)) != 0.0 for group in param_groups):
        return False
    return squared_gradient_norm(grads, foreach) == 0.0


def gradients_are_finite(params: list[Tensor], *, foreach: bool) -> bool:
    """Whether every gradient of ``params`` (those that have one) is finite: one fused norm."""
    grads = [p.grad for p in params if p.grad is not None]
    return math.isfinite(squared_gradient_norm(grads, foreach))


def refuse_missing_second_pass(method: str) -> NoReturn:
    """Raise for a base step after an ascent whose gradients no backward wrote since
    ``first_step()`` zeroed them: stepping would apply weight decay and momentum to a zero
    gradient, silently."""
    raise RuntimeError(
        f"{method}: the base step after first_step() found no gradient from a second pass "
        "(no backward wrote the gradients first_step() zeroed): run the forward and backward at "
        "the perturbed weights between first_step() and second_step(). No step was taken and "
        "the weights are at θ"
    )


def to_float(value: Tensor) -> float:
    """A Python float from a 0-dim tensor, gathering a DTensor (FSDP2) first."""
    full_tensor = getattr(value, "full_tensor", None)
    if callable(full_tensor):
        value = full_tensor()
    return float(value.item())


def refuse_foreign_state_dict(state_dict: Any) -> None:
    """Raise a clear ``ValueError`` for state dicts that torch would fail on obscurely."""
    if not isinstance(state_dict, dict) or "state" not in state_dict:
        raise ValueError(
            "Invalid state_dict: expected the dict returned by optimizer.state_dict() (with "
            f"'state' and 'param_groups'), but got {type(state_dict).__name__}"
            + (f" with keys {sorted(map(str, state_dict))}" if isinstance(state_dict, dict) else "")
        )
    per_param = state_dict["state"]
    values = per_param.values() if isinstance(per_param, dict) else []
    if any(isinstance(value, dict) and "old_p" in value for value in values):
        raise ValueError(
            "Invalid state_dict: it holds per-parameter 'old_p' tensors, the weight backups of "
            "the SAM implementation in davda54/sam (and its copies). Those state dicts do not "
            "contain the base optimizer's state (its moments were never saved), so there is "
            "nothing to resume from: load your base optimizer's own state dict, if you saved "
            "it, with optimizer.base_optimizer.load_state_dict(...), or start the optimizer "
            "afresh. tram's state_dict() saves the base optimizer's state with its own."
        )
