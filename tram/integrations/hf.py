"""``TramTrainer``: the Hugging Face ``Trainer`` with tram optimizers and regularizers.

Switching an existing Trainer script takes two lines, the import and the class::

    from tram.integrations.hf import TramTrainer

    trainer = TramTrainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=dev,
        method="tram", method_kwargs={"trust_region": "noise", "sigma": 0.01},
    )
    trainer.train()

What it does, and why:

- **Optimizer.** The base optimizer is the one the Trainer configures (``TrainingArguments.optim``,
  learning rate, the decay/no-decay parameter groups, ``optimizer_cls_and_kwargs``, or a plain
  optimizer passed in ``optimizers=``); :meth:`TramTrainer.create_optimizer` wraps that instance
  with :func:`tram.factory.wrap_optimizer`. The wrapper shares the base optimizer's param groups,
  so the Trainer's scheduler drives the base learning rate, and its ``state_dict`` (base state
  plus the method's own, e.g. TRAM's reference) goes into every checkpoint. A ready tram wrapper
  passed in ``optimizers=`` is used as it is.
- **Exact gradient accumulation.** Pass 1 runs on every micro-batch of the optimizer step as the
  Trainer runs it (gradients accumulate, ``no_sync`` on all but the last). On the micro-batch that
  closes the window, one ascent is taken from the accumulated gradient, every micro-batch of the
  window is replayed at θ+ε through the same ``Trainer.training_step`` (so both passes are
  normalised identically, whatever the Trainer's loss scaling for accumulation is), ``no_sync``
  on all but the last replay, and the weights are restored. The Trainer then clips the
  second-pass gradient, steps the base optimizer and the scheduler. The result equals a
  hand-written two-pass loop bit for bit; it costs 2 forward and backward passes per micro-batch.
  No user overrides ``training_step``.
- **Distributed.** Under DDP the ascent is synchronised (the global gradient) by default; with
  ``method_kwargs={"local_ascent": True}`` the first pass runs under ``no_sync`` and each worker
  ascends along its own gradient (m-sharpness, one all-reduce per step). Replicas stay identical
  in both modes. FSDP2 supports the synchronised ascent only (accelerate 1.15 enables FSDP on
  accelerators only; on CPU the Trainer runs DDP). DeepSpeed is not supported. On a CPU-only
  machine pass ``use_cpu=True`` to ``TrainingArguments``, or ``torchrun`` processes run alone.
- **Mixed precision.** bf16 needs nothing. Under fp16 with a ``GradScaler`` the ascent is taken
  from the scaled gradients (``grad_scale=scaler.get_scale()``); the weights are restored before
  the scaler can skip the step; a non-finite first pass skips the ascent, leaves the gradient as
  it is, and the scaler skips the step and backs off.
- **Regularizers** (``tram.regularizers``: R3F, R4F, TRPO, MESA, or any callable with the same
  protocol) are added to the training loss of both passes: ``penalty = regularizer(model, inputs,
  logits)`` with the unwrapped model, the batch mapping and the logits of the model's forward.
  They do not enter the evaluation loss. ``after_step(model)`` is called after every optimizer
  step that was taken, and their ``state_dict()`` is saved in each checkpoint
  (``tram_regularizers.pt``) and restored on resume. The penalty is added to the loss the model
  returns before the Trainer's accumulation scaling; models that normalise their loss by
  ``num_items_in_batch`` (causal LMs) therefore weight a penalty ``gradient_accumulation_steps``
  times more than at ``gradient_accumulation_steps=1``.
- **Logging**, at ``logging_steps``, to every logger of the Trainer (TensorBoard included), next
  to the Trainer's ``loss`` and ``grad_norm`` (the clipped, second-pass gradient):
  ``tram/radius`` (the method's ``last_radius``, TRAM's d), ``tram/ascent_grad_norm`` (‖T∇L‖ at
  θ), ``tram/skipped_ascents`` and ``tram/skipped_steps`` (cumulative: ascents skipped for a
  non-finite gradient norm or radius, base steps skipped for a non-finite first-pass gradient
  without a GradScaler), and with regularizers ``tram/task_loss`` and
  ``tram/<regularizer name>``; means over the optimizer steps since the last log and over the
  workers.
- **Side effects.** ``compute_loss`` runs in both passes. What the Trainer itself counts (the
  loss it logs, tokens seen, FLOPs) is the first pass's; a ``compute_loss`` override that
  measures or logs on its own should do it while ``self.two_pass_optimizer.is_perturbed`` is
  False (the first pass, at θ).
- **Bad input** fails in the constructor, before any training: an unknown method, an argument the
  method does not take, a regularizer that is not callable; a regularizer on a model whose
  output has no logits fails on the first training forward, before any backward pass, any
  regularizer call and any optimizer step.

How it meets the Trainer: it overrides the Trainer's documented extension points only,
``create_optimizer``, ``training_step``, ``compute_loss``, ``log`` (to add the tram metrics to
the training logs, which every logger then receives) and ``train`` (to note the checkpoint it
resumes from), and adds one ``TrainerCallback`` for the rest: ``on_train_begin`` starts a fresh
step state and loads the regularizers' state of the resumed checkpoint, ``on_pre_optimizer_step``
and ``on_optimizer_step`` see whether the wrapper took the base step and call ``after_step``,
``on_save`` writes the regularizers' state into the checkpoint folder the Trainer just wrote
(``<output_dir>/checkpoint-<step>``; under a hyperparameter search, whose checkpoints go
elsewhere, it raises rather than lose that state).
The micro-batches of an optimizer step are the ones ``training_step`` received since the last
synchronising one.

The private API it still uses, because no public extension point does the job, checked by
``tests/test_hf_private_api.py`` (name, and the behaviour relied on), so that an accelerate
release that changes it fails the test suite instead of training differently:

- ``AcceleratedOptimizer._is_overflow``: the Trainer steps the scheduler unless
  ``accelerator.optimizer_step_was_skipped``, which reads this flag through the public
  ``step_was_skipped``; accelerate sets it only for a GradScaler's skip. When the wrapper skipped
  the base step (a non-finite first-pass gradient without a GradScaler) the callback sets it, as
  a GradScaler's skip does, so that a skipped step moves neither the weights nor the schedule.
  No public setter exists; undoing a scheduler step from a callback would have to rewrite every
  param group's learning rate by hand. Should the flag be missing, the scheduler steps and a
  ``RuntimeWarning`` says so.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from tram._versions import require_installed
from tram._wrapper import TwoPassOptimizer
from tram.factory import check_method_args, wrap_optimizer
from tram.integrations.accelerate import grad_scale_of, unwrap_optimizer
from tram.targets import extract_logits

__all__ = ["REGULARIZERS_NAME", "MissingLogitsError", "TramTrainer", "find_logits"]

require_installed("transformers", needed_by=__name__)
require_installed("accelerate", needed_by=__name__)

logger = logging.getLogger(__name__)

REGULARIZERS_NAME = "tram_regularizers.pt"
"""File name of the regularizers' state inside a Trainer checkpoint directory."""

_PREFIX = "tram/"


class MissingLogitsError(ValueError):
    """The model's output has no logits, but a regularizer needs them."""


def find_logits(outputs: Any) -> Tensor:
    """The logits in a model's output, found by :func:`tram.targets.extract_logits` (the output
    tensor itself, ``outputs.logits`` or ``outputs["logits"]``), with the Trainer's error.

    Raises:
        MissingLogitsError: none of these exists (e.g. a base ``AutoModel`` returning hidden
            states, or a tuple output from ``return_dict=False``).
    """
    try:
        return extract_logits(outputs)
    except TypeError as error:
        if isinstance(outputs, Mapping):
            keys = ", ".join(str(key) for key in outputs)
            found = f"an output with the keys ({keys})"
        else:
            found = f"a {type(outputs).__name__}"
        raise MissingLogitsError(
            f"a regularizer needs the model's logits, but the model returned {found} and no "
            "'logits'; use a model with a task head (e.g. AutoModelForSequenceClassification) "
            "that returns a ModelOutput with logits (return_dict=True)"
        ) from error


@contextlib.contextmanager
def _logits_required(model: nn.Module) -> Iterator[None]:
    """Inside the block, a forward of ``model`` whose output has no logits raises
    :class:`MissingLogitsError` from the forward itself, before the Trainer's loss handling
    reads the output (and raises about a missing loss instead)."""

    def check(module: nn.Module, args: Any, output: Any) -> None:
        find_logits(output)

    handle = model.register_forward_hook(check)
    try:
        yield
    finally:
        handle.remove()


def _checked_method_kwargs(
    method: str | type[TwoPassOptimizer] | None,
    method_kwargs: Mapping[str, Any] | None,
    trainer_kwargs: Mapping[str, Any],
) -> dict[str, Any]:
    """``method_kwargs`` as a dict, after the checks that need no model."""
    if method is None and method_kwargs:
        raise ValueError("method_kwargs given without a method; pass method='sam' or another")
    method_kwargs = dict(method_kwargs or {})
    if method is None:
        return method_kwargs
    check_method_args(method, method_kwargs, validate_values=True)
    optimizers = trainer_kwargs.get("optimizers")
    given = optimizers[0] if isinstance(optimizers, (tuple, list)) else None
    if unwrap_optimizer(given) is not None:
        raise ValueError("optimizers= already holds a tram optimizer; do not pass method= as well")
    return method_kwargs


def _checked_regularizers(regularizers: Sequence[Any] | None) -> list[Any]:
    regularizers = list(regularizers or ())
    for regularizer in regularizers:
        if not callable(regularizer):
            raise TypeError(
                "a regularizer must be callable as regularizer(model, inputs, logits), but "
                f"got {type(regularizer).__name__}"
            )
    return regularizers


def _regularizer_names(regularizers: Sequence[Any]) -> list[str]:
    names: list[str] = []
    for regularizer in regularizers:
        name = getattr(regularizer, "name", None)
        if not isinstance(name, str) or not name:
            name = type(regularizer).__name__.lower()
        unique, index = name, 2
        while unique in names:
            unique, index = f"{name}_{index}", index + 1
        names.append(unique)
    return names


@dataclass
class _StepState:
    """Where :class:`TramTrainer` is inside one optimizer step, between the Trainer's calls."""

    window: list[Any] = field(default_factory=list)
    """The micro-batches ``training_step`` received in this optimizer step so far."""
    normalisations: list[tuple[Any, int]] = field(default_factory=list)
    """Each micro-batch's ``num_items_in_batch`` and the Trainer's
    ``current_gradient_accumulation_steps`` when it ran, which its replay takes again: a
    micro-batch carried over from an epoch that ended without a step (an ``IterableDataset``)
    was normalised with its own window's."""
    phase: Literal["first", "replay"] | None = None
    """The pass ``compute_loss`` runs in; None outside ``training_step``."""
    observed: bool = False
    """Whether ``compute_loss`` ran the first pass inside ``optimizer.first_pass()``."""
    steps_before: int | None = None
    """``wrapper.steps`` before the Trainer's ``optimizer.step()`` (unchanged after: skipped)."""


class _Metrics:
    """The tram metrics between two training logs; each log takes means over the optimizer steps
    since the last one and over the workers."""

    def __init__(self) -> None:
        self._values: dict[str, list[Tensor | float]] = {}

    def record(self, key: str, value: Tensor | float) -> None:
        # Tensors stay on their device until the next log: no host sync per micro-batch.
        if isinstance(value, Tensor):
            value = value.detach().float().reshape(())
        self._values.setdefault(_PREFIX + key, []).append(value)

    def record_ascent(self, optimizer: TwoPassOptimizer, perturbed: bool) -> None:
        if not perturbed:
            return
        if optimizer.last_ascent_norm is not None:
            self.record("ascent_grad_norm", optimizer.last_ascent_norm)
        radius = getattr(optimizer, "last_radius", None)
        if radius is not None:
            self.record("radius", float(radius))

    @staticmethod
    def names(optimizer: TwoPassOptimizer | None, regularizer_names: Sequence[str]) -> list[str]:
        """The metrics this run logs (without the prefix)."""
        names: list[str] = []
        if optimizer is not None:
            names.append("ascent_grad_norm")
            if hasattr(optimizer, "last_radius"):
                names.append("radius")
        if regularizer_names:
            names.extend(["task_loss", *regularizer_names])
        return names

    def drain(
        self, names: Sequence[str], optimizer: TwoPassOptimizer | None, device: torch.device
    ) -> dict[str, float]:
        """The means of ``names`` (without the prefix) and the wrapper's cumulative skip
        counters (maxima over the workers); a collective under DDP."""
        keys = [_PREFIX + name for name in names]
        values, self._values = self._values, {}
        sums = [_total(values.get(key, [])) for key in keys]
        counts = [float(len(values.get(key, []))) for key in keys]
        counters = ("skipped_ascents", "skipped_steps") if optimizer is not None else ()
        packed = torch.tensor([*sums, *counts], dtype=torch.float64, device=device)
        top = torch.tensor(
            [float(getattr(optimizer, c, 0)) for c in counters], dtype=torch.float64, device=device
        )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
        sums, counts = packed[: len(keys)].tolist(), packed[len(keys) :].tolist()
        logs = {key: s / n for key, s, n in zip(keys, sums, counts, strict=True) if n > 0}
        logs.update(zip((_PREFIX + c for c in counters), top.tolist(), strict=True))
        return logs


def _total(values: Sequence[Tensor | float]) -> float:
    floats = [value for value in values if not isinstance(value, Tensor)]
    tensors = [value.cpu() for value in values if isinstance(value, Tensor)]
    total = math.fsum(float(value) for value in floats)
    if tensors:
        total += float(torch.stack(tensors).double().sum().item())
    return total


def _regularizer_states(names: Sequence[str], regularizers: Sequence[Any]) -> dict[str, Any]:
    states = {}
    for name, regularizer in zip(names, regularizers, strict=True):
        state_dict = getattr(regularizer, "state_dict", None)
        if callable(state_dict):
            states[name] = state_dict()
    return states


def _load_regularizer_states(
    checkpoint: str, names: Sequence[str], regularizers: Sequence[Any]
) -> None:
    path = os.path.join(checkpoint, REGULARIZERS_NAME)
    if not os.path.isfile(path):
        if _regularizer_states(names, regularizers):
            logger.warning(
                "TramTrainer: %s has no %s; the regularizers start from a fresh state",
                checkpoint,
                REGULARIZERS_NAME,
            )
        return
    states = torch.load(path, map_location="cpu", weights_only=True)
    for name, regularizer in zip(names, regularizers, strict=True):
        load_state_dict = getattr(regularizer, "load_state_dict", None)
        if name in states and callable(load_state_dict):
            load_state_dict(states[name])


class _TramCallback(TrainerCallback):
    """What :class:`TramTrainer` does around the Trainer's loop (see the module docstring)."""

    def __init__(self, trainer: TramTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        trainer._tram_step, trainer._tram_metrics = _StepState(), _Metrics()
        if trainer._tram_resumed_from is not None:
            _load_regularizer_states(
                trainer._tram_resumed_from, trainer.regularizer_names, trainer.regularizers
            )

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = self.trainer.two_pass_optimizer
        self.trainer._tram_step.steps_before = None if optimizer is None else optimizer.steps

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Tell the Trainer when the wrapper skipped the base step, so that it leaves the
        scheduler alone (see the module docstring); after a step taken, call each regularizer's
        ``after_step(model)``."""
        trainer = self.trainer
        accelerated = trainer.optimizer
        can_flag = getattr(accelerated, "scaler", None) is None and hasattr(
            accelerated, "_is_overflow"
        )
        if can_flag:
            accelerated._is_overflow = False  # type: ignore[union-attr]
        if trainer.accelerator.optimizer_step_was_skipped:
            return  # a GradScaler skipped the step
        optimizer = trainer.two_pass_optimizer
        if optimizer is not None and optimizer.steps == trainer._tram_step.steps_before:
            if can_flag:
                accelerated._is_overflow = True  # type: ignore[union-attr]
            else:
                warnings.warn(
                    "TramTrainer: the tram wrapper skipped a base step, but the Trainer's "
                    f"optimizer ({type(accelerated).__name__}) has no '_is_overflow' flag to "
                    "report it, so the scheduler stepped anyway; check the installed accelerate "
                    "against tests/test_hf_private_api.py",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        for regularizer in trainer.regularizers:
            after_step = getattr(regularizer, "after_step", None)
            if callable(after_step):
                after_step(model)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the regularizers' state into the checkpoint folder the Trainer just wrote
        (unless it saves the model only: such a checkpoint does not resume training)."""
        if not (args.should_save and not args.save_only_model):
            return
        states = _regularizer_states(self.trainer.regularizer_names, self.trainer.regularizers)
        if not states:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            raise RuntimeError(
                f"TramTrainer cannot save the regularizers' state: the checkpoint folder {folder} "
                "does not exist (a hyperparameter search writes its checkpoints elsewhere); "
                "train without stateful regularizers or without checkpoints there"
            )
        torch.save(states, os.path.join(folder, REGULARIZERS_NAME))


class TramTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with a tram method and/or regularizers.

    It takes every argument of ``Trainer`` plus the keyword-only arguments below; see the module
    docstring for what it does.

    Args:
        method: a tram method name (``tram.factory.list_methods()``: ``"sam"``, ``"asam"``,
            ``"fisher_sam"``, ``"tram"``, ...) or a ``TwoPassOptimizer`` subclass. None (the
            default) keeps the Trainer's optimizer as it is (regularizers only).
        method_kwargs: the method's arguments, e.g. ``{"rho": 0.05}``; also the common ones
            ``ascent_every`` and ``local_ascent`` (per-worker ascent under DDP). The model is
            passed by the Trainer (unwrapped) to methods that take one.
        regularizers: loss-side regularizers (``tram.regularizers``) added to the training
            loss.

    Raises:
        ValueError: unknown method; ``method_kwargs`` without ``method``; both ``method`` and a
            ready tram optimizer in ``optimizers=``; DeepSpeed; ``local_ascent`` under FSDP.
        TypeError: an argument the method does not take (named in the message); a regularizer
            that is not callable.
    """

    def __init__(
        self,
        *args: Any,
        method: str | type[TwoPassOptimizer] | None = None,
        method_kwargs: Mapping[str, Any] | None = None,
        regularizers: Sequence[Callable[..., Tensor]] | None = None,
        **kwargs: Any,
    ) -> None:
        self.tram_method = method
        self.tram_method_kwargs = _checked_method_kwargs(method, method_kwargs, kwargs)
        self.regularizers = _checked_regularizers(regularizers)
        self.regularizer_names = _regularizer_names(self.regularizers)
        self._tram_step = _StepState()
        self._tram_metrics = _Metrics()
        self._tram_resumed_from: str | None = None
        super().__init__(*args, **kwargs)
        if method is not None and self.is_deepspeed_enabled:
            raise ValueError("TramTrainer does not support DeepSpeed (its optimizer is its own)")
        self.add_callback(_TramCallback(self))

    # ------------------------------------------------------------------ optimizer
    @property
    def two_pass_optimizer(self) -> TwoPassOptimizer | None:
        """The tram wrapper inside ``self.optimizer`` (None before it is created, or without)."""
        return unwrap_optimizer(self.optimizer)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the Trainer's base optimizer, then wrap that instance in the tram method."""
        optimizer = super().create_optimizer(model)
        if self.tram_method is None or unwrap_optimizer(optimizer) is not None:
            return optimizer
        if self.tram_method_kwargs.get("local_ascent") and self.is_fsdp_enabled:
            raise ValueError(
                "local_ascent=True is not available under FSDP (gradients stay unsharded until "
                "a synchronised backward); use the synchronised ascent"
            )
        target = self.model if model is None else model
        self.optimizer = wrap_optimizer(
            self.tram_method,
            optimizer,
            model=self.accelerator.unwrap_model(target),
            **self.tram_method_kwargs,
        )
        return self.optimizer

    # ------------------------------------------------------------------ the two passes
    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """Pass 1 on ``inputs``; on the optimizer step's last micro-batch (the Trainer syncs the
        gradients), ascend, replay every micro-batch of the step at θ+ε, restore."""
        optimizer = self.two_pass_optimizer
        if optimizer is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if optimizer.is_perturbed:
            optimizer.restore()
        window = self._tram_step.window
        normalisations = self._tram_step.normalisations
        window.append(inputs)
        accumulation = self.args.gradient_accumulation_steps
        normalisations.append(
            (num_items_in_batch, getattr(self, "current_gradient_accumulation_steps", accumulation))
        )
        # The Trainer carries the micro-batches of an epoch that ended without a step into the
        # next step (an IterableDataset, whose length it does not know): fewer than
        # `accumulation` of them, so a window is shorter than twice that.
        if len(window) >= 2 * accumulation:
            window.clear()
            normalisations.clear()
            raise RuntimeError(
                f"TramTrainer.training_step received {2 * accumulation} micro-batches since the "
                "last optimizer step (gradient_accumulation_steps="
                f"{accumulation}) without one that synchronises the gradients "
                "(accelerator.gradient_state.sync_gradients): the two-pass step needs the "
                "Trainer's training loop to mark the last micro-batch of each step. An "
                "IterableDataset whose epoch is shorter than gradient_accumulation_steps "
                "batches never gets one (the plain Trainer takes no step there either)"
            )
        loss = self._first_pass(model, optimizer, inputs, num_items_in_batch)
        if not self.accelerator.gradient_state.sync_gradients:
            return loss
        self._tram_step.window = []
        self._tram_step.normalisations = []
        perturbed = optimizer.first_step(grad_scale=grad_scale_of(self.accelerator))
        self._tram_metrics.record_ascent(optimizer, perturbed)
        if perturbed:
            self._replay(model, optimizer, window, normalisations)
        return loss

    def _first_pass(
        self,
        model: nn.Module,
        optimizer: TwoPassOptimizer,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None,
    ) -> Tensor:
        # Per-worker ascent: pass 1 of every micro-batch under no_sync (the Trainer already
        # suspends synchronisation for all but the last). Off-steps of ascent_every are plain
        # steps whose pass-1 gradient must be synchronised.
        local = optimizer.local_ascent and optimizer.ascent_due
        step = self._tram_step
        step.phase, step.observed = "first", False
        try:
            with self.accelerator.no_sync(model) if local else contextlib.nullcontext():
                loss: Tensor = super().training_step(model, inputs, num_items_in_batch)
        finally:
            step.phase = None
        if not step.observed and optimizer.observes_first_pass:
            raise RuntimeError(
                f"{type(optimizer).__name__} observes the first forward pass, which "
                "TramTrainer.compute_loss wraps in optimizer.first_pass(); a compute_loss "
                "override must call super().compute_loss(...)"
            )
        return loss

    def _replay(
        self,
        model: nn.Module,
        optimizer: TwoPassOptimizer,
        window: Sequence[dict[str, Any]],
        normalisations: Sequence[tuple[Any, int]],
    ) -> None:
        """Pass 2: every micro-batch of the step at θ+ε, each normalised as in its first pass,
        ``no_sync`` on all but the last; then restore θ, before the optimizer step (a GradScaler
        skips step() on overflow, and clipping and callbacks should see θ)."""
        self._tram_step.phase = "replay"
        accumulation = getattr(self, "current_gradient_accumulation_steps", None)
        try:
            last = len(window) - 1
            with optimizer.second_pass():
                for index, (micro_batch, (num_items_in_batch, steps)) in enumerate(
                    zip(window, normalisations, strict=True)
                ):
                    replay = (
                        self.accelerator.no_sync(model)
                        if index < last
                        else contextlib.nullcontext()
                    )
                    self.current_gradient_accumulation_steps = steps
                    with replay:
                        super().training_step(model, micro_batch, num_items_in_batch)
        finally:
            if accumulation is not None:
                self.current_gradient_accumulation_steps = accumulation
            self._tram_step.phase = None
            optimizer.restore()

    # ------------------------------------------------------------------ loss and regularizers
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """The Trainer's loss, plus the regularizers' penalties in training.

        In the first pass the model's forward runs inside ``optimizer.first_pass()`` (TRAM
        records it there); the regularizers' own forwards run outside it.
        """
        training = model.training and torch.is_grad_enabled()
        optimizer = self.two_pass_optimizer
        step = self._tram_step
        observe: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if training and optimizer is not None and step.phase == "first":
            observe = self._observe_first_pass(model, optimizer)
            step.observed = True
        if not self.regularizers or not training:
            with observe:
                return super().compute_loss(
                    model,
                    inputs,
                    return_outputs=return_outputs,
                    num_items_in_batch=num_items_in_batch,
                )
        regularizer_inputs = dict(inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        with observe, _logits_required(unwrapped):
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        logits = find_logits(outputs)
        record = step.phase != "replay"
        if record:
            self._tram_metrics.record("task_loss", loss)
        for name, regularizer in zip(self.regularizer_names, self.regularizers, strict=True):
            penalty = regularizer(unwrapped, regularizer_inputs, logits)
            if record:
                self._tram_metrics.record(name, penalty)
            loss = loss + penalty
        return (loss, outputs) if return_outputs else loss

    def _observe_first_pass(
        self, model: nn.Module, optimizer: TwoPassOptimizer
    ) -> contextlib.AbstractContextManager[Any]:
        """The context the first pass's ``compute_loss`` runs in: ``optimizer.first_pass()``.

        (``tram.integrations.trl`` replaces it for trainers whose forward returns no logits.)
        """
        # no_sync for local_ascent was entered by training_step around forward and backward.
        return optimizer.first_pass(no_sync=contextlib.nullcontext())

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the tram metrics to the Trainer's training logs (the ones with ``loss``)."""
        optimizer = self.two_pass_optimizer
        if "loss" in logs and (optimizer is not None or self.regularizers):
            names = _Metrics.names(optimizer, self.regularizer_names)
            logs = {**logs, **self._tram_metrics.drain(names, optimizer, self.args.device)}
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """``Trainer.train``; notes the checkpoint it resumes from (resolved as the Trainer does),
        whose regularizer state is loaded when training begins."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            output_dir = self.args.output_dir
            found = output_dir is not None and os.path.isdir(output_dir)
            checkpoint = get_last_checkpoint(output_dir) if found else None
        self._tram_resumed_from = str(checkpoint) if checkpoint else None
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._tram_resumed_from = None
