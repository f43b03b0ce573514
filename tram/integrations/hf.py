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
- **Bad input** fails in the constructor, before any training: an unknown method, an argument the
  method does not take, a regularizer that is not callable; a regularizer on a model whose
  output has no logits fails when ``train()`` starts, before the first step.

Private APIs it still uses, each because no public extension point does the job, and each
checked by ``tests/test_hf_private_api.py`` (name, signature, and the behaviour relied on), so
that a transformers or accelerate release that changes one fails the test suite instead of
training differently:

- ``Trainer._save_optimizer_and_scheduler(output_dir)`` and
  ``Trainer._load_optimizer_and_scheduler(checkpoint)``: the regularizers' state is saved next to
  the optimizer's in the same checkpoint directory and restored on resume. A ``TrainerCallback``'s
  ``on_save`` does not know the resumed checkpoint's path.
- ``Trainer._remove_unused_columns``, ``Trainer._get_collator_with_removed_columns`` and
  ``Trainer._prepare_inputs``: the regularizer preflight builds one batch exactly as training
  will, to fail before the first step when the model's output has no logits.
- ``AcceleratedOptimizer._is_overflow``: read by ``accelerator.optimizer_step_was_skipped``, which
  keeps the Trainer from stepping the scheduler; set when the wrapper skipped the base step
  (a non-finite gradient without a GradScaler), as a GradScaler's skip sets it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from tram._wrapper import TwoPassOptimizer
from tram.factory import check_method_args, wrap_optimizer
from tram.integrations.accelerate import grad_scale_of, unwrap_optimizer
from tram.targets import extract_logits

__all__ = ["REGULARIZERS_NAME", "MissingLogitsError", "TramTrainer", "find_logits"]

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


def _total(values: Sequence[Tensor | float]) -> float:
    floats = [value for value in values if not isinstance(value, Tensor)]
    tensors = [value.cpu() for value in values if isinstance(value, Tensor)]
    total = math.fsum(float(value) for value in floats)
    if tensors:
        total += float(torch.stack(tensors).double().sum().item())
    return total


def _observes_first_pass(optimizer: TwoPassOptimizer) -> bool:
    """Whether the method does something in ``first_pass()`` beyond ``no_sync`` (TRAM)."""
    observe = type(optimizer)._observe_first_pass
    return observe is not TwoPassOptimizer._observe_first_pass


class _StepCallback(TrainerCallback):
    """Around every optimizer step: notes whether the step was taken (see
    :meth:`TramTrainer._after_optimizer_step`)."""

    def __init__(self, trainer: TramTrainer) -> None:
        self._trainer = trainer

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = self._trainer.two_pass_optimizer
        self._trainer._tram_steps_seen = None if optimizer is None else optimizer.steps

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._trainer._after_optimizer_step()


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
        if method is None and method_kwargs:
            raise ValueError("method_kwargs given without a method; pass method='sam' or another")
        method_kwargs = dict(method_kwargs or {})
        if method is not None:
            check_method_args(method, method_kwargs, validate_values=True)
        regularizers = list(regularizers or ())
        for regularizer in regularizers:
            if not callable(regularizer):
                raise TypeError(
                    "a regularizer must be callable as regularizer(model, inputs, logits), but "
                    f"got {type(regularizer).__name__}"
                )
        optimizers = kwargs.get("optimizers")
        if method is not None and optimizers is not None:
            given = optimizers[0] if isinstance(optimizers, (tuple, list)) else None
            if unwrap_optimizer(given) is not None:
                raise ValueError(
                    "optimizers= already holds a tram optimizer; do not pass method= as well"
                )
        self.tram_method = method
        self.tram_method_kwargs = method_kwargs
        self.regularizers = regularizers
        self.regularizer_names = _regularizer_names(regularizers)
        self._tram_window: list[Any] | None = None
        self._tram_pass: str | None = None  # "first", "replay" or None (outside training_step)
        self._tram_observed = False
        self._tram_steps_seen: int | None = None  # wrapper.steps before the optimizer step
        self._tram_metrics: dict[str, list[Tensor | float]] = {}
        super().__init__(*args, **kwargs)
        if method is not None and self.is_deepspeed_enabled:
            raise ValueError("TramTrainer does not support DeepSpeed (its optimizer is its own)")
        if self.regularizers or method is not None or isinstance(self.optimizer, TwoPassOptimizer):
            self.add_callback(_StepCallback(self))

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
    def get_batch_samples(
        self, epoch_iterator: Iterator[Any], num_batches: int, device: torch.device
    ) -> tuple[list[Any], Any]:
        """Keep the micro-batches of this optimizer step (the Trainer prefetched them)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(
            epoch_iterator, num_batches, device
        )
        self._tram_window = batch_samples
        return batch_samples, num_items_in_batch

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """Pass 1 on ``inputs``; on the window's last micro-batch, ascend, replay, restore."""
        optimizer = self.two_pass_optimizer
        if optimizer is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if optimizer.is_perturbed:
            optimizer.restore()
        # Per-worker ascent: pass 1 of every micro-batch under no_sync (the Trainer already
        # suspends synchronisation for all but the last). Off-steps of ascent_every are plain
        # steps whose pass-1 gradient must be synchronised.
        local = optimizer.local_ascent and optimizer._ascent_due()
        self._tram_pass, self._tram_observed = "first", False
        try:
            with self.accelerator.no_sync(model) if local else contextlib.nullcontext():
                loss: Tensor = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._tram_pass = None
        if not self._tram_observed and _observes_first_pass(optimizer):
            raise RuntimeError(
                f"{type(optimizer).__name__} observes the first forward pass, which "
                "TramTrainer.compute_loss wraps in optimizer.first_pass(); a compute_loss "
                "override must call super().compute_loss(...)"
            )
        if not self.accelerator.gradient_state.sync_gradients:
            return loss
        window = self._tram_window
        self._tram_window = None
        if not window or window[-1] is not inputs:
            window = [inputs]
        perturbed = optimizer.first_step(grad_scale=grad_scale_of(self.accelerator))
        self._record_ascent(optimizer, perturbed)
        if perturbed:
            self._tram_pass = "replay"
            try:
                last = len(window) - 1
                for index, micro_batch in enumerate(window):
                    replay = self.accelerator.no_sync(model) if index < last else None
                    with replay or contextlib.nullcontext():
                        super().training_step(model, micro_batch, num_items_in_batch)
            finally:
                self._tram_pass = None
                # Before the optimizer step: a GradScaler skips step() on overflow, and clipping
                # and callbacks should see θ.
                optimizer.restore()
        return loss

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
        observe: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if training and optimizer is not None and self._tram_pass == "first":
            observe = self._observe_first_pass(model, optimizer)
            self._tram_observed = True
        if not self.regularizers or not training:
            with observe:
                return super().compute_loss(
                    model,
                    inputs,
                    return_outputs=return_outputs,
                    num_items_in_batch=num_items_in_batch,
                )
        regularizer_inputs = dict(inputs)
        with observe:
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        logits = find_logits(outputs)
        unwrapped = self.accelerator.unwrap_model(model)
        record = self._tram_pass != "replay"
        if record:
            self._record(_PREFIX + "task_loss", loss)
        for name, regularizer in zip(self.regularizer_names, self.regularizers, strict=True):
            penalty = regularizer(unwrapped, regularizer_inputs, logits)
            if record:
                self._record(_PREFIX + name, penalty)
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

    def _after_optimizer_step(self) -> None:
        """Tell the Trainer when the wrapper skipped the base step; then, after a step taken, call
        each regularizer's ``after_step(model)``.

        The Trainer leaves the scheduler alone when ``accelerator.optimizer_step_was_skipped``,
        which reads the ``AcceleratedOptimizer``'s ``_is_overflow`` flag. accelerate sets it only
        for a GradScaler's skip; without a scaler it stays False, so the wrapper's own skip (a
        non-finite first-pass gradient) sets it here: a skipped step moves neither the weights
        nor the schedule.
        """
        accelerated = self.optimizer
        own_flag = getattr(accelerated, "scaler", None) is None and hasattr(
            accelerated, "_is_overflow"
        )
        if own_flag:
            accelerated._is_overflow = False  # type: ignore[union-attr]
        if self.accelerator.optimizer_step_was_skipped:
            return  # a GradScaler skipped the step
        optimizer = self.two_pass_optimizer
        if optimizer is not None and optimizer.steps == self._tram_steps_seen:
            if own_flag:
                accelerated._is_overflow = True  # type: ignore[union-attr]
            return
        model = self.accelerator.unwrap_model(self.model)
        for regularizer in self.regularizers:
            after_step = getattr(regularizer, "after_step", None)
            if callable(after_step):
                after_step(model)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, after checking that the model returns what the regularizers need."""
        if self.regularizers:
            self._check_regularizer_outputs()
        return super().train(*args, **kwargs)

    def _preflight_batch(self) -> dict[str, Any] | None:
        dataset: Any = self.train_dataset
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            return None
        if len(dataset) == 0:
            return None
        try:
            import datasets

            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="training")
                collator = self.data_collator
            else:
                collator = self._get_collator_with_removed_columns(self.data_collator, "training")
        except ImportError:
            collator = self._get_collator_with_removed_columns(self.data_collator, "training")
        batch = collator([dataset[0]])
        if not isinstance(batch, Mapping):
            return None
        return self._prepare_inputs(batch)

    def _check_regularizer_outputs(self) -> None:
        """One evaluation-mode forward of one training example; raise if it has no logits.

        Runs under ``no_grad`` with the RNG state saved and restored, so the training run is
        unchanged (and TRAM, which records training-mode forwards only, does not see it).
        """
        model = self.model
        if model is None:
            return
        try:
            batch = self._preflight_batch()
        except Exception as error:  # the real run will report a broken data pipeline itself
            logger.debug("TramTrainer: skipped the regularizer preflight: %s", error)
            return
        if batch is None:
            return
        was_training = model.training
        devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                model.eval()
                outputs = model(**batch)
        except Exception as error:
            logger.debug("TramTrainer: skipped the regularizer preflight: %s", error)
            return
        finally:
            model.train(was_training)
        find_logits(outputs)

    # ------------------------------------------------------------------ logging
    def _record(self, key: str, value: Tensor | float) -> None:
        # Tensors stay on their device until the next log: no host sync per micro-batch.
        if isinstance(value, Tensor):
            value = value.detach().float().reshape(())
        self._tram_metrics.setdefault(key, []).append(value)

    def _record_ascent(self, optimizer: TwoPassOptimizer, perturbed: bool) -> None:
        if perturbed and optimizer.last_ascent_norm is not None:
            self._record(_PREFIX + "ascent_grad_norm", optimizer.last_ascent_norm)
        radius = getattr(optimizer, "last_radius", None)
        if perturbed and radius is not None:
            self._record(_PREFIX + "radius", float(radius))

    def _metric_keys(self) -> list[str]:
        keys: list[str] = []
        optimizer = self.two_pass_optimizer
        if optimizer is not None:
            keys.append(_PREFIX + "ascent_grad_norm")
            if hasattr(optimizer, "last_radius"):
                keys.append(_PREFIX + "radius")
        if self.regularizers:
            keys.append(_PREFIX + "task_loss")
            keys.extend(_PREFIX + name for name in self.regularizer_names)
        return keys

    def _drain_metrics(self) -> dict[str, float]:
        """Means since the last log, over steps and workers (a collective under DDP)."""
        keys = self._metric_keys()
        metrics = self._tram_metrics
        self._tram_metrics = {}
        optimizer = self.two_pass_optimizer
        values = [_total(metrics.get(key, [])) for key in keys]
        counts = [float(len(metrics.get(key, []))) for key in keys]
        skipped = [
            float(getattr(optimizer, counter, 0)) if optimizer is not None else 0.0
            for counter in ("skipped_ascents", "skipped_steps")
        ]
        packed = torch.tensor([*values, *counts], dtype=torch.float64, device=self.args.device)
        top = torch.tensor(skipped, dtype=torch.float64, device=self.args.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
        sums, totals = packed[: len(keys)].tolist(), packed[len(keys) :].tolist()
        logs = {key: s / n for key, s, n in zip(keys, sums, totals, strict=True) if n > 0}
        if optimizer is not None:
            logs[_PREFIX + "skipped_ascents"], logs[_PREFIX + "skipped_steps"] = top.tolist()
        return logs

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the tram metrics to the Trainer's training logs."""
        if "loss" in logs and (self.two_pass_optimizer is not None or self.regularizers):
            logs = {**logs, **self._drain_metrics()}
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        states = self._regularizer_states()
        if states and self.args.should_save:
            torch.save(states, os.path.join(output_dir, REGULARIZERS_NAME))

    def _regularizer_states(self) -> dict[str, Any]:
        states = {}
        for name, regularizer in zip(self.regularizer_names, self.regularizers, strict=True):
            state_dict = getattr(regularizer, "state_dict", None)
            if callable(state_dict):
                states[name] = state_dict()
        return states

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not self.regularizers:
            return
        path = os.path.join(checkpoint, REGULARIZERS_NAME)
        if not os.path.isfile(path):
            if self._regularizer_states():
                logger.warning(
                    "TramTrainer: %s has no %s; the regularizers start from a fresh state",
                    checkpoint,
                    REGULARIZERS_NAME,
                )
            return
        states = torch.load(path, map_location="cpu", weights_only=True)
        for name, regularizer in zip(self.regularizer_names, self.regularizers, strict=True):
            load_state_dict = getattr(regularizer, "load_state_dict", None)
            if name in states and callable(load_state_dict):
                load_state_dict(states[name])
