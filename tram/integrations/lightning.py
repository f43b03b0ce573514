"""PyTorch Lightning: the exact two-pass step of a tram optimizer, as one callback.

A ``LightningModule`` that returns a tram optimizer from ``configure_optimizers`` trains with the
exact two-pass step once :class:`TramCallback` is added to the ``Trainer``::

    from tram.integrations.lightning import TramCallback

    trainer = lightning.pytorch.Trainer(..., callbacks=[TramCallback()])

Nothing else changes: ``training_step`` returns the loss as usual, and
``accumulate_grad_batches``, ``precision="16-mixed"`` / ``"bf16-mixed"``, ``gradient_clip_val``,
checkpoints and ``self.log`` keep working. What the callback does, and why:

- **One ascent per optimizer step, from the accumulated gradient.** Lightning runs the closure
  (``training_step``, ``zero_grad`` on the first micro-batch, backward) for every micro-batch of
  the accumulation window, then calls the module's ``optimizer_step`` hook on the last one. The
  callback keeps the window's batches (``on_train_batch_start``) and intercepts that hook: it runs
  the last micro-batch's closure (pass 1 complete), takes the ascent with ``first_step()`` from
  the accumulated gradient, replays *every* micro-batch of the window at θ+ε through the strategy's
  ``training_step`` and ``backward`` (so the loss is normalised by ``accumulate_grad_batches``
  exactly as in pass 1, the forward runs under the precision plugin's autocast, DDP synchronises
  on the last replay only), and restores θ. The module's own ``optimizer_step`` (the default one,
  or the user's override) then finishes the step: gradient clipping and
  ``on_before_optimizer_step`` see the descent gradient at θ, and the precision plugin steps the
  base optimizer (through the ``GradScaler`` under ``"16-mixed"``). The result equals
  :func:`tram.accumulating_closure` with ``step(closure)``; it costs two forward and backward
  passes per micro-batch. Without the callback, Lightning would replay only the last
  micro-batch at θ+ε (the update would be that micro-batch's gradient divided by the window
  size): the wrapper refuses such a step (``tram._callers.check_step_closure``), and under
  ``"16-mixed"``, where Lightning calls ``step()`` without a closure, it raises
  ``tram.MissingAscentError``.
- **Mixed precision.** Under ``"16-mixed"`` the ascent is taken from the scaled gradient with
  ``grad_scale=scaler.get_scale()``; the weights are restored before ``scaler.step``, which skips
  the step on overflow (either pass) and backs off the scale. ``"bf16-mixed"`` needs nothing.
- **Logging.** The training step of the replay runs with ``self.log`` and ``self.log_dict``
  muted, so the progress bar, the loggers and ``on_train_batch_end``'s ``outputs`` show the
  first-pass loss at θ, comparable with a plain optimizer's curve. The callback logs
  ``tram/ascent_grad_norm`` (‖T∇L‖ at θ), ``tram/radius`` (the method's ``last_radius``, TRAM's d)
  on every optimizer step that ascended, and ``tram/skipped_ascents`` / ``tram/skipped_steps``.
  They are logged without ``sync_dist``, so the loggers get rank 0's values: under
  ``local_ascent=True`` rank 0's own d and norm. A reduction over the ranks would need every rank
  to log the same keys at every step, which a rank whose ascent alone was skipped does not.
  The ``torchmetrics`` metrics of the module keep the state the first pass left (each
  metric's state is put back after the replay), so a metric updated in ``training_step`` counts
  each batch once, at θ. Other side effects of ``training_step`` run in both passes; guard them
  with :attr:`TramCallback.in_second_pass`.
- **TRAM.** Pass 1 of every micro-batch runs inside ``optimizer.first_pass()``, which records the
  forward of the model TRAM was given (pass the network whose forward returns the logits, e.g.
  ``self.model``, not the ``LightningModule`` itself, unless its ``forward`` is what
  ``training_step`` calls).
- **Checkpoints.** Lightning saves ``optimizer.state_dict()``, which holds the wrapper's own state
  (TRAM's reference, step counters); resuming from a checkpoint taken at an optimizer-step boundary
  reproduces the uninterrupted run bit for bit.
- **torch.compile.** A network compiled inside the module (``self.net = torch.compile(net)`` or
  ``self.net.compile()``) and Lightning's ``trainer.fit(torch.compile(module))`` (which compiles
  the module's ``forward`` and ``training_step``; ``self.log`` inside a compiled
  ``training_step`` stops dynamo with any optimizer) take the eager model's steps, both passes
  and the replay included (``tests/test_lightning.py``, the ``compiled`` tests). TRAM-Fisher on
  a ``torch.compile(net)`` wrapper needs the net's training graph traced in its noised first
  pass, as Lightning's first forward does; a graph traced before ``fit`` is refused at the
  ascent (compile in place instead).

Manual optimization (``self.automatic_optimization = False``) takes the step in
``training_step`` with :func:`manual_step`, which runs both passes through
``self.manual_backward`` and steps through the ``LightningOptimizer``::

    def training_step(self, batch, batch_idx):
        return manual_step(self, lambda: self.loss(batch))

DeepSpeed (whose engine accumulates gradients itself) is refused.

Lightning's other ways of running ``training_step``, as the callback meets them:

- a window whose every ``training_step`` returned None (Lightning's way to skip a batch) has no
  gradient: no ascent and no step, as a plain optimizer moves nothing; a window with some
  batches skipped is the two-pass step of the others;
- ``training_step(self, batch)`` without ``batch_idx`` is replayed as Lightning calls it;
- ``StochasticWeightAveraging``'s BatchNorm epoch (a model with BatchNorm) runs ``training_step``
  for the running statistics of the averaged weights only: the callback takes no step there, as
  SWA intends (a plain optimizer steps on the last real step's gradient, moving the weights off
  the average);
- ``Tuner.lr_find`` trains with the Trainer's callbacks swapped for its own: its steps are the
  wrapper's own ``step(closure)`` under Lightning's closure (exact with one batch per step).

What of Lightning this relies on beyond its documented API, each checked by
``tests/test_lightning.py``: the ``optimizer_step`` hook is looked up on the module instance when
Lightning calls it (an instance attribute overrides it; every callback test fails otherwise); the
``"16-mixed"`` plugin's ``optimizer_step`` skips the step when the closure returns None
(``test_fp16_mixed_equals_scaled_step``); ``tram._callers`` recognises the automatic
optimization's closure as ``functools.partial(Precision._wrap_closure, module, optimizer,
closure)`` and reads the module's ``_trainer`` (``test_lightning_closure_is_recognised``);
SWA's BatchNorm epoch is told by ``trainer.fit_loop._skip_backward``
(``test_stochastic_weight_averagings_batchnorm_epoch_takes_no_step``).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from tram._versions import require
from tram._wrapper import TwoPassOptimizer

try:  # Lightning 2.x ships as `lightning` (lightning.pytorch) and as `pytorch_lightning`.
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
except ImportError:  # pragma: no cover - depends on what is installed
    import pytorch_lightning as pl  # type: ignore[no-redef]
    from pytorch_lightning.utilities.signature_utils import is_param_in_hook_signature

__all__ = ["TramCallback", "manual_step", "two_pass_optimizer"]

require("lightning", pl.__version__, needed_by=__name__)

_PREFIX = "tram/"


def two_pass_optimizer(optimizer: Any) -> TwoPassOptimizer | None:
    """The tram wrapper inside a ``LightningOptimizer`` (or the optimizer itself), else None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, TwoPassOptimizer) else None


def _grad_scale(trainer: Any) -> float | None:
    """The loss scale of the precision plugin's ``GradScaler`` ("16-mixed"), or None."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return float(scaler.get_scale())


def _loss_of(output: Any) -> Tensor | None:
    """The loss in a ``training_step`` output, as Lightning's automatic optimization reads it."""
    if isinstance(output, Mapping):
        loss = output.get("loss")
        return loss if isinstance(loss, Tensor) else None
    return output if isinstance(output, Tensor) else None


def _skipping_backward(trainer: Any) -> bool:
    """Whether the fit loop runs ``training_step`` with no backward: ``StochasticWeightAveraging``'s
    last epoch, which only recomputes the BatchNorm statistics of the averaged weights and, in its
    own words, needs neither a backward nor an optimizer step (Lightning's private
    ``fit_loop._skip_backward``)."""
    return bool(getattr(trainer.fit_loop, "_skip_backward", False))


def _training_step_arguments(pl_module: Any, batch: Any, batch_idx: int) -> tuple[Any, ...]:
    """The arguments Lightning's loop gives ``training_step``: ``batch_idx`` only when the
    signature takes it (``training_step(self, batch)`` is allowed)."""
    if is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2):
        return batch, batch_idx
    return (batch,)


def _no_sync(strategy: Any) -> contextlib.AbstractContextManager[Any]:
    """The strategy's context that suspends gradient synchronisation (DDP), else a no-op."""
    block = getattr(strategy, "block_backward_sync", None)
    return block() if callable(block) else contextlib.nullcontext()


@contextlib.contextmanager
def _muted_logging(module: Any) -> Iterator[None]:
    """``module.log`` and ``module.log_dict`` do nothing inside the block (instance attributes
    shadow the methods and are removed afterwards)."""

    def ignore(*args: Any, **kwargs: Any) -> None:
        return None

    shadowed = [name for name in ("log", "log_dict") if name not in vars(module)]
    for name in shadowed:
        setattr(module, name, ignore)
    try:
        yield
    finally:
        for name in shadowed:
            vars(module).pop(name, None)


@contextlib.contextmanager
def _metric_states_kept(module: Any) -> Iterator[None]:
    """Every ``torchmetrics`` metric inside ``module`` leaves the block with the state it entered
    with: a metric updated in ``training_step`` (``self.train_accuracy(logits, labels)``) would
    otherwise count each batch twice per step, the second time with the outputs at θ+ε.

    A metric's state is its ``add_state`` variables (tensors, cloned; list states, copied) and
    its update count and cached results; ``Metric.reset`` restores the same attributes."""
    metric_class = getattr(sys.modules.get("torchmetrics"), "Metric", None)
    if metric_class is None:  # not imported: no metric can exist
        yield
        return
    saved = [
        (metric, _metric_state(metric))
        for metric in module.modules()
        if isinstance(metric, metric_class)
    ]
    try:
        yield
    finally:
        for metric, state in saved:
            for name, value in state.items():
                setattr(metric, name, value)


def _metric_state(metric: Any) -> dict[str, Any]:
    state: dict[str, Any] = {
        name: value.clone() if isinstance(value, Tensor) else list(value)
        for name, value in metric.metric_state.items()
    }
    for name in ("_update_count", "_computed", "_forward_cache"):
        state[name] = getattr(metric, name)
    return state


def _log_metrics(module: Any, metrics: Mapping[str, float], *, prog_bar: bool) -> None:
    for key, value in metrics.items():
        module.log(key, value, on_step=True, on_epoch=False, prog_bar=prog_bar, logger=True)


def _ascent_metrics(optimizer: TwoPassOptimizer, perturbed: bool) -> dict[str, float]:
    metrics: dict[str, float] = {
        _PREFIX + "skipped_ascents": float(optimizer.skipped_ascents),
        _PREFIX + "skipped_steps": float(optimizer.skipped_steps),
    }
    if perturbed:
        norm = optimizer.last_ascent_norm
        if norm is not None and math.isfinite(norm):
            metrics[_PREFIX + "ascent_grad_norm"] = float(norm)
        radius = getattr(optimizer, "last_radius", None)
        if radius is not None:
            metrics[_PREFIX + "radius"] = float(radius)
    return metrics


class TramCallback(pl.Callback):
    """Runs a tram optimizer's exact two-pass step under Lightning's automatic optimization.

    Add it to the ``Trainer``'s callbacks; see the module docstring for what it does.

    Args:
        log_metrics: log ``tram/ascent_grad_norm``, ``tram/radius``, ``tram/skipped_ascents`` and
            ``tram/skipped_steps`` on every optimizer step (through ``LightningModule.log``).
        prog_bar: also show them in the progress bar.

    Attributes:
        in_second_pass: True while the callback replays the window at θ+ε (``training_step`` runs
            again then; its ``self.log`` calls are muted).
    """

    def __init__(self, *, log_metrics: bool = True, prog_bar: bool = False) -> None:
        super().__init__()
        self.log_metrics = bool(log_metrics)
        self.prog_bar = bool(prog_bar)
        self.in_second_pass = False
        self._window: list[tuple[Any, int]] = []
        self._first_pass = contextlib.ExitStack()
        self._pending_metrics: dict[str, float] | None = None
        self._installed: Any = None
        self._original_optimizer_step: Any = None

    # ------------------------------------------------------------------ install
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit" or not pl_module.automatic_optimization:
            return
        if trainer.strategy.handles_gradient_accumulation:
            raise ValueError(
                f"TramCallback does not support {type(trainer.strategy).__name__}: it "
                "accumulates gradients inside its engine, where the two-pass step cannot replay "
                "the micro-batches"
            )
        if "optimizer_step" in vars(pl_module):
            raise RuntimeError(
                "TramCallback found optimizer_step already set on this LightningModule instance; "
                "add TramCallback once, and override optimizer_step in the class instead"
            )
        original = pl_module.optimizer_step

        def optimizer_step(
            epoch: int,
            batch_idx: int,
            optimizer: Any,
            optimizer_closure: Callable[[], Any] | None = None,
        ) -> Any:
            return self._optimizer_step(
                trainer, pl_module, original, epoch, batch_idx, optimizer, optimizer_closure
            )

        # The LightningModule's optimizer_step hook is where Lightning lets a module take over
        # the step; an instance attribute composes with a class-level override (called last).
        pl_module.optimizer_step = optimizer_step
        self._installed = pl_module
        self._original_optimizer_step = original

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._close_first_pass()
        self._window = []
        if self._installed is not None:
            vars(self._installed).pop("optimizer_step", None)
            self._installed = None
            self._original_optimizer_step = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close_first_pass()
        self._window = []
        for optimizer in trainer.optimizers:
            wrapper = two_pass_optimizer(optimizer)
            if wrapper is not None:
                wrapper.restore()

    # ------------------------------------------------------------------ pass 1
    def _wrapper(self, trainer: Any) -> TwoPassOptimizer | None:
        optimizers = trainer.optimizers
        return two_pass_optimizer(optimizers[0]) if len(optimizers) == 1 else None

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._installed is None:
            return
        wrapper = self._wrapper(trainer)
        if wrapper is None or _skipping_backward(trainer):
            return
        self._window.append((batch, batch_idx))
        self._close_first_pass()
        no_sync = _no_sync(trainer.strategy) if wrapper.local_ascent else contextlib.nullcontext()
        self._first_pass.enter_context(wrapper.first_pass(no_sync=no_sync))

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # A micro-batch that only accumulated: its first pass is over.
        self._close_first_pass()
        metrics, self._pending_metrics = self._pending_metrics, None
        if metrics and self.log_metrics:
            _log_metrics(pl_module, metrics, prog_bar=self.prog_bar)

    def _close_first_pass(self) -> None:
        stack, self._first_pass = self._first_pass, contextlib.ExitStack()
        stack.close()

    # ------------------------------------------------------------------ the step
    def _optimizer_step(
        self,
        trainer: Any,
        pl_module: Any,
        original: Callable[..., Any],
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        closure: Callable[[], Any] | None,
    ) -> Any:
        wrapper = two_pass_optimizer(optimizer)
        window, self._window = self._window, []
        if wrapper is None or closure is None or self not in trainer.callbacks:
            # Not this callback's step: another optimizer, or a Trainer whose callbacks were
            # swapped out (Tuner.lr_find runs its steps with its own): the wrapper's own rules
            # for a Lightning closure apply.
            self._close_first_pass()
            return original(epoch, batch_idx, optimizer, closure)
        if _skipping_backward(trainer):
            # StochasticWeightAveraging's BatchNorm epoch: its training_step runs for the
            # running statistics, and no step is taken (a plain optimizer would step on the
            # last real step's gradient here, moving the weights off the average).
            return closure()
        if not window or window[-1][1] != batch_idx:
            raise RuntimeError(
                "TramCallback did not see this batch in on_train_batch_start; a "
                "LightningModule.on_train_batch_start that returns -1 skips the rest of the "
                "epoch, but the optimizer step of this batch still ran"
            )
        try:
            loss = closure()  # pass 1 of the last micro-batch: the window's gradient is complete
        finally:
            self._close_first_pass()
        if all(param.grad is None for param in wrapper._params()):
            # Every training_step of the window returned None (Lightning's way to skip a
            # batch): no gradient, so no ascent and no step, as a plain optimizer moves nothing.
            wrapper.zero_grad()  # forgets the recorded first passes
            return loss
        perturbed = wrapper.first_step(grad_scale=_grad_scale(trainer))
        if perturbed:
            try:
                with wrapper.second_pass():
                    self._replay(trainer, pl_module, optimizer, window)
            finally:
                # Before the base step: clipping and on_before_optimizer_step see θ, and a
                # GradScaler that skips step() on overflow leaves the weights at θ.
                wrapper.restore()
        if self.log_metrics:
            self._pending_metrics = _ascent_metrics(wrapper, perturbed)
        scaled = _grad_scale(trainer) is not None

        def finish() -> Any:
            # Runs inside the precision plugin: no pass, only its hooks and clipping. The wrapper
            # finishes an explicit step when the closure returns None; a GradScaler plugin skips
            # the step on None, so it gets the first-pass loss (it only tests for None).
            return loss if scaled else None

        return original(epoch, batch_idx, optimizer, finish)

    def _replay(
        self, trainer: Any, pl_module: Any, optimizer: Any, window: list[tuple[Any, int]]
    ) -> None:
        strategy = trainer.strategy
        normalize = trainer.accumulate_grad_batches
        last = len(window) - 1
        self.in_second_pass = True
        try:
            with _muted_logging(pl_module), _metric_states_kept(pl_module), torch.enable_grad():
                for index, (batch, index_in_epoch) in enumerate(window):
                    sync = contextlib.nullcontext() if index == last else _no_sync(strategy)
                    with sync:
                        arguments = _training_step_arguments(pl_module, batch, index_in_epoch)
                        loss = _loss_of(strategy.training_step(*arguments))
                        if loss is not None:
                            strategy.backward(loss / normalize, optimizer)
        finally:
            self.in_second_pass = False


def manual_step(
    pl_module: Any,
    loss_fn: Callable[[], Tensor],
    *,
    optimizer: Any = None,
    log_metrics: bool = True,
    prog_bar: bool = False,
) -> Tensor:
    """One two-pass step in a ``LightningModule`` with manual optimization.

    Call it from ``training_step``::

        def training_step(self, batch, batch_idx):
            return manual_step(self, lambda: self.loss(batch))

    It zeroes the gradients, runs ``loss_fn()`` and ``self.manual_backward`` at θ inside the
    optimizer's ``first_pass()``, ascends (from the scaled gradient under ``"16-mixed"``), runs
    them again at θ+ε, restores θ, and steps through the ``LightningOptimizer`` (so the precision
    plugin's ``GradScaler``, ``on_before_optimizer_step`` and Lightning's step counting apply).
    The second call of ``loss_fn`` logs nothing (``self.log`` muted) and leaves the module's
    ``torchmetrics`` metrics as the first call left them: what ``loss_fn`` logs and measures is
    the model at θ, once per step.
    Without clipping: clip in ``on_before_optimizer_step`` (Lightning's manual-optimization
    recipe), which sees the unscaled descent gradient.

    Args:
        pl_module: the ``LightningModule`` (``self``).
        loss_fn: runs the forward and returns the loss; no backward.
        optimizer: the ``LightningOptimizer`` to step; by default ``pl_module.optimizers()``,
            which must be a single optimizer.
        log_metrics: log ``tram/ascent_grad_norm`` and ``tram/radius`` (on step).
        prog_bar: show them in the progress bar.

    Returns:
        The loss at θ, detached.
    """
    if optimizer is None:
        optimizer = pl_module.optimizers()
        if isinstance(optimizer, (list, tuple)):
            raise ValueError(
                f"the LightningModule has {len(optimizer)} optimizers; pass optimizer= to "
                "manual_step"
            )
    wrapper = two_pass_optimizer(optimizer)
    if wrapper is None:
        raise TypeError(
            "manual_step needs a tram optimizer (tram.SAM, tram.TRAM, ...), but got "
            f"{type(getattr(optimizer, 'optimizer', optimizer)).__name__}"
        )
    trainer = pl_module.trainer
    optimizer.zero_grad()
    no_sync = _no_sync(trainer.strategy) if wrapper.local_ascent else contextlib.nullcontext()
    with wrapper.first_pass(no_sync=no_sync):
        loss = loss_fn()
        pl_module.manual_backward(loss)
    perturbed = wrapper.first_step(grad_scale=_grad_scale(trainer))
    if perturbed:
        try:
            with wrapper.second_pass(), _muted_logging(pl_module), _metric_states_kept(pl_module):
                pl_module.manual_backward(loss_fn())
        finally:
            wrapper.restore()
    optimizer.step()
    if log_metrics:
        metrics = _ascent_metrics(wrapper, perturbed)
        _log_metrics(pl_module, metrics, prog_bar=prog_bar)
    return loss.detach()
