"""TRL: ``SFTTrainer`` and ``DPOTrainer`` with tram methods, TRAM included.

The same two-line switch as :class:`tram.integrations.hf.TramTrainer`, the import and the class::

    from tram.integrations.trl import TramSFTTrainer

    trainer = TramSFTTrainer(
        model=model, args=SFTConfig(...), train_dataset=dataset,
        method="tram", method_kwargs={"trust_region": "pretrained"},
    )
    trainer.train()

``TramSFTTrainer`` is ``TramTrainer`` combined with TRL's ``SFTTrainer`` (``TramDPOTrainer``: with
``DPOTrainer``); :func:`with_tram` builds the same for any other ``transformers.Trainer``
subclass. Everything ``TramTrainer`` does applies: the optimizer TRL configures is wrapped, the
gradient accumulation is exact (every micro-batch replayed at θ+ε through the trainer's own
``training_step``, so TRL's loss and its normalisation by the window's token count are those of
TRL; the replay's entries in TRL's metrics are dropped, so they are the first pass's, at θ, as
under TRL's own trainer), mixed precision, checkpoints, logging of ``tram/radius`` and
``tram/ascent_grad_norm``.

**TRAM and TRL's fused language-model head.** TRL (1.x) trains causal LMs with a fused head:
``model(..., fused_lm_head=True)`` returns per-token log-probabilities of the labels and never
builds the logits, so TRAM cannot measure its trust region on that forward. Under TRAM these
trainers therefore run, for every training forward of the first pass, a *twin* forward just
before it: the same call without the fused head and without labels, on the same inputs, with
the random state put back afterwards so that the real forward draws the same dropout masks.
TRAM records the twin (its logits, its inputs, its random state), so d is measured exactly on
the distribution the real forward computes, against the reference run on the same inputs with
the same masks. It costs one forward with gradients enabled (its graph is freed as soon as it
returns, and with it the full ``[batch, length, vocabulary]`` logits: TRAM keeps only d of each
recorded forward) per micro-batch: 4 forwards and 2 backwards per micro-batch instead of 3
and 2. SAM, ASAM, Fisher SAM and TRAM-Fisher need no
logits and cost what they cost under ``TramTrainer``; TRAM-Fisher's noise goes on the training
forward itself, whose gradient gives its ascent. TRL's own reference model of DPO runs without
gradients and is never recorded.

What of TRL this relies on beyond its documented API, checked by ``tests/test_trl.py``: the
arguments that select the fused head and its loss (``fused_lm_head``, ``labels``,
``shift_labels``, ``num_items_in_batch``), which the twin drops to get the plain forward's logits
(``test_sft_tram_measures_the_exact_radius``).

Loss-side regularizers (``regularizers=``) are refused: they need the training forward's logits
with gradients, which the fused head never builds.

A plain ``SFTTrainer``/``DPOTrainer`` (or ``transformers.Trainer``) given a tram optimizer in
``optimizers=`` only calls ``optimizer.step()``: the wrapper refuses that step
(``tram.MissingAscentError``) and names these classes.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from trl import DPOTrainer, SFTTrainer

from tram._tram import TRAM
from tram._wrapper import TwoPassOptimizer
from tram.integrations.hf import TramTrainer

__all__ = ["TramDPOTrainer", "TramSFTTrainer", "with_tram"]

_LOSS_ONLY_KWARGS = ("fused_lm_head", "labels", "shift_labels", "num_items_in_batch")
"""Arguments of a TRL forward that only select the fused head or its loss: the twin drops them."""


def _rng_state(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.device]:
    device = next(module.parameters()).device
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, device


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None, torch.device]) -> None:
    cpu, cuda, device = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


@contextlib.contextmanager
def twin_logits_forwards(module: nn.Module, optimizer: TwoPassOptimizer) -> Iterator[None]:
    """Record, for TRAM, a logits-returning twin of every training forward of ``module``.

    Inside the block, each forward of ``module`` in training mode with gradients enabled is
    preceded by ``module(*args, **kwargs_without_fused_head_and_labels)`` run inside
    ``optimizer.first_pass()``; the random state is restored after the twin, so the real forward
    draws the same dropout masks as the twin did.
    """
    busy = False

    def before_forward(mod: nn.Module, args: Any, kwargs: Any) -> None:
        nonlocal busy
        if busy or not mod.training or not torch.is_grad_enabled():
            return
        twin_kwargs = {key: value for key, value in kwargs.items() if key not in _LOSS_ONLY_KWARGS}
        state = _rng_state(mod)
        busy = True
        try:
            with optimizer.first_pass(no_sync=contextlib.nullcontext()):
                mod(*args, **twin_kwargs)  # recorded by TRAM; the output and its graph are dropped
        finally:
            busy = False
            _set_rng_state(state)

    handle = module.register_forward_pre_hook(before_forward, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class _TwinLogitsMixin:
    """Makes TRAM's first-pass observation work with TRL's fused LM head (see the module
    docstring)."""

    def __init__(self, *args: Any, regularizers: Any = None, **kwargs: Any) -> None:
        if regularizers:
            raise ValueError(
                "regularizers are not supported with TRL trainers: they need the logits of the "
                "training forward, with gradients, and TRL's fused LM head does not build them "
                "(TRL recomputes them without gradients, which would silently drop the "
                "penalty's gradient through the model's own output)"
            )
        super().__init__(*args, **kwargs)

    def _observe_first_pass(
        self, model: nn.Module, optimizer: TwoPassOptimizer
    ) -> contextlib.AbstractContextManager[Any]:
        if not (isinstance(optimizer, TRAM) and optimizer.records_first_pass):
            # No logits needed: the first pass itself runs inside first_pass(), as under
            # TramTrainer. TRAM-Fisher only noises it (a twin would take the noise, and the clean
            # training forward would give the ascent its gradient); TRAM records nothing on an
            # ascent_every off-step or a step that reuses d (a twin would be a wasted forward).
            return TramTrainer._observe_first_pass(self, model, optimizer)  # type: ignore[arg-type]
        module = getattr(optimizer, "module", None)
        if not isinstance(module, nn.Module):
            module = self.accelerator.unwrap_model(model)  # type: ignore[attr-defined]
        return twin_logits_forwards(module, optimizer)

    def _replay(
        self,
        model: nn.Module,
        optimizer: TwoPassOptimizer,
        window: Sequence[dict[str, Any]],
        num_items_in_batch: torch.Tensor | int | None,
    ) -> None:
        """Pass 2 through TRL's ``compute_loss``, which appends to TRL's metrics as the first
        pass did (the token count, token accuracy and entropy of SFT; DPO's rewards and
        log-probabilities). The replay's entries are dropped: TRL logs the first pass's values,
        at θ and counted once, as its own trainer does."""
        metrics = copy.deepcopy(getattr(self, "_metrics", None))
        tokens = getattr(self, "_total_train_tokens", None)
        try:
            super()._replay(model, optimizer, window, num_items_in_batch)  # type: ignore[misc]
        finally:
            if metrics is not None:
                self._metrics = metrics
            if tokens is not None:
                self._total_train_tokens = tokens


class TramSFTTrainer(_TwinLogitsMixin, TramTrainer, SFTTrainer):
    """TRL's ``SFTTrainer`` with a tram method (the arguments of ``SFTTrainer`` plus ``method``,
    ``method_kwargs`` and ``regularizers`` of :class:`~tram.integrations.hf.TramTrainer`)."""


class TramDPOTrainer(_TwinLogitsMixin, TramTrainer, DPOTrainer):
    """TRL's ``DPOTrainer`` with a tram method (the arguments of ``DPOTrainer`` plus ``method``,
    ``method_kwargs`` and ``regularizers`` of :class:`~tram.integrations.hf.TramTrainer`)."""


def with_tram(trainer_class: type[Any]) -> type[Any]:
    """``TramTrainer`` combined with another ``transformers.Trainer`` subclass (e.g. another TRL
    trainer that trains with ``training_step``/``compute_loss``)."""
    from transformers import Trainer

    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(
            "trainer_class must be a subclass of transformers.Trainer, but got "
            f"{getattr(trainer_class, '__name__', type(trainer_class).__name__)}"
        )
    if issubclass(trainer_class, TramTrainer):
        return trainer_class
    return type(f"Tram{trainer_class.__name__}", (_TwinLogitsMixin, TramTrainer, trainer_class), {})
