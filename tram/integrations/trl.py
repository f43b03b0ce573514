"""TRL: ``SFTTrainer``, ``DPOTrainer`` and (:func:`with_tram`) TRL's other trainers with tram
methods, TRAM included.

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

**Other TRL trainers** (:func:`with_tram`). ``GRPOTrainer``, ``RLOOTrainer`` and
``DistillationTrainer`` (on-policy) generate their completions in ``_prepare_inputs``, once per
generation batch, and hand out one slice of it per micro-batch, counted by ``self._step``
(``steps_per_generation``, ``num_iterations``). The first pass's ``_prepare_inputs`` runs as under
TRL; the replay does not call it again but trains on the micro-batches it returned, so that pass 2
sees the very completions, advantages and old log-probabilities pass 1 saw, generates nothing and
draws no random numbers for sampling. Their ``training_step`` and ``compute_loss``, which pass 2
runs too, update the trainer's state (``_TRAINER_STATE``: the metrics lists, the token and
micro-batch counters, GRPO's adaptive entropy coefficient): each replayed loss runs on the state
its first pass ran on, and the replay's updates are dropped, so the step, the generation schedule
and every logged value are those of TRL's own trainer (``grad_norm``, the θ+ε gradient's, and the
timings excepted). ``RewardTrainer``, ``KTOTrainer`` and the experimental ``ORPOTrainer`` and
``CPOTrainer`` take the exact step the same way. Trainers that generate inside ``training_step``
(the experimental ``GKDTrainer``, ``GOLDTrainer``, ``OnlineDPOTrainer``) are refused: pass 2 would
train on other completions. ``DistillationTrainer`` never builds the student's logits (its loss
projects hidden states chunk by chunk): TRAM's trust region on logits is refused there on the first
training step, before any forward; the methods that need no logits take the exact step there
(SAM and TRAM-Fisher tested).

What of TRL this relies on beyond its documented API, checked by ``tests/test_trl.py``: the
arguments that select the fused head and its loss (``fused_lm_head``, ``labels``,
``shift_labels``, ``num_items_in_batch``), which the twin drops to get the plain forward's logits
(``test_sft_tram_measures_the_exact_radius``); the Trainer's private ``_prepare_inputs``, called
once per micro-batch by ``Trainer.training_step`` before ``compute_loss``, and the names of the
state attributes in ``_TRAINER_STATE`` (``test_other_trl_trainers_take_the_exact_two_pass_step``,
``test_other_trl_trainers_log_the_first_pass_once``,
``test_grpo_replays_with_the_adaptive_entropy_coefficient_of_the_first_pass``).

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
from tram._versions import require_installed
from tram._wrapper import TwoPassOptimizer
from tram.integrations.hf import TramTrainer

__all__ = ["TramDPOTrainer", "TramSFTTrainer", "with_tram"]

require_installed("trl", needed_by=__name__)

_LOSS_ONLY_KWARGS = ("fused_lm_head", "labels", "shift_labels", "num_items_in_batch")
"""Arguments of a TRL forward that only select the fused head or its loss: the twin drops them."""


_TRAINER_STATE = (
    "_metrics",  # SFT, DPO, KTO, Reward, GRPO, RLOO: lists of values averaged at each log
    "_stored_metrics",  # ORPO, CPO (trl.experimental): the same
    "_total_train_tokens",  # SFT, DPO, KTO, Reward: the running token count
    "_step",  # GRPO, RLOO: micro-batches trained, which pick the slice of the generation batch
    "_current_train_step_time",  # GRPO, RLOO
    "entropy_coef",  # GRPO's adaptive entropy bonus, updated on the last micro-batch of a step
    "_last_world_entropy",
    "_entropy_window_stats",
)
"""Attributes a TRL trainer updates in ``training_step``/``compute_loss``. Pass 2 (θ+ε) must run
each micro-batch's loss on the state pass 1 ran it on (GRPO's entropy coefficient enters the
loss), and must leave the state as pass 1 left it (the values logged are those at θ, once)."""


def _trainer_state(trainer: Any) -> dict[str, Any]:
    return {
        name: copy.deepcopy(getattr(trainer, name))
        for name in _TRAINER_STATE
        if hasattr(trainer, name)
    }


def _set_trainer_state(trainer: Any, state: dict[str, Any]) -> None:
    for name, value in state.items():
        setattr(trainer, name, value)


_COMPUTES_NO_LOGITS = {"DistillationTrainer": "trl.trainer.distillation_trainer"}
"""TRL trainers whose training forward never builds the logits (not even through the fused head
that TRAM's twin undoes): ``DistillationTrainer`` projects the student's and the teacher's hidden
states to the vocabulary chunk by chunk inside its loss."""


def _trl_base(trainer_class: type[Any], names: dict[str, str]) -> type[Any] | None:
    """The class among ``trainer_class``'s bases that is one of TRL's trainers in ``names``
    (class name: the module it comes from), or None."""
    for klass in trainer_class.__mro__:
        module = names.get(klass.__name__)
        if module is not None and klass.__module__.startswith(module):
            return klass
    return None


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


class _TRLMixin:
    """What TRL's trainers need beyond ``TramTrainer`` (see the module docstring): TRAM's
    first-pass observation with the fused LM head, the replay of the micro-batches their
    ``_prepare_inputs`` generated, and their state kept as the first pass left it."""

    def __init__(self, *args: Any, regularizers: Any = None, **kwargs: Any) -> None:
        if regularizers:
            raise ValueError(
                "regularizers are not supported with TRL trainers: they need the logits of the "
                "training forward, with gradients, and TRL's fused LM head does not build them "
                "(TRL recomputes them without gradients, which would silently drop the "
                "penalty's gradient through the model's own output)"
            )
        self._tram_loss_states: list[dict[str, Any]] = []
        """The trainer state before each first-pass loss of the current optimizer step."""
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
        without_logits = _trl_base(type(self), _COMPUTES_NO_LOGITS)
        if without_logits is not None:
            raise TypeError(
                f"{type(optimizer).__name__} measures its trust region on the model's logits, but "
                f"{without_logits.__name__} computes its loss from the hidden states in chunks "
                "and never builds them (a twin forward would run its loss instead); use a method "
                "that needs no logits: 'sam', 'asam', 'fisher_sam', or 'tram' with "
                "trust_region='fisher'"
            )
        module = getattr(optimizer, "module", None)
        if not isinstance(module, nn.Module):
            module = self.accelerator.unwrap_model(model)  # type: ignore[attr-defined]
        return twin_logits_forwards(module, optimizer)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        if not self._tram_step.window:  # type: ignore[attr-defined]
            self._tram_loss_states = []  # a new optimizer step
        loss: torch.Tensor = super().training_step(  # type: ignore[misc]
            model, inputs, num_items_in_batch
        )
        return loss

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The trainer's ``_prepare_inputs`` in the first pass, whose result the replay reuses.

        A TRL trainer's ``_prepare_inputs`` need not be a pure function of the batch: TRL's
        ``GRPOTrainer`` and ``RLOOTrainer`` generate completions there (sampling, from the weights
        of the moment) or hand out the next slice of a buffered generation batch. Pass 2 must see
        the very micro-batch pass 1 saw, so the window keeps what the first pass's call returned
        and the replay does not call it again (a shallow copy: ``compute_loss`` may edit the
        mapping, as the Trainer's own pops ``labels``).
        """
        step = self._tram_step  # type: ignore[attr-defined]
        if step.phase == "replay":
            return copy.copy(inputs)
        prepared: dict[str, Any] = super()._prepare_inputs(inputs)  # type: ignore[misc]
        if step.phase == "first" and step.window:
            step.window[-1] = prepared
        return prepared

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """TRL's loss; in the replay, on the trainer state the first pass's loss of the same
        micro-batch ran on (see :data:`_TRAINER_STATE`)."""
        phase = self._tram_step.phase  # type: ignore[attr-defined]
        if phase == "first":
            self._tram_loss_states.append(_trainer_state(self))
        elif phase == "replay":
            _set_trainer_state(self, self._tram_loss_states.pop(0))
        return super().compute_loss(  # type: ignore[misc]
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def _replay(
        self,
        model: nn.Module,
        optimizer: TwoPassOptimizer,
        window: Sequence[dict[str, Any]],
        normalisations: Sequence[tuple[Any, int]],
    ) -> None:
        """Pass 2 through TRL's ``training_step`` and ``compute_loss``, which update the trainer's
        state as the first pass did (:data:`_TRAINER_STATE`: the metrics, the token count, GRPO's
        micro-batch counter and adaptive entropy coefficient). Each replayed loss runs on the
        state its first pass ran on, and the replay's updates are dropped afterwards: TRL logs
        the first pass's values, at θ and counted once, and counts micro-batches once, as its own
        trainer does."""
        after_first_pass = _trainer_state(self)
        try:
            super()._replay(model, optimizer, window, normalisations)  # type: ignore[misc]
        finally:
            _set_trainer_state(self, after_first_pass)
            self._tram_loss_states = []


class TramSFTTrainer(_TRLMixin, TramTrainer, SFTTrainer):
    """TRL's ``SFTTrainer`` with a tram method (the arguments of ``SFTTrainer`` plus ``method``,
    ``method_kwargs`` and ``regularizers`` of :class:`~tram.integrations.hf.TramTrainer`)."""


class TramDPOTrainer(_TRLMixin, TramTrainer, DPOTrainer):
    """TRL's ``DPOTrainer`` with a tram method (the arguments of ``DPOTrainer`` plus ``method``,
    ``method_kwargs`` and ``regularizers`` of :class:`~tram.integrations.hf.TramTrainer`)."""


_GENERATES_IN_TRAINING_STEP = {
    "GKDTrainer": "trl.experimental.gkd",
    "GOLDTrainer": "trl.experimental.gold",
    "OnlineDPOTrainer": "trl.experimental.online_dpo",
}
"""TRL trainers that sample completions inside ``training_step`` (GKD and GOLD with probability
``lmbda``, drawn from Python's ``random``; online DPO always), from the weights of the moment."""


def with_tram(trainer_class: type[Any]) -> type[Any]:
    """``TramTrainer`` combined with another ``transformers.Trainer`` subclass (e.g. another TRL
    trainer that trains with ``training_step``/``compute_loss``).

    Exact with TRL's ``GRPOTrainer``, ``RLOOTrainer``, ``DistillationTrainer``,
    ``RewardTrainer``, ``KTOTrainer`` and the experimental ``ORPOTrainer`` and ``CPOTrainer``
    (``tests/test_trl.py``): completions generated
    in ``_prepare_inputs`` are generated once, in the first pass, and replayed (see
    ``_TRLMixin._prepare_inputs``); the trainer state their ``training_step``/``compute_loss``
    update is that of the first pass (:data:`_TRAINER_STATE`).

    Raises:
        TypeError: ``trainer_class`` is not a ``transformers.Trainer`` subclass, or is one of
            TRL's trainers that generate inside ``training_step`` (GKD, GOLD, online DPO): the
            replay at θ+ε would generate again, from other weights, so no exact two-pass step
            exists.
    """
    from transformers import Trainer

    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(
            "trainer_class must be a subclass of transformers.Trainer, but got "
            f"{getattr(trainer_class, '__name__', type(trainer_class).__name__)}"
        )
    if issubclass(trainer_class, TramTrainer):
        return trainer_class
    generating = _trl_base(trainer_class, _GENERATES_IN_TRAINING_STEP)
    if generating is not None:
        raise TypeError(
            f"with_tram(): {generating.__name__} generates completions inside training_step, "
            "from the current weights, so the second pass at θ+ε would train on other "
            "completions than the first (no exact two-pass step exists); generate the "
            "completions beforehand and train on them with SFTTrainer or DPOTrainer, or use "
            "GRPOTrainer or RLOOTrainer, whose generation runs once per batch in _prepare_inputs"
        )
    return type(f"Tram{trainer_class.__name__}", (_TRLMixin, TramTrainer, trainer_class), {})
