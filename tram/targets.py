"""Trust-region targets: what TRAM measures its radius against, and the reference weights.

TRAM's radius is d = KL(target ‖ model) on the batch of the first pass (Sherborne et al. 2024,
Eq. 4-5). A :class:`Target` is the object that produces the target's output: the model on noised
input embeddings (:class:`NoisedInputs`, TRAM-x), or the model with other weights: the
pre-trained θ0 (:class:`Pretrained`), the previous step's θt−1 (:class:`Previous`) or an
exponential moving average (:class:`EMA`). Each owns its reference forward, its state and its
checkpoint; TRAM holds the recording, the replay and the ascent once. A user's own target is a
subclass of :class:`Target`; ``TRAM(base, model, target=MyTarget())``.

TRAM (and the loss-side regularizers TRPO and MESA) compare the model's output distribution with
the output of a *reference*. :class:`ReferenceWeights` holds such weights for the
trainable parameters only and runs the live module with them through
``torch.func.functional_call``: no second module, frozen parameters and buffers shared with the
live model, and the live model untouched afterwards. With ``dtype=torch.bfloat16`` the copy
takes half the memory and the reference forward runs under autocast.

The helpers :func:`call_model`, :func:`extract_logits` and :func:`logits_mask` turn a recorded
forward call back into logits and a padding mask.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from tram._ascent import foreach_copy_
from tram._model_io import (
    call_model,
    extract_logits,
    logits_mask,
    parameters_are_sharded,
    unwrap_model,
)
from tram._parametrize_cache import uncached
from tram._validation import check_non_negative, check_unit_interval
from tram.noise import NoiseDistribution, NoiseStream, representation_noise, resolve_module

__all__ = [
    "EMA",
    "TARGETS",
    "NoisedInputs",
    "Pretrained",
    "Previous",
    "ReferenceWeights",
    "Target",
    "call_model",
    "extract_logits",
    "logits_mask",
    "make_target",
    "unwrap_model",
]


class ReferenceWeights:
    """A copy of a model's trainable parameters that can stand in for them in a forward pass.

    Args:
        model: the live model (unwrapped from DDP first). Only parameters with
            ``requires_grad`` are copied; frozen parameters and buffers are read from the live
            module at call time. A parameter unfrozen later (gradual unfreezing) is copied when
            it is first seen trainable (:meth:`track_trainable`): before its first update, so
            the copy holds the value it had all along.
        dtype: storage dtype of the copy (e.g. ``torch.bfloat16`` to halve its memory); the
            reference forward then runs under autocast in that dtype.
    """

    def __init__(self, model: nn.Module, *, dtype: torch.dtype | None = None) -> None:
        self.model = unwrap_model(model)
        if parameters_are_sharded(model, self.model):
            raise ValueError(
                f"reference weights of {type(self.model).__name__} cannot be kept: its "
                "parameters are sharded (FSDP, FSDP2 or DeepSpeed), and its forward gathers the "
                "live parameters over any substituted ones, so the reference forward would run "
                "the live weights (d = 0, a KL to itself). For TRAM use the noise target "
                "(trust_region='noise') or TRAM-Fisher, or DDP, which keeps parameters whole"
            )
        self.dtype = dtype
        self.names: list[str] = []
        self.live: list[Tensor] = []
        self.tensors: dict[str, Tensor] = {}
        self._spare_copies: Mapping[Tensor, Tensor] | None = None
        self.track_trainable()
        if not self.names:
            raise ValueError(f"{type(self.model).__name__} has no trainable parameters")

    @torch.no_grad()
    def track_trainable(self) -> None:
        """Copy the parameters that require grad and have no copy yet.

        A frozen parameter is not updated, so when it is unfrozen its value is still the one
        the reference should hold (θ0 for TRAM-θ0, θt−1 for TRAM-θt−1 and TRPO, the EMA of a
        constant for the EMA target). Called before every use of the copies and by TRAM before
        every base step, which is before the parameter's first update.
        """
        for name, param in self.model.named_parameters():
            if param.requires_grad and name not in self.tensors:
                self._copy(name, param)

    def check_live(self, owner: str) -> None:
        """Refuse a reference copied from parameters the model no longer has under their names:
        a module replaced after construction (a new head; PEFT's ``get_peft_model``, whose LoRA
        layers move ``layer.weight`` to ``layer.base_layer.weight``), or parameters replaced
        (``fully_shard``, ``load_state_dict(assign=True)``). Its copy would stand in for the new
        parameter of the same name (a new head of the same shape: silently the old head's
        values), be refreshed from the old one, or fail inside ``functional_call``. ``owner``
        names the method in the message."""
        parameters = dict(self.model.named_parameters())
        for name, live in zip(self.names, self.live, strict=True):
            if parameters.get(name) is not live:
                raise RuntimeError(
                    f"{owner}: the model's parameter {name!r} is not the one its reference was "
                    "copied from: a module or parameter of the model was replaced after it was "
                    "built (a new head, PEFT's get_peft_model, FSDP's fully_shard, "
                    f"load_state_dict(assign=True)). Build {owner} with the model as it is "
                    "trained, after such changes"
                )

    def _copy(self, name: str, param: Tensor) -> None:
        self.names.append(name)
        self.live.append(param)
        self.tensors[name] = param.detach().to(dtype=self.dtype or param.dtype, copy=True)

    @torch.no_grad()
    def copy_from_model(self) -> None:
        """Set the reference to the live weights (θt−1 snapshots).

        Inside :meth:`spare_copies`, a reference tensor whose live weight has a spare copy of
        the same type, dtype, shape, strides and device takes that copy's storage instead
        (``torch.utils.swap_tensors``: the reference tensor keeps its identity, the copy gets
        the reference's old values); the others are copied. The result is the same bits.
        """
        self.track_trainable()
        spare = getattr(self, "_spare_copies", None)  # absent from objects pickled before
        destinations: list[Tensor] = []
        sources: list[Tensor] = []
        for name, live in zip(self.names, self.live, strict=True):
            reference = self.tensors[name]
            copy = spare.get(live) if spare else None
            if copy is not None and _can_take_storage(reference, copy):
                torch.utils.swap_tensors(reference, copy)
            else:
                destinations.append(reference)
                sources.append(live)
        if destinations:
            foreach_copy_(destinations, sources)

    @contextlib.contextmanager
    def spare_copies(self, copies: Mapping[Tensor, Tensor]) -> Iterator[None]:
        """Let :meth:`copy_from_model` take tensors that hold exactly the live weights.

        ``copies`` maps a live parameter to a tensor equal to it bit for bit and free to be
        overwritten (TRAM passes the wrapper's weight backups right after they restored the
        weights). Whoever passes them must not read them afterwards: after a
        :meth:`copy_from_model` they hold the reference's previous values.
        """
        self._spare_copies = copies
        try:
            yield
        finally:
            self._spare_copies = None

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """reference ← decay · reference + (1 − decay) · live weights."""
        self.track_trainable()
        tensors = list(self.tensors.values())
        if all(t.dtype == p.dtype for t, p in zip(tensors, self.live, strict=True)):
            torch._foreach_lerp_(tensors, self.live, 1.0 - decay)
        else:
            for t, p in zip(tensors, self.live, strict=True):
                t.lerp_(p.to(t.dtype), 1.0 - decay)

    def forward(self, inputs: Any) -> Any:
        """Run the live module with the reference weights on ``inputs`` (see :func:`call_model`)."""
        args: tuple[Any, ...]
        kwargs: dict[str, Any]
        if isinstance(inputs, Mapping):
            args, kwargs = (), dict(inputs)
        elif isinstance(inputs, (tuple, list)):
            args, kwargs = tuple(inputs), {}
        else:
            args, kwargs = (inputs,), {}
        return self.call(args, kwargs)

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the live module with the reference weights on ``(args, kwargs)``.

        Inside ``torch.nn.utils.parametrize.cached()`` the parametrized weights are computed
        from the reference tensors afresh (:func:`tram._parametrize_cache.uncached`): the cache
        is keyed by module, so it would hand this forward the live weights, or hand the live
        forward these."""
        self.track_trainable()
        live_dtype = self.live[0].dtype
        with contextlib.ExitStack() as stack:
            stack.enter_context(uncached())
            if self.dtype is not None and self.dtype != live_dtype:
                device_type = self.live[0].device.type
                stack.enter_context(torch.autocast(device_type=device_type, dtype=self.dtype))
            return functional_call(self.model, self.tensors, args, kwargs, strict=False)

    def state_dict(self) -> dict[str, Tensor]:
        """The reference tensors by parameter name (weights-only loadable)."""
        self.track_trainable()
        return dict(self.tensors)

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Copy saved reference tensors in place; names must match, except that a saved tensor
        of a parameter that was unfrozen after this copy was made is taken as its copy.

        Names and shapes are checked before anything is copied: a state that does not match
        leaves the reference as it was."""
        self.track_trainable()
        parameters = dict(self.model.named_parameters())
        # A saved tensor of a parameter unfrozen after this copy was made: copied below.
        unfrozen = [name for name in state if name not in self.tensors and name in parameters]
        missing = set(self.tensors) - set(state)
        unexpected = set(state) - set(self.tensors) - set(unfrozen)
        if missing or unexpected:
            raise KeyError(
                "reference weights do not match the model: "
                f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        shapes = {name: tensor.shape for name, tensor in self.tensors.items()}
        shapes |= {name: parameters[name].shape for name in unfrozen}
        mismatched = [
            f"{name}: saved {tuple(state[name].shape)}, model {tuple(shape)}"
            for name, shape in shapes.items()
            if state[name].shape != shape
        ]
        if mismatched:
            raise ValueError(
                "reference weights do not match the model's shapes: " + "; ".join(mismatched)
            )
        for name in unfrozen:
            self._copy(name, parameters[name])  # overwritten below with the saved tensor
        for name, tensor in self.tensors.items():
            tensor.copy_(state[name])


def _can_take_storage(reference: Tensor, copy: Tensor) -> bool:
    """Whether ``reference`` can take ``copy``'s storage and be what a copy into it would be.

    ``torch.utils.swap_tensors`` refuses a tensor that something references weakly: dynamo does
    so for the tensors a compiled graph was traced with (the reference weights, when TRAM's
    reference forward ran through a ``torch.compile``'d model); those are copied."""
    return (
        type(reference) is Tensor  # a subclass (FSDP2's DTensor) is copied
        and type(copy) is Tensor
        and copy is not reference
        and copy.dtype == reference.dtype
        and copy.shape == reference.shape
        and copy.stride() == reference.stride()
        and copy.device == reference.device
        and not copy.requires_grad
        and not reference.requires_grad
        and weakref.getweakrefcount(reference) == 0
        and weakref.getweakrefcount(copy) == 0
    )


# ----------------------------------------------------------------------------- targets
class Target:
    """What TRAM measures d against: a distribution on the recorded batch of the first pass.

    TRAM calls :meth:`bind` once with the (unwrapped) model, :meth:`output` under ``no_grad`` for
    each forward call it records, inside its replay context (the recorded call's dropout masks
    and autocast state, BatchNorm running statistics frozen), and :meth:`before_base_step` /
    :meth:`after_base_step` around every base step. :meth:`output` runs at the start of the
    recorded call (from inside the model's forward pre-hook, so it may call the model again);
    with ``replay_dropout=False`` at its end; for a model with sharded parameters in
    ``first_step``. :meth:`state_dict` goes into TRAM's checkpoint, and TRAM loads the one it
    took before a first pass that raised, to undo what that pass's :meth:`output` calls drew. A
    subclass implements :meth:`output` and whatever state it needs.
    """

    name: ClassVar[str] = "target"
    optional_state: ClassVar[frozenset[str]] = frozenset()
    """Keys of :meth:`state_dict` that a checkpoint may lack (saved by an earlier version):
    TRAM refuses a checkpoint that lacks any other key, and passes :meth:`load_state_dict` the
    keys the checkpoint has."""
    model: nn.Module

    def bind(self, model: nn.Module) -> None:
        """Attach to the model TRAM trains (called once, by TRAM's constructor)."""
        if getattr(self, "model", None) is not None:
            raise RuntimeError(f"{type(self).__name__} is already bound to a model; make a new one")
        self.model = model

    def output(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The target's output on one recorded forward call ``model(*args, **kwargs)``."""
        raise NotImplementedError

    def before_base_step(self) -> None:
        """Called before every base step, with the weights at θt."""

    def after_base_step(self) -> None:
        """Called after every base step."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (weights-only loadable)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load what :meth:`state_dict` saved. Check all of ``state`` before changing anything
        and raise ``ValueError`` on what cannot be loaded: TRAM then puts the base optimizer's
        state back, but the target's own part is the target's to leave as it was (as
        :class:`NoisedInputs` and :class:`ReferenceWeights` do)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoisedInputs(Target):
    r"""TRAM-x: the current model on noised input embeddings, :math:`p(\cdot \mid x + z, \theta_t)`.

    :math:`z \sim \mathcal{N}(0, \sigma^2)` or :math:`\mathcal{U}(-\sigma, \sigma)`, added to the
    token-embedding output through :func:`tram.noise.representation_noise` (paper Eq. 5). The
    paper gives no σ; the default 0.1 is its R3F value. The noise comes from the target's own
    seeded stream (:class:`tram.noise.NoiseStream`), so the training RNG stream is not consumed:
    every noised forward is a draw whose generator is seeded from ``seed``, the rank and the
    draw's number, so that each data-parallel rank noises its shard with its own draw, and the
    checkpointed count of draws resumes every rank exactly.

    Args:
        sigma: noise scale σ (standard deviation, or half-width for uniform noise).
        noise: ``"gaussian"`` or ``"uniform"``.
        embeddings: where the noise goes: a module or module name; by default the token
            embeddings (:func:`tram.noise.find_input_embeddings`).
        seed: seed of the noise stream; by default ``torch.initial_seed()``, so the noise
            follows ``torch.manual_seed`` without drawing from the global generator (see
            :class:`tram.noise.NoiseStream`). The checkpoint holds it with the count of draws.
    """

    name = "noise"
    optional_state = frozenset({"noise_seed"})  # checkpoints before the seed was saved

    def __init__(
        self,
        *,
        sigma: float = 0.1,
        noise: NoiseDistribution = "gaussian",
        embeddings: nn.Module | str | None = None,
        seed: int | None = None,
    ) -> None:
        self.sigma = check_non_negative("sigma", sigma)
        if noise not in ("gaussian", "uniform"):
            raise ValueError(f"Invalid noise: {noise!r}. Expected 'gaussian' or 'uniform'")
        self.noise: NoiseDistribution = noise
        self.embeddings_spec = embeddings
        self.stream = NoiseStream(seed)

    @property
    def seed(self) -> int:
        """The seed of the noise stream."""
        return self.stream.seed

    def bind(self, model: nn.Module) -> None:
        super().bind(model)
        self.embeddings = resolve_module(model, self.embeddings_spec)
        # Drawn on the model's device when the optimizer is built: the noise stays the same if
        # the model moves later (it is drawn there and copied over).
        self.stream.device = next(model.parameters()).device

    def noised(self) -> Any:
        """The noise hook with this target's σ, distribution and stream (a context manager)."""
        return representation_noise(
            self.model,
            sigma=self.sigma,
            distribution=self.noise,
            module=self.embeddings,
            generator=self.stream,
        )

    def output(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with self.noised():
            return self.model(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stream.load_state_dict(state)

    def __repr__(self) -> str:
        return f"NoisedInputs(sigma={self.sigma}, noise={self.noise!r})"


class _WeightsTarget(Target):
    """The model with reference weights (:class:`ReferenceWeights`) for its trainable ones."""

    def __init__(self, *, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype

    def bind(self, model: nn.Module) -> None:
        super().bind(model)
        self.reference = ReferenceWeights(model, dtype=self.dtype)

    def output(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.reference.check_live(f"TRAM's {type(self).__name__} target")
        return self.reference.call(args, kwargs)

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reference.load_state_dict(state["reference"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dtype={self.dtype})"


class Pretrained(_WeightsTarget):
    r"""TRAM-θ0: the weights at construction, frozen (:math:`p(\cdot \mid x, \theta_0)`).

    Args:
        dtype: storage dtype of the copy (``torch.bfloat16`` halves it; the reference forward
            then runs under autocast in that dtype).
    """

    name = "pretrained"


class Previous(_WeightsTarget):
    """TRAM-θt−1: the weights before the last base step.

    The snapshot is taken after d is measured and before the base update, so step t compares θt
    with θt−1; at the first step it is θ0 and d = 0.

    Args:
        dtype: storage dtype of the snapshot.
    """

    name = "previous"

    def before_base_step(self) -> None:
        self.reference.copy_from_model()


class EMA(_WeightsTarget):
    r"""An exponential moving average of the weights, :math:`\bar\theta \leftarrow d\,\bar\theta +
    (1 - d)\,\theta` after every base step (a variant the paper's framework admits).

    Args:
        decay: d, the decay of the average.
        dtype: storage dtype of the average.
    """

    name = "ema"

    def __init__(self, *, decay: float = 0.999, dtype: torch.dtype | None = None) -> None:
        super().__init__(dtype=dtype)
        self.decay = check_unit_interval("decay", decay)

    def after_base_step(self) -> None:
        self.reference.update_ema(self.decay)

    def __repr__(self) -> str:
        return f"EMA(decay={self.decay}, dtype={self.dtype})"


TARGETS: dict[str, type[Target]] = {
    cls.name: cls for cls in (NoisedInputs, Pretrained, Previous, EMA)
}
"""The string shorthands of :class:`tram.TRAM`'s ``trust_region`` and their classes."""


def make_target(
    name: str, /, *, aliases: Mapping[str, str] | None = None, **options: Any
) -> Target:
    """The target named ``name`` (a key of :data:`TARGETS`) built with ``options``.

    Options the target does not take raise ``TypeError`` naming them: a setting is never
    silently ignored. ``aliases`` maps an option's name as the caller spelled it to the
    target's own (:class:`tram.TRAM`'s ``ema_decay`` is :class:`EMA`'s ``decay``), so that the
    error names what the caller wrote.
    """
    cls = TARGETS.get(name)
    if cls is None:
        expected = ", ".join(repr(key) for key in TARGETS)
        raise ValueError(f"Invalid trust_region: {name!r}. Expected one of: {expected}")
    aliases = dict(aliases or {})
    own_names = set(inspect.signature(cls.__init__).parameters) - {"self"}
    caller_names = {alias for alias, own in aliases.items() if own in own_names}
    accepted = (own_names - set(aliases.values())) | caller_names
    refuse_unexpected_options(options, accepted, trust_region=name)
    return cls(**{aliases.get(key, key): value for key, value in options.items()})


def refuse_unexpected_options(
    given: Iterable[str], accepted: Iterable[str], *, trust_region: str, why: str = ""
) -> None:
    """Raise ``TypeError`` naming every option in ``given`` that ``trust_region`` does not take."""
    accepted = set(accepted)
    unexpected = sorted(set(given) - accepted)
    if unexpected:
        raise TypeError(
            f"unexpected option {', '.join(unexpected)} of trust_region={trust_region!r}"
            f"{why} (it takes: {', '.join(sorted(accepted)) or 'nothing'})"
        )
