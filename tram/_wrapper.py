"""The two-pass optimizer base: the optimizer contract every method in tram honours.

A method subclasses :class:`TwoPassOptimizer` and chooses two things only: the diagonal operator
``T`` of its ascent direction (:meth:`TwoPassOptimizer._scaling`) and its radius
(:meth:`TwoPassOptimizer._radii`). Everything else lives here once: sharing state with the
wrapped optimizer, the closure protocol, backups and exact restore, loss scaling, skipping
non-finite ascents, ``ascent_every``, BatchNorm statistics, distributed ascent modes and
checkpoints.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, overload

import torch
from torch import Tensor, nn
from torch.amp import GradScaler
from torch.optim import Optimizer

from tram._ascent import (
    NORM_EPSILON,
    Scaling,
    apply_ascent_,
    is_dtensor,
    restore_,
    scaled_squared_norm,
)
from tram._buckets import Bucket, backup_for, collect_buckets, use_foreach
from tram._callers import check_step_closure, grad_scaler_stepping, has_unscaled
from tram._forward_state import restore_buffers, save_buffers, save_buffers_outside
from tram._parametrize_cache import refuse_a_filled_cache
from tram._step_state import (
    MissingAscentError,
    _SharedField,
    _StepState,
    gradient_sample,
    gradients_are_finite,
    gradients_at_rest,
    gradients_written_since,
    largest_magnitude,
    refuse_foreign_state_dict,
    refuse_missing_ascent,
    refuse_missing_second_pass,
    squared_gradient_norm,
    to_float,
    zero_learning_rate_and_gradient,
)
from tram._validation import (
    check_base_optimizer,
    check_parameters,
    check_positive_int,
    inverse_grad_scale,
)
from tram._zero_redundancy import (
    LocalOptimizerSnapshot,
    is_zero_redundancy_optimizer,
    unconsolidated_state_error,
)
from tram.batchnorm import (
    batchnorms_compiled_in_place,
    disarm,
    every_batchnorm,
    every_module_with_buffers,
    freeze_running_stats,
    refuse_running_stats_updates,
    running_stats_refusal,
    search_compiled_in_place,
    unfreeze_running_stats,
    updated_a_second_time,
    updating_running_stats,
    watch_running_stats,
)

__all__ = ["MissingAscentError", "TwoPassOptimizer"]

WRAPPER_STATE_KEY = "tram"
"""Key of the wrapper's own state inside :meth:`TwoPassOptimizer.state_dict`."""

_T = TypeVar("_T")


class TwoPassOptimizer(Optimizer):
    """Base class of the two-pass (sharpness-aware) optimizer wrappers.

    It wraps an optimizer *instance* and shares its ``param_groups`` and ``state``: a learning
    rate scheduler, a ``GradScaler``, gradient clipping or a checkpoint see one object graph.
    The wrapper's own hyperparameters (``rho`` and so on) are stored in every param group, so
    they can be set per group and are saved with the base optimizer's state.

    Three ways to drive it:

    - ``loss = opt.step(closure)``: the torch contract. The closure (zero the gradients,
      forward, backward, return the loss) is called at the weights θ, the weights ascend to
      θ+ε, the closure is called again, the weights are restored and the base optimizer steps
      with the gradient from θ+ε. Returns the loss of the first call.
    - explicit: ``loss.backward(); if opt.first_step(): <forward+backward at θ+ε>;
      opt.second_step()``. ``first_step`` returns False when it did not perturb (an
      ``ascent_every`` off-step, or a non-finite gradient norm or radius); the gradient is then
      untouched and the second pass must be skipped.
    - ``opt.step()`` with no closure restores the weights if they are perturbed, then takes the
      base step. This is how the Hugging Face ``Trainer``, accelerate, ``GradScaler.step`` and
      distributed checkpointing call an optimizer.

    ``first_step`` consumes the gradient: it is overwritten while the ascent is computed and
    then zeroed in place (buffers are kept, so the second backward allocates nothing).

    Args:
        base_optimizer: the optimizer to wrap, any ``torch.optim.Optimizer`` instance.
        defaults: the method's hyperparameters, stored in every param group.
        model: optional. When given, BatchNorm running statistics are frozen while the weights
            are perturbed (they keep the first pass's update only), and ``local_ascent`` can
            use its ``no_sync``.
        ascent_every: run the two-pass step on every ``ascent_every``-th step only; the other
            steps are plain base steps with one forward and backward (Composer's ``interval``).
        local_ascent: with ``step(closure)`` and a ``DistributedDataParallel`` ``model``, run the
            first pass under ``model.no_sync()``: each worker ascends along its own gradient
            (the SAM paper's m-sharpness with m the per-worker batch; one all-reduce per step
            instead of two). The default is the synchronised ascent of the global batch.
        foreach: use the ``torch._foreach_*`` implementation. ``None`` picks it when all
            parameters are on CUDA, as ``torch.optim`` does.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        defaults: dict[str, Any],
        *,
        model: nn.Module | None = None,
        ascent_every: int = 1,
        local_ascent: bool = False,
        foreach: bool | None = None,
    ) -> None:
        check_base_optimizer(type(self).__name__, base_optimizer, defaults, model)
        self.base_optimizer = base_optimizer
        self.model = model
        self.ascent_every = check_positive_int("ascent_every", ascent_every)
        self.local_ascent = bool(local_ascent)
        self.foreach = foreach
        self._method_defaults = dict(defaults)
        for group in base_optimizer.param_groups:
            self._validate_group({**defaults, **group})
        self._initializing = True
        # torch's Optimizer.__init__ adds the *same* group dicts: they are shared with the base.
        super().__init__(base_optimizer.param_groups, {**base_optimizer.defaults, **defaults})
        self._initializing = False
        self._relink()
        self._follow_the_base_optimizers_loads()
        self._backups: dict[Tensor, Tensor] = {}
        self._step_state = _StepState()

    # ------------------------------------------------------------------ counters
    steps = _SharedField[int]("Base optimizer steps taken through this wrapper (checkpointed).")
    skipped_ascents = _SharedField[int](
        "Ascents skipped because the gradient norm or the radius was not finite."
    )
    skipped_steps = _SharedField[int](
        "Base steps skipped because a gradient (of either pass) was not finite."
    )
    last_ascent_norm = _SharedField["float | None"](
        "‖T g‖ of the last ascent, unscaled by ``grad_scale``: for logging."
    )

    # ------------------------------------------------------------------ sharing with the base
    def _relink(self) -> None:
        """Share ``param_groups`` and ``state`` with the base optimizer again.

        ``Optimizer.load_state_dict`` builds new group dicts, and accelerate calls it inside
        ``prepare()``; a wrapper that kept the old objects would silently drive stale groups.
        """
        base = self.base_optimizer
        if self.param_groups is not base.param_groups:
            self.param_groups = base.param_groups
        if self.state is not base.state:
            self.state = base.state
        for group in self.param_groups:
            for key, value in self._method_defaults.items():
                group.setdefault(key, value)

    def _follow_the_base_optimizers_loads(self) -> None:
        """Relink as soon as the base optimizer loads a state dict by itself
        (``optimizer.base_optimizer.load_state_dict(...)``, a plain-optimizer checkpoint loaded
        into it): a scheduler or a manual ``lr`` written through the wrapper's ``param_groups``
        before its next call would otherwise go to the dead group dicts, silently. The hook holds
        the wrapper weakly; torch leaves hooks out of a copied or unpickled optimizer, so
        :meth:`__setstate__` registers it again."""
        wrapper = weakref.ref(self)

        def relink(base: Optimizer) -> None:
            live = wrapper()
            if live is not None and live.base_optimizer is base:
                live._relink()

        register = getattr(self.base_optimizer, "register_load_state_dict_post_hook", None)
        if register is not None:
            register(relink)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group through the base optimizer, which fills in its own defaults."""
        if getattr(self, "_initializing", False):
            super().add_param_group(param_group)
            return
        self._validate_group({**self._method_defaults, **param_group})
        params = param_group["params"]
        if not isinstance(params, set):  # torch refuses a set, with its own message
            # As torch does, a tensor becomes a list of one; a generator is read once, and the
            # base optimizer gets the list that was checked.
            params = [params] if isinstance(params, Tensor) else list(params)
            check_parameters(type(self).__name__, params)
            param_group = {**param_group, "params": params}
        self.base_optimizer.add_param_group(param_group)
        self._relink()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients through the base optimizer.

        Called outside :meth:`first_pass`, it also forgets what the method observed of the
        first passes since the last step (TRAM's recorded forwards, TRAM-Fisher's noised ones):
        their gradients are gone, so no step may measure or accept them. A loop that skips a
        batch after its first pass would otherwise measure d over that batch and the next.
        Inside :meth:`first_pass` (a closure's ``zero_grad()`` before its forward, or between
        its forward and backward) the pass is kept. ``model.zero_grad()`` does not reach the
        wrapper: a loop that drops a step after its first pass should call this one.
        """
        state = self._step_state
        if state.first_pass_depth == 0:
            self._forget_first_passes()
        self.base_optimizer.zero_grad(set_to_none=set_to_none)
        state.zero_grad_calls += 1
        state.resting_gradients = gradients_at_rest(self._params())
        if state.perturbed_buckets:
            # torch reads set_to_none as a truth value.
            state.zero_grad_sets_to_none = bool(set_to_none)
            # Zeroed again while perturbed: only a backward after this call is a second pass.
            state.zeroed_gradients = gradients_at_rest(state.ascent_params)

    # ------------------------------------------------------------------ what a method chooses
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for invalid hyperparameters in ``group``."""

    def _scaling(self, group: dict[str, Any], param: Tensor) -> tuple[Scaling, float]:
        """The operator ``T`` for ``param``: its kind and its ``eta``."""
        return "identity", 0.0

    def _radii(self) -> list[float] | None:
        """The ascent radius of each param group, or None to skip this ascent."""
        radii = [float(group["rho"]) for group in self.param_groups]
        for radius in radii:
            if radius < 0:  # set after construction, e.g. by a schedule; nan/inf are skipped
                raise ValueError(f"Invalid rho: {radius}")
        return radii

    def _forget_first_passes(self) -> None:
        """Drop what :meth:`_observe_first_pass` kept of the passes since the last step."""

    def _before_base_step(self) -> None:
        """Called before every base step, with the weights at θ (TRAM snapshots θt−1 here)."""

    def _after_base_step(self) -> None:
        """Called after every base optimizer step (TRAM updates its EMA here)."""

    def _extra_state(self) -> dict[str, Any]:
        """Method state to save besides the base optimizer's (weights-only-loadable values)."""
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Load what :meth:`_extra_state` saved."""

    # ------------------------------------------------------------------ the two passes
    @property
    def is_perturbed(self) -> bool:
        """True between a successful :meth:`first_step` and :meth:`restore`."""
        return bool(self._step_state.perturbed_buckets)

    @property
    def ascent_due(self) -> bool:
        """True when the coming step ascends: its ``first_step()`` perturbs the weights unless
        the gradient or the radius is not finite. False on an ``ascent_every`` off-step, whose
        first pass is a plain step (under ``local_ascent=True`` its gradient is synchronised)."""
        return self.steps % self.ascent_every == 0

    @property
    def observes_first_pass(self) -> bool:
        """True when :meth:`first_pass` does more than suspend synchronisation for
        ``local_ascent``: the method watches the first pass's forward (TRAM records it to measure
        its trust region), so a caller that drives the passes itself must run that forward
        inside ``first_pass()``."""
        return type(self)._observe_first_pass is not TwoPassOptimizer._observe_first_pass

    @torch.no_grad()
    def first_step(self, *, grad_scale: float | Tensor | None = None) -> bool:
        """Move the weights from θ to θ+ε along the current gradient.

        Args:
            grad_scale: the loss scale the gradients are multiplied by (``scaler.get_scale()``
                under fp16 with a ``GradScaler``). Do not unscale before calling this; the
                ascent is computed from the scaled gradients.

        Returns:
            True if the weights were perturbed. False on an ``ascent_every`` off-step and when
            the gradient norm or the radius is not finite (counted in ``skipped_ascents``, with
            a warning); the gradients are then left untouched. After a non-finite gradient the
            next base step is skipped too (``skipped_steps``), so nan/inf never reach the
            weights; under a ``GradScaler`` the scaler skips it anyway and backs off its scale.
            That holds on an off-step, whose gradient the base step would take as it is, and
            when TRAM's d is not finite along with the gradient (a nan in the forward).

        After it returned True, the base step (``second_step()``, ``step()``) checks the gradient
        of the second pass: none at all (no second backward) raises ``RuntimeError``; a
        non-finite one skips the base step with the weights at θ (``skipped_steps``, warning).
        """
        self._relink()
        state = self._step_state
        inverse_scale = inverse_grad_scale(grad_scale)
        if self.is_perturbed:
            raise RuntimeError(
                "first_step() called while the weights are perturbed; call second_step() or "
                "restore() first"
            )
        if self.ascent_due:
            self._refuse_unscaled_before_the_ascent()
            refuse_a_filled_cache(type(self).__name__)
        buckets = collect_buckets(self.param_groups, self._scaling, method=type(self).__name__)
        if not buckets:
            raise RuntimeError(
                "first_step() found no gradients: call loss.backward() before first_step()"
            )
        if self.ascent_due:
            self._refuse_batchnorms_compiled_in_place(
                [param for bucket in buckets for param in bucket.params]
            )
        state.ascent_attempted = True
        state.gradient_not_finite = False
        state.running_stats_updated_twice = []
        state.watched_outside_the_model = False
        state.ascent_params = []
        state.restored_before_second_pass = False
        state.restored_gradient_sample = None
        # T = (1 + η g²)^(-1/2) depends on the gradient's scale: see _refuse_a_grad_scaler_step.
        state.first_step_unscaled_fisher = grad_scale is None and any(
            bucket.scaling == "fisher" and bucket.eta > 0 for bucket in buckets
        )
        try:
            return self._ascend(buckets, inverse_scale)
        except BaseException:
            self._undo_first_step()
            raise

    def _ascend(self, buckets: list[Bucket], inverse_scale: float) -> bool:
        """The part of :meth:`first_step` after its checks: d, the norm, the ascent."""
        state = self._step_state
        if not self.ascent_due:
            # The off-step's base step takes this gradient as it is: never a non-finite one.
            params = [param for bucket in buckets for param in bucket.params]
            if not gradients_are_finite(params, foreach=self._use_foreach(params)):
                state.gradient_not_finite = True
            return False
        # Measured before the gradient is checked, so that TRAM's records of this pass are
        # consumed either way; a non-finite radius is reported only with a finite gradient, so
        # that a non-finite gradient always skips the base step too.
        radii = self._radii()
        radius_is_finite = radii is not None and all(math.isfinite(radius) for radius in radii)
        total = None
        for bucket in buckets:
            # The backups hold T g from here to apply_ascent_, which reuses it.
            bucket.backups = [
                backup_for(self._backups, p, method=type(self).__name__) for p in bucket.params
            ]
            part = scaled_squared_norm(
                bucket.params,
                bucket.grads,
                bucket.backups,
                scaling=bucket.scaling,
                eta=bucket.eta,
                inverse_scale=inverse_scale,
                foreach=self._use_foreach(bucket.params),
            )
            total = part if total is None else total + part.to(total.device)
        assert total is not None
        norm = math.sqrt(to_float(total))
        if not math.isfinite(norm):
            state.gradient_not_finite = True
            return state.skip_ascent(type(self).__name__, "the gradient norm is not finite")
        if not radius_is_finite:
            return state.skip_ascent(type(self).__name__, "the ascent radius is not finite")
        assert radii is not None
        state.last_ascent_norm = norm * inverse_scale
        for bucket in buckets:
            foreach = self._use_foreach(bucket.params)
            # A base optimizer with maximize=True ascends the loss: the worst point near θ is
            # then down the gradient (maximizing L is minimizing −L, whose ascent is −ε).
            direction = -1.0 if self.param_groups[bucket.group_index].get("maximize") else 1.0
            apply_ascent_(
                bucket.params,
                bucket.grads,
                bucket.backups,
                scaling=bucket.scaling,
                eta=bucket.eta,
                coefficient=direction * radii[bucket.group_index] / (norm + NORM_EPSILON),
                inverse_scale=inverse_scale,
                foreach=foreach,
            )
            if foreach:
                torch._foreach_zero_(bucket.grads)
            else:
                for grad in bucket.grads:
                    grad.zero_()
            # Hold no reference to the gradients while perturbed: a closure's zero_grad()
            # (set_to_none=True) then frees them before the second backward allocates new ones,
            # instead of the step's peak memory growing by one set of gradients.
            bucket.grads = []
            # Bucket by bucket, so that a later one that raises (out of memory) leaves this
            # one to be put back (apply_ascent_ moves a bucket's weights in its last,
            # allocation-free pass).
            state.perturbed_buckets.append(bucket)
        state.ascent_params = [param for bucket in buckets for param in bucket.params]
        state.zeroed_gradients = gradients_at_rest(state.ascent_params)
        if self.model is not None:
            state.frozen_batchnorms[:] = freeze_running_stats(self.model)
            state.saved_buffers = save_buffers(self.model)
        if self.model is None or self._perturbs_outside_the_model(state.ascent_params):
            # With model= too when it does not hold every perturbed weight: a BatchNorm outside
            # it is not frozen (the frozen ones pass the guard).
            state.batchnorm_guard = refuse_running_stats_updates(
                type(self).__name__,
                state.still_perturbed,
                state.ascent_params,
                model_given=self.model is not None,
                replaying=state.in_the_second_pass,
                saved_buffers=state.saved_buffers,
            )
            state.watched_running_stats = watch_running_stats(state.ascent_params)
        return True

    def _watch_the_second_pass(self) -> None:
        """Record the running statistics of the BatchNorms outside ``model=`` on entering
        :meth:`second_pass`, when ``model=`` holds every perturbed weight (no guard is armed
        then), and copy the other buffers of every live module outside it, for :meth:`restore`
        to put back (:func:`tram._forward_state.save_buffers_outside`). A hook would cost every
        module call of the second pass, and would make a model compiled in place recompile at
        every step (its graph reads torch's global hooks); the BatchNorms and the modules with
        buffers are found by one walk of the garbage collector's objects per process (about
        0.1 s) and heard of when built after that (:func:`tram.batchnorm.every_batchnorm`)."""
        state = self._step_state
        state.watched_running_stats = watch_running_stats(
            state.ascent_params, batchnorms=every_batchnorm()
        )
        state.watched_outside_the_model = True
        assert self.model is not None
        state.saved_buffers.extend(save_buffers_outside(self.model, every_module_with_buffers()))

    def _refuse_batchnorms_compiled_in_place(self, params: list[Tensor]) -> None:
        """Raise ``RuntimeError`` before the ascent when a BatchNorm that the guard armed below
        cannot see (inside a module compiled in place, :func:`batchnorms_compiled_in_place`)
        would update its running statistics at θ+ε. The search walks the collector's objects
        again only after dynamo compiled something, and the BatchNorms of these parameters are
        picked again only after a walk or for another set of parameters."""
        if self.model is not None and not self._perturbs_outside_the_model(params):
            return  # every perturbed weight is the model's, whose BatchNorms are frozen
        key = (search_compiled_in_place(), tuple(id(param) for param in params))
        cached = self.__dict__.get("_batchnorms_compiled_in_place")
        if cached is None or cached[0] != key:
            cached = (key, batchnorms_compiled_in_place(params, excluding=self.model))
            self._batchnorms_compiled_in_place = cached
        batchnorm = updating_running_stats(cached[1])
        if batchnorm is not None:
            raise running_stats_refusal(
                type(self).__name__,
                batchnorm,
                " inside a module compiled in place (module.compile(), which runs no module "
                "hook) would run",
                model_given=self.model is not None,
            )

    def _perturbs_outside_the_model(self, params: list[Tensor]) -> bool:
        """Whether some of the perturbed ``params`` are not ``model``'s: computed once per set of
        perturbed parameters (a walk over the model's modules costs ~0.3 ms per 200 parameters)."""
        key = tuple(id(param) for param in params)
        cached = self.__dict__.get("_outside_the_model")
        if cached is None or cached[0] != key:
            assert self.model is not None
            cached = (key, _any_outside(params, self.model))
            self._outside_the_model = cached
        return cached[1]

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved weights θ back (exact in every dtype), and the buffers the forwards
        at θ+ε wrote (:mod:`tram._forward_state`). A no-op when not perturbed."""
        state = self._step_state
        if state.perturbed_buckets:
            self._keep_the_second_passes_gradients()
            state.restored_gradient_sample = gradient_sample(state.ascent_params)
        state.zeroed_gradients = {}
        state.zero_grad_sets_to_none = True
        for bucket in state.perturbed_buckets:
            restore_(bucket.params, bucket.backups, foreach=self._use_foreach(bucket.params))
        state.perturbed_buckets.clear()
        unfreeze_running_stats(state.frozen_batchnorms)
        state.frozen_batchnorms.clear()
        restore_buffers(state.saved_buffers)
        state.saved_buffers = []
        if state.batchnorm_guard is not None:
            disarm(state.batchnorm_guard)
            state.batchnorm_guard = None
        if state.watched_running_stats:
            state.running_stats_updated_twice = updated_a_second_time(
                state.watched_running_stats, replayed=state.second_pass_entered
            )
            state.watched_running_stats = []
        state.second_pass_entered = False

    def _keep_the_second_passes_gradients(self) -> None:
        """Before the weights go back to θ: note whether any backward wrote the gradients
        :meth:`first_step` zeroed (none did: the weights are restored before the second pass),
        and drop the zeros it left on weights the second pass did not reach (an expert routed
        to at θ only, a layer frozen or dropped at θ+ε), as ``step(closure)``'s ``zero_grad()``
        drops them: the base optimizer skips such a weight, where a zero gradient would apply
        its weight decay and momentum and create its state. Every form of the step (explicit,
        the integrations' replays) takes ``step(closure)``'s step. Where that closure zeroes
        with ``zero_grad(set_to_none=False)`` through the wrapper, the zeros stay, as the
        closure left them (the base optimizer alone would then move such a weight too); a
        zeroing the wrapper does not see (``model.zero_grad``) counts as the default."""
        state = self._step_state
        written = gradients_written_since(state.zeroed_gradients, state.ascent_params)
        if not written:
            state.restored_before_second_pass = True
        if not state.zero_grad_sets_to_none:
            return
        for param in state.ascent_params:
            if param not in written:
                param.grad = None

    def _undo_first_step(self) -> None:
        """Forget a :meth:`first_step` that raised (an invalid ``rho`` set by a schedule, TRAM's
        refusals, running out of memory): the weights of the buckets it had moved are put back
        to θ and the step is dropped, so that a base step without a new first pass is refused
        (:class:`MissingAscentError`) instead of stepping along a gradient the ascent had half
        consumed. The base class's restore: a subclass's bookkeeping of a completed ascent
        does not apply."""
        state = self._step_state
        TwoPassOptimizer.restore(self)
        state.running_stats_updated_twice = []
        state.abandon()

    def second_step(self) -> None:
        """Restore the weights and take the base optimizer step with the current gradient."""
        if not self._step_state.ascent_attempted:
            raise RuntimeError("second_step() called without first_step(); call first_step() first")
        self.step()

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], _T]) -> _T: ...

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one optimizer step; see the class docstring for the forms.

        ``step(closure)`` after ``first_step()`` (the explicit form, as Lightning's manual
        optimization drives it) finishes that step when the closure returns None: the closure is
        called once, for the caller's hooks, then the weights are restored and the base step is
        taken, as by :meth:`second_step`. A closure that returns a loss while the weights are
        perturbed would add a third pass to the gradient and raises ``RuntimeError``; once the
        weights are restored, it starts a new two-pass step and the abandoned one is dropped.

        A closure that adds to gradients a backward left before ``step()`` (gradient
        accumulation outside the closure) without zeroing them raises ``RuntimeError``: its
        second pass would replay the closure alone.
        """
        self._relink()
        state = self._step_state
        if closure is None:
            if not state.ascent_attempted and self._initialises_the_base_state():
                self.base_optimizer.step()
                return None
            if not state.ascent_attempted and self.ascent_due:
                refuse_missing_ascent(type(self).__name__, type(self.base_optimizer).__name__)
            if state.ascent_params:
                self._refuse_a_grad_scaler_step(grad_scaler_stepping(sys._getframe(1)))
            else:
                self._remember_the_grad_scaler(grad_scaler_stepping(sys._getframe(1)))
            self.restore()
            self._base_step()
            return None
        if state.ascent_attempted and self.is_perturbed:
            return self._finish_perturbed_step(closure)
        written: dict[Tensor, Any] = {}
        zero_grad_calls = state.zero_grad_calls
        if not state.ascent_attempted:
            check_step_closure(self, closure)
            written = gradients_written_since(state.resting_gradients, self._params())
        with self.first_pass(), torch.enable_grad():
            loss = closure()
        if (
            written
            and state.zero_grad_calls == zero_grad_calls
            and any(grad() is param.grad for param, grad in written.items())
        ):
            self._forget_first_passes()
            raise RuntimeError(
                f"{type(self).__name__}.step(closure) found gradients from a backward run before "
                "step() (the first micro-batches of a gradient-accumulation window?), and the "
                "closure added to them without zeroing them: the ascent would come from all of "
                "them, but the second pass only replays the closure, so the update would be the "
                "closure's gradient alone. Run every micro-batch inside the closure "
                "(tram.accumulating_closure builds one), or start the closure with "
                "optimizer.zero_grad(). No step was taken; the weights are at θ"
            )
        if loss is None and state.ascent_attempted:
            self._base_step()  # a hooks-only closure finishing an explicit step
            return None
        if loss is None or not isinstance(loss, (Tensor, float, int)):
            raise TypeError(
                "closure must return the loss (a Tensor or a float), but it returned "
                f"{type(loss).__name__}"
            )
        try:
            if self.first_step():
                with self.second_pass(), torch.enable_grad():
                    second = closure()
                if _same_graph(second, loss):
                    raise RuntimeError(
                        f"{type(self).__name__}.step(closure): the closure's second call returned "
                        "its first call's loss (the same autograd graph), so its backward ran "
                        "through the graph built at θ: the gradient is the first pass's, not "
                        "the one at θ+ε, and the step would be a plain base step. Run the "
                        "forward inside the closure. No step was taken; the weights are at θ"
                    )
        except BaseException:
            state.abandon()  # the next step must start afresh, not finish this one
            raise
        finally:
            self.restore()
        self._base_step()
        return loss

    def _remember_the_grad_scaler(self, stepping: tuple[GradScaler, Any] | None) -> None:
        """Keep (weakly) the enabled ``GradScaler`` stepping this optimizer, and the object it
        was given, for :meth:`_refuse_unscaled_before_the_ascent`."""
        if stepping is not None:
            scaler, optimizer = stepping
            self._step_state.grad_scaler = (weakref.ref(scaler), id(optimizer))

    def _refuse_unscaled_before_the_ascent(self) -> None:
        """Refuse ``first_step()`` after ``scaler.unscale_(optimizer)`` in the same step, by the
        ``GradScaler`` last seen stepping this optimizer. The scaler unscales once per step, so
        the second pass's gradients would reach the base step still scaled (SGD the scale
        times too far), silently. The first step a scaler takes is not covered: it is seen
        only at its first ``scaler.step()``, where this order and the right one (the second
        backward, ``unscale_``, ``scaler.step()``) leave the same trace unless ``restore()``
        came first (:meth:`_refuse_a_grad_scaler_step`)."""
        remembered = self._step_state.grad_scaler
        if remembered is None:
            return
        scaler = remembered[0]()
        if scaler is None or not scaler.is_enabled():
            return
        if not has_unscaled(scaler, remembered[1]):
            return
        scale = float(scaler.get_scale())
        if scale == 1.0:
            return  # unscaling by 1 changes nothing, nor is any gradient scaled
        raise RuntimeError(
            f"{type(self).__name__}.first_step() after scaler.unscale_(optimizer) in the same "
            "step (before the ascent, as the usual AMP clipping recipe puts it): the GradScaler "
            "unscales once per step, so it would not unscale the second pass's gradients, and "
            f"the base step would take them still scaled, by {scale:g}. Call "
            "scaler.unscale_(optimizer) (and clip) after the second backward and restore(), "
            "then scaler.step(); tram.scaled_step(optimizer, scaler, loss_fn) runs the passes in "
            "that order. Nothing was done; the weights are at θ. The scaler has marked this "
            "optimizer as unscaled: call scaler.update() before the next step"
        )

    def _refuse_a_grad_scaler_step(self, stepping: tuple[GradScaler, Any] | None) -> None:
        """Refuse ``scaler.step(optimizer)`` (``stepping``: the enabled ``GradScaler`` calling,
        if any, and the object it was given) after an ascent whose explicit fp16 loop would
        make the step differ, silently:

        - ``scaler.unscale_(optimizer)`` before the second backward (the usual clipping recipe,
          kept before ``first_step()``): the scaler then unscales nothing more, and the base
          step takes the second pass's gradients still scaled (SGD the scale times too far).
          Seen when ``restore()`` came before ``step()`` and the gradient it sampled is
          unchanged; an ``unscale_`` between the second backward and ``restore()`` looks the
          same and is refused too (the message gives the order that works).
        - a Fisher ascent (``FisherSAM``, η > 0) from ``first_step()`` without ``grad_scale``:
          T = (1 + η g²)^(-1/2) of the scaled gradient is not the Fisher operator's.

        From the second step on, :meth:`_refuse_unscaled_before_the_ascent` refuses the first
        case at ``first_step()`` already, whether or not ``restore()`` came before ``step()``.
        """
        if stepping is None:
            return
        self._remember_the_grad_scaler(stepping)
        scaler = stepping[0]
        state = self._step_state
        scale = float(scaler.get_scale())
        if scale == 1.0:
            return  # unscaling by 1 changes nothing, nor is any gradient scaled
        problem = None
        sample = state.restored_gradient_sample
        grad = sample[0]() if sample is not None else None
        if (
            sample is not None
            and grad is not None
            and any(param.grad is grad for param in state.ascent_params)
            and largest_magnitude(grad) == sample[1]
        ):
            problem = (
                "no gradient was unscaled after restore(): scaler.unscale_(optimizer) ran "
                "before it (before first_step(), as a clipping recipe puts it?), so the scaler "
                "will not unscale the second pass's gradients and the base step would take "
                f"them still scaled, by {scale:g}. Call restore() right after the second "
                "backward, then scaler.unscale_(optimizer) (and clip), then scaler.step()"
            )
        elif state.first_step_unscaled_fisher:
            problem = (
                "first_step() was called without grad_scale while this GradScaler scales the "
                f"gradients by {scale:g}: the Fisher operator T = (1 + eta g^2)^(-1/2) was "
                "computed on the scaled gradient, so the ascent was not the Fisher ascent. Pass "
                "grad_scale=scaler.get_scale() to first_step(), and do not unscale before it"
            )
        if problem is None:
            return
        self.restore()
        state.abandon()
        state.resting_gradients = gradients_at_rest(self._params())
        raise RuntimeError(
            f"{type(self).__name__} stepped by torch.amp.GradScaler.step(): {problem}; "
            "tram.scaled_step(optimizer, scaler, loss_fn) runs the passes in that order. No "
            "step was taken; the weights are at θ. The scaler has marked this optimizer as "
            "unscaled: call scaler.update() before the next step"
        )

    def _initialises_the_base_state(self) -> bool:
        """Whether this ``step()`` only makes the base optimizer create its state, as
        ``torch.distributed.checkpoint``'s ``set_optimizer_state_dict`` does before loading
        (accelerate and Lightning under FSDP2): no state yet, every learning rate 0, every
        gradient zero. Not a training step: it is not counted, has no ascent to warn about and
        runs no target hook."""
        if self.base_optimizer.state:
            return False
        grads = [p.grad for p in self._params() if p.grad is not None]
        return bool(grads) and zero_learning_rate_and_gradient(
            self.param_groups, grads, self._use_foreach(grads)
        )

    def _finish_perturbed_step(self, closure: Callable[[], Any]) -> None:
        state = self._step_state
        try:
            result = closure()
        except BaseException:
            state.abandon()
            raise
        finally:
            self.restore()
        if result is not None:
            state.abandon()
            raise RuntimeError(
                f"{type(self).__name__}.step(closure) was called after first_step() with the "
                "weights perturbed, and the closure returned a loss: it ran another pass into "
                "the second-pass gradient. Finish an explicit step with second_step() (or a "
                "closure that runs no pass and returns None), or use step(closure) alone, which "
                "runs both passes itself. The weights are at θ and no step was taken"
            )
        self._base_step()

    def _base_step(self) -> None:
        state = self._step_state
        if state.running_stats_updated_twice:
            batchnorm = state.running_stats_updated_twice[0]
            state.running_stats_updated_twice = []
            state.abandon()
            state.resting_gradients = gradients_at_rest(self._params())  # as after any step
            where = (
                " ran in the second pass (step(closure)'s second call of its closure, or "
                "second_pass())"
                if state.watched_outside_the_model
                else " inside a compiled graph (which runs no module hook) ran"
            )
            raise running_stats_refusal(
                type(self).__name__,
                batchnorm,
                f"{where} (its statistics are put back as the first pass left them, and no step "
                "was taken)",
                model_given=self.model is not None,
            )
        try:
            self._take_base_step()
        finally:
            self._step_state.resting_gradients = gradients_at_rest(self._params())

    def _params(self) -> list[Tensor]:
        return [param for group in self.param_groups for param in group["params"]]

    def _take_base_step(self) -> None:
        state = self._step_state
        state.ascent_attempted = False
        ascent_params, state.ascent_params = state.ascent_params, []
        restored_early, state.restored_before_second_pass = state.restored_before_second_pass, False
        if state.gradient_not_finite:
            # Stepping would write nan/inf into the weights. (Under a GradScaler this point is
            # never reached: the scaler skips step() itself.)
            state.gradient_not_finite = False
            state.skip_base_step(type(self).__name__, "the gradient is not finite")
            return
        if ascent_params:
            if restored_early:
                # None (dropped by restore()) or still the zeros first_step() or a
                # zero_grad(set_to_none=False) left: no backward ran at all.
                grads = [param.grad for param in ascent_params if param.grad is not None]
                if squared_gradient_norm(grads, self._use_foreach(ascent_params)) == 0.0:
                    refuse_missing_second_pass(type(self).__name__)
                # A backward ran after the restore: at θ.
                raise RuntimeError(
                    f"{type(self).__name__}: the weights were restored to θ (restore(), eval(), "
                    "load_state_dict()) after first_step() and before any backward at the "
                    "perturbed weights, so the gradient this step would take is not the second "
                    "pass's (at θ+ε). Run the second forward and backward before restoring, or "
                    "start the step again with a first pass and first_step(). No step was taken; "
                    "the weights are at θ"
                )
            # Every gradient, not only the perturbed weights': a weight with no gradient at θ
            # may have one from the second pass alone.
            params = self._params()
            if not gradients_are_finite(params, foreach=self._use_foreach(params)):
                state.skip_base_step(
                    type(self).__name__, "the gradient of the second pass (at θ+ε) is not finite"
                )
                return
        self._before_base_step()
        self.base_optimizer.step()
        state.steps += 1
        self._after_base_step()

    @contextlib.contextmanager
    def first_pass(
        self, *, no_sync: contextlib.AbstractContextManager[Any] | None = None
    ) -> Iterator[None]:
        """Context for the first forward and backward of a step (at θ).

        ``step(closure)`` enters it itself. In the explicit form, wrap the first pass in it::

            with optimizer.first_pass():
                loss_fn(model(x), y).backward()
            if optimizer.first_step():
                with optimizer.second_pass():
                    loss_fn(model(x), y).backward()
            optimizer.second_step()

        It runs the pass under ``model.no_sync()`` when ``local_ascent=True``, and lets a method
        observe the pass (TRAM records the forward to measure its trust region). For SAM, ASAM
        and Fisher SAM without ``local_ascent`` it does nothing. With gradient accumulation,
        enter it for every micro-batch of the first pass.

        Args:
            no_sync: the context that suspends gradient synchronisation, used instead of
                ``model.no_sync()`` when ``local_ascent=True`` (e.g. ``accelerator.no_sync(model)``
                when the optimizer was built before the model was wrapped).
        """
        state = self._step_state
        state.first_pass_depth += 1
        try:
            with contextlib.ExitStack() as stack:
                if self.local_ascent and self.ascent_due:
                    if no_sync is None:
                        model_no_sync = getattr(self.model, "no_sync", None)
                        if model_no_sync is None:
                            got = "None" if self.model is None else type(self.model).__name__
                            raise ValueError(
                                "local_ascent=True needs model= with a no_sync() context "
                                f"(DistributedDataParallel), but got model={got}; FSDP2 supports "
                                "the synchronised ascent only"
                            )
                        if getattr(self.model, "static_graph", False):
                            raise ValueError(
                                "local_ascent=True runs the first pass under no_sync(), which "
                                "DistributedDataParallel(static_graph=True) does not support "
                                "(its reducer would fail on an internal assert); build DDP "
                                "with static_graph=False, or use the synchronised ascent"
                            )
                        no_sync = model_no_sync()
                    stack.enter_context(no_sync)
                stack.enter_context(self._observe_first_pass())
                yield
        finally:
            state.first_pass_depth -= 1

    @contextlib.contextmanager
    def second_pass(self) -> Iterator[None]:
        """Context for the second forward and backward of a step, at θ+ε: the first pass run
        again.

        ``step(closure)`` enters it itself, and so do tram's integrations (``TramTrainer``,
        ``TramCallback``, ``manual_step``, ``TwoPassBackward``). In the explicit form, wrap the
        second pass in it, as :meth:`first_pass`'s example does.

        Every BatchNorm in training mode that runs inside it updates its running statistics a
        second time in the step, whatever feeds it, unless ``model=`` froze it: one outside
        ``model=`` (on the raw inputs, in a frozen backbone left in training mode, a teacher's)
        is refused. Without ``model=`` (or with one that leaves perturbed weights out) the
        guard's hook refuses it before it runs; with a ``model=`` that holds every perturbed
        weight, the running statistics of the BatchNorms outside it are recorded on entry, and
        one updated inside has them put back and the base step refused. Outside this context
        the explicit form cannot tell such a BatchNorm from another model's run between the
        passes, and lets it pass.

        When the block raises, the step is abandoned and the weights restored to θ before the
        error propagates.

        Raises:
            RuntimeError: when the weights are not perturbed (``first_step()`` returned False,
                or was not called).
        """
        state = self._step_state
        if not self.is_perturbed:
            raise RuntimeError(
                "second_pass() entered while the weights are at θ: enter it after first_step() "
                "returned True (on an ascent_every off-step or a skipped ascent there is no "
                "second pass)"
            )
        if not state.second_pass_entered and state.batchnorm_guard is None:
            self._watch_the_second_pass()
        state.second_pass_entered = True
        outer, state.in_second_pass = state.in_second_pass, True
        try:
            yield
        except BaseException:
            # As step(closure) does: a second pass that raised (a refused BatchNorm, an error of
            # the caller's) leaves no step to finish, and the weights at θ.
            state.abandon()
            self.restore()
            raise
        finally:
            state.in_second_pass = outer

    def _observe_first_pass(self) -> contextlib.AbstractContextManager[Any]:
        """What a method does around the first pass (TRAM: record the forward)."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ plumbing
    def _use_foreach(self, params: list[Tensor]) -> bool:
        return use_foreach(self.foreach, params)

    # ------------------------------------------------------------------ train / eval
    def train(self) -> None:
        """Forwarded to the base optimizer when it has ``train`` (schedule-free optimizers)."""
        method = getattr(self.base_optimizer, "train", None)
        if callable(method):
            method()

    def eval(self) -> None:
        """Restore the weights if perturbed (never evaluate at θ+ε), then forward to the base."""
        self.restore()
        method = getattr(self.base_optimizer, "eval", None)
        if callable(method):
            method()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict, with the wrapper's own state under ``"tram"`` in its
        first param group.

        Inside a param group rather than beside ``state`` and ``param_groups``:
        ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` and
        ``set_optimizer_state_dict`` (how accelerate and Lightning checkpoint under FSDP2) keep
        those two entries only, with every key of every param group, so the step counter and
        TRAM's target state travel with them and an FSDP2 resume is exact. The weight backups
        are never saved. Everything is loadable with ``weights_only=True``.

        Hooks registered on the wrapper (``register_state_dict_pre_hook``, ``..._post_hook``)
        run as ``Optimizer.state_dict`` runs them: the post-hooks see tram's entry, and a
        returned dict replaces the state dict. Those of the base optimizer run inside its own.
        """
        for pre_hook in _hooks(self, "_optimizer_state_dict_pre_hooks"):
            pre_hook(self)
        self._relink()
        try:
            state_dict = self.base_optimizer.state_dict()
        except RuntimeError as error:
            if is_zero_redundancy_optimizer(self.base_optimizer):
                raise unconsolidated_state_error(type(self).__name__, error) from error
            raise
        # torch packs each group into a new dict: the live param groups never see this entry.
        entry: dict[str, Any] = {
            "steps": self.steps,
            "skipped_ascents": self.skipped_ascents,
            "skipped_steps": self.skipped_steps,
            **self._extra_state(),
        }
        base_steps = _base_step_count(state_dict.get("state"))
        if base_steps is not None:
            entry["base_steps"] = base_steps
        state_dict["param_groups"][0][WRAPPER_STATE_KEY] = entry
        for post_hook in _hooks(self, "_optimizer_state_dict_post_hooks"):
            replaced = post_hook(self, state_dict)
            if replaced is not None:
                state_dict = replaced
        return state_dict

    @property
    def consolidate_state_dict(self) -> Callable[..., None]:
        """The base optimizer's ``consolidate_state_dict``, where it has one.

        ``ZeroRedundancyOptimizer`` shards its state over the ranks: every rank calls
        ``consolidate_state_dict(to=rank)`` (a collective), then ``state_dict()`` on that rank
        returns the whole state. Lightning and Fabric ask ``hasattr(optimizer,
        "consolidate_state_dict")`` before they save, so the wrapper has the attribute exactly
        when its base optimizer does (``AttributeError`` otherwise, as for the base)."""
        method = getattr(self.base_optimizer, "consolidate_state_dict", None)
        if not callable(method):
            raise AttributeError(
                f"'{type(self).__name__}' object has no attribute 'consolidate_state_dict' "
                f"(its base optimizer, {type(self.base_optimizer).__name__}, has none)"
            )
        return method

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain base-optimizer state dict).

        Checkpoints of earlier versions, which kept the wrapper's state beside ``state`` and
        ``param_groups``, load too.

        A state dict that is refused leaves the optimizer as it was: torch checks the base
        optimizer's part before loading it (``ZeroRedundancyOptimizer`` loads some of it into
        its local optimizer first), and when tram's own part is refused after that (a
        TRAM checkpoint of another target, a noise state of an earlier version) the base
        optimizer gets its previous state and param groups back (torch's load replaces both
        with new objects, so this copies nothing; a ``ZeroRedundancyOptimizer``'s local
        optimizer, which its load changes in place, gets its own back from a shallow copy).

        Hooks registered on the wrapper (``register_load_state_dict_pre_hook``,
        ``..._post_hook``) run as ``Optimizer.load_state_dict`` runs them: a pre-hook gets a
        shallow copy of ``state_dict`` and may return a replacement, before any check; the
        post-hooks run after a load that went through."""
        if isinstance(state_dict, dict):
            state_dict = state_dict.copy()
        for pre_hook in _hooks(self, "_optimizer_load_state_dict_pre_hooks"):
            replaced = pre_hook(self, state_dict)
            if replaced is not None:
                state_dict = replaced
        state_dict = self._upgrade_state_dict(state_dict)
        self.restore()
        refuse_foreign_state_dict(state_dict)
        state_dict, wrapper_state = _split_wrapper_state(state_dict)
        wrapper_state = self._unless_stale(wrapper_state, state_dict)
        before = [
            {key: group[key] for key in self._method_defaults if key in group}
            for group in self.param_groups
        ]
        base = self.base_optimizer
        previous_state, previous_groups = base.state, base.param_groups
        previous_local = LocalOptimizerSnapshot(base)
        try:
            base.load_state_dict(state_dict)
            self._relink()
            self._load_wrapper_state(wrapper_state)
        except BaseException:
            base.state, base.param_groups = previous_state, previous_groups
            previous_local.restore()
            self._relink()
            raise
        self._warn_replaced_hyperparameters(before)
        for post_hook in _hooks(self, "_optimizer_load_state_dict_post_hooks"):
            post_hook(self)

    def _upgrade_state_dict(self, state_dict: Any) -> Any:
        """A state dict of an earlier layout of this method, in its current one (after the
        load pre-hooks, before any check); the same dict when there is nothing to convert."""
        return state_dict

    def _unless_stale(
        self, wrapper_state: dict[str, Any] | None, state_dict: dict[str, Any]
    ) -> dict[str, Any] | None:
        """tram's entry, or None when the base optimizer's state stepped on without it: a
        plain optimizer that loaded a tram checkpoint keeps the entry in its param groups
        (torch copies every saved group key into the live groups) and saves it again after its
        own steps, so the entry would bring back a step counter and a TRAM reference (θt−1, the
        EMA) from before those steps. Told by the base optimizer's step count (the largest
        ``step`` of its state, for the optimizers that keep one), saved beside the entry."""
        if wrapper_state is None or "base_steps" not in wrapper_state:
            return wrapper_state
        saved = float(wrapper_state["base_steps"])
        current = _base_step_count(state_dict.get("state"))
        if current is None or current == saved:
            return wrapper_state
        warnings.warn(
            f"{type(self).__name__}.load_state_dict() ignored tram's own state (the "
            f"'{WRAPPER_STATE_KEY}' entry): it was saved when the base optimizer had taken "
            f"{saved:g} steps, and this state dict's base optimizer has taken {current:g}: an "
            "optimizer without tram (which keeps the entry in its param groups) stepped and "
            "saved it again, or the state dict was kept in memory without a copy while the "
            "optimizer stepped (state_dict() holds the live state tensors; copy.deepcopy it). "
            "Its step counter and TRAM's target state (θt−1, the EMA) are of that earlier "
            "step; they keep their current values instead, as for a state dict without the "
            "entry, so the resume is not exact",
            UserWarning,
            stacklevel=3,
        )
        return None

    def _load_wrapper_state(self, wrapper_state: dict[str, Any] | None) -> None:
        """Load tram's own entry of a state dict; its checks come before any change."""
        if wrapper_state is None:
            warnings.warn(
                f"{type(self).__name__}.load_state_dict() got a state dict without tram's own "
                f"state (the '{WRAPPER_STATE_KEY}' entry of its first param group): one saved "
                "from the base optimizer, or through torch.distributed.checkpoint with "
                "StateDictOptions(flatten_optimizer_state_dict=True), which keeps only the keys "
                "the live param groups have. The base optimizer's state is loaded; the step "
                "counter (ascent_every, radius_every), TRAM's target state (reference weights, "
                "noise stream) and the skip counters keep their current values, so a resume "
                "is not exact. Save and load optimizer.state_dict() itself, or "
                "get_optimizer_state_dict without flattening",
                UserWarning,
                stacklevel=2,
            )
        else:
            steps = int(wrapper_state.get("steps", 0))
            skipped_ascents = int(wrapper_state.get("skipped_ascents", 0))
            skipped_steps = int(wrapper_state.get("skipped_steps", 0))
            self._load_extra_state(wrapper_state)  # its checks come before its changes
            self.steps = steps
            self.skipped_ascents = skipped_ascents
            self.skipped_steps = skipped_steps

    def _warn_replaced_hyperparameters(self, before: list[dict[str, Any]]) -> None:
        """Say which of this optimizer's method hyperparameters a loaded state dict replaced.

        torch's ``load_state_dict`` restores every hyperparameter of the saved param groups, so
        a run resumed with another ``rho`` (or ``eta``, ...) trains with the saved one; that is
        torch's contract, kept, but not silently."""
        replaced = [
            f"{key}={old!r} -> {group[key]!r} (param group {index})"
            for index, (group, values) in enumerate(zip(self.param_groups, before, strict=False))
            for key, old in values.items()
            if key in group and group[key] != old
        ]
        if replaced:
            warnings.warn(
                f"{type(self).__name__}.load_state_dict() replaced this optimizer's "
                f"{', '.join(replaced)} with the checkpoint's, as torch's load_state_dict "
                "restores every hyperparameter of the saved param groups. To train with other "
                "values, set optimizer.param_groups[i][key] after loading",
                UserWarning,
                stacklevel=3,
            )

    def __getstate__(self) -> dict[str, Any]:
        # Methods replaced on the instance (an LR scheduler's wrapper of ``step``, a closure
        # over this optimizer) would step the original from a copy, and do not pickle:
        # torch's ``Optimizer.__getstate__`` leaves them out too.
        state = {
            name: value
            for name, value in self.__dict__.items()
            if not inspect.isroutine(inspect.getattr_static(type(self), name, None))
        }
        # Backups and perturbed buckets are scratch space tied to live parameters; never
        # pickle them.
        state["_backups"] = {}
        state.pop("_outside_the_model", None)  # ids of this process's tensors
        state.pop("_batchnorms_compiled_in_place", None)  # and weak references
        state["_step_state"] = self._step_state.for_copy()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._relink()
        self._follow_the_base_optimizers_loads()

    def __repr__(self) -> str:
        group = self.param_groups[0] if self.param_groups else {}
        options = ", ".join(
            f"{key}={group.get(key, value)}" for key, value in self._method_defaults.items()
        )
        return f"{type(self).__name__}({options}, base_optimizer={self.base_optimizer!r})"


def _same_graph(second: Any, first: Any) -> bool:
    """Whether a closure's two losses are one autograd graph: the closure backpropagated a
    loss computed before it (``loss.backward(retain_graph=True)`` on an outer forward). Where
    the perturbed weights are saved for the backward, autograd refuses that itself (they were
    modified in place); where they are not (a linear model, a head on frozen features), the
    second backward silently returns the first pass's gradient."""
    if not isinstance(second, Tensor) or not isinstance(first, Tensor):
        return False
    return first.grad_fn is not None and second.grad_fn is first.grad_fn


def _hooks(optimizer: Optimizer, registry: str) -> list[Callable[..., Any]]:
    """The hooks registered on ``optimizer`` in one of ``Optimizer``'s state-dict registries
    (absent from an optimizer unpickled from an older torch, as ``Optimizer.__setstate__``
    allows)."""
    return list(getattr(optimizer, registry, {}).values())


def _any_outside(params: list[Tensor], model: nn.Module) -> bool:
    """Whether some of ``params`` are not parameters of ``model``."""
    inside = {id(param) for param in model.parameters()}
    return any(id(param) not in inside for param in params)


def _base_step_count(state: Any) -> float | None:
    """The largest ``step`` in a base optimizer's per-parameter state (Adam, AdamW, Adagrad,
    RMSprop, ... keep one; SGD keeps none: None), read from the local shard of a ``DTensor``."""
    if not isinstance(state, dict):
        return None
    steps = []
    for entry in state.values():
        step = entry.get("step") if isinstance(entry, dict) else None
        if isinstance(step, Tensor):
            local = step.to_local() if is_dtensor(step) else step  # type: ignore[attr-defined]
            if local.numel() == 1:
                steps.append(float(local))
        elif isinstance(step, (int, float)):
            steps.append(float(step))
    return max(steps) if steps else None


def _split_wrapper_state(
    state_dict: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``state_dict`` without the wrapper's entry, and that entry (``None`` when absent).

    The entry is in a param group (where :meth:`TwoPassOptimizer.state_dict` puts it, in the
    first; ``set_optimizer_state_dict`` may hand the groups back in the live order) or, in
    checkpoints of earlier versions, beside ``state`` and ``param_groups``. It is taken out of
    every group, so that the base optimizer's ``load_state_dict`` never copies it into the live
    param groups."""
    state_dict = dict(state_dict)
    if isinstance(state_dict.get("state"), dict):
        # ZeroRedundancyOptimizer's load writes None into the entries of the parameters that
        # other ranks own: the caller's checkpoint stays whole.
        state_dict["state"] = dict(state_dict["state"])
    found = []
    if WRAPPER_STATE_KEY in state_dict:
        found.append(state_dict.pop(WRAPPER_STATE_KEY))
    groups = state_dict.get("param_groups")
    if isinstance(groups, list):
        stripped = []
        for group in groups:
            if isinstance(group, dict) and WRAPPER_STATE_KEY in group:
                group = dict(group)
                found.append(group.pop(WRAPPER_STATE_KEY))
            stripped.append(group)
        state_dict["param_groups"] = stripped
    if len(found) > 1:
        raise ValueError(
            f"Invalid state_dict: it holds tram's own state ('{WRAPPER_STATE_KEY}') {len(found)} "
            "times (beside 'param_groups' or in several groups); expected it once, in the first "
            "param group, as optimizer.state_dict() saves it"
        )
    return state_dict, (found[0] if found else None)
