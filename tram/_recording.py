"""How TRAM measures d: the first pass's forward calls, their reference forwards, the divergence.

:class:`ForwardRecorder` hooks the model for the first pass of a step. At the start of each
training forward call it runs the target's reference forward on the same inputs (no gradients,
the call's dropout masks and autocast state, BatchNorm statistics frozen) and keeps the target's
logits; at the end of the call it measures the divergence against the call's output logits and
keeps that 0-dim d only (:class:`tram.TRAM`'s module docstring says why, and what changes for
``replay_dropout=False`` and for models with sharded parameters). :meth:`ForwardRecorder.measure`
averages the calls' d over the step, and over ranks.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tram._auxiliary import in_auxiliary_forward
from tram._checkpointing import checkpoint_phase
from tram._forward_state import buffers_put_back
from tram._model_io import extract_logits, logits_mask, parameters_are_sharded
from tram._parametrize_cache import uncached
from tram.batchnorm import frozen_running_stats
from tram.divergence import forward_kl_rows, get_divergence
from tram.targets import Target

__all__ = ["ForwardRecorder", "chunked_mean_divergence", "parameters_are_sharded"]


@dataclass
class _Replay:
    """How a recorded forward call ran, for its reference forward to run the same way: the RNG
    state before it (its dropout masks) and its autocast state."""

    cpu_rng: Tensor
    cuda_rng: Tensor | None
    autocast: _AutocastState


def _reshard_fsdp2(module: nn.Module) -> None:
    """Free the parameters FSDP2 left gathered after a reference forward.

    ``fully_shard`` keeps the root module's parameters unsharded after its forward (the
    backward needs them at once; ``FSDPModule.reshard`` in
    ``torch/distributed/fsdp/_fully_shard/_fully_shard.py``). The ascent then perturbs the
    sharded parameters, and the second pass's forward would run on the stale gathered θ instead
    of gathering θ+ε. Recognised by name, as :func:`parameters_are_sharded` does.
    """
    for child in module.modules():
        if any(cls.__name__ == "FSDPModule" for cls in type(child).__mro__):
            child.reshard()  # type: ignore[operator]


@dataclass
class _Deferred:
    """A recorded forward call whose d is measured in ``first_step``, from its logits kept until
    then (models with sharded parameters, see :func:`parameters_are_sharded`)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    logits: Tensor
    replay: _Replay


@dataclass
class _Pending:
    """A recorded forward call in progress: its replay and, once run, the target's logits."""

    replay: _Replay
    target_logits: Tensor | None = None


@dataclass(frozen=True)
class _AutocastState:
    """The autocast state a forward ran under, to run the reference forward under the same."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def current(cls, module: nn.Module) -> _AutocastState:
        device_type = next(module.parameters()).device.type
        return cls(
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )

    def context(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


class ForwardRecorder:
    """Records the first pass of a step on ``module`` and measures d of each forward call.

    One recorder per :class:`tram.TRAM`, never replaced: copies of the optimizer's ``__dict__``
    (Lightning's ``LightningOptimizer``) share it, and with it the step's records.

    Args:
        module: the unwrapped model whose forward calls are recorded.
        model: the model as the caller holds it (a DDP, FSDP or compiled wrapper), to tell
            whether its parameters are sharded.
        target: the trust region's target, bound to ``module``.
        divergence: the name of d's divergence (:func:`tram.divergence.get_divergence`).
        replay_dropout: replay each call's dropout masks in its reference forward.
        logits_fn: maps the model's output to its logits (None: a Tensor or ``.logits``).
    """

    def __init__(
        self,
        module: nn.Module,
        model: nn.Module,
        target: Target,
        *,
        divergence: str,
        replay_dropout: bool,
        logits_fn: Callable[[Any], Tensor] | None,
    ) -> None:
        self.module = module
        self.target = target
        self.divergence_name = divergence
        self.divergence = get_divergence(divergence)
        self.replay_dropout = bool(replay_dropout)
        self.logits_fn = logits_fn
        self.measure_during_forward = not parameters_are_sharded(model, module)
        # [d, count] of each recorded forward call (float32), or a deferred call to measure.
        self.records: list[Tensor | _Deferred] = []
        self.in_reference = False

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Hook the module for one first pass: d of each training forward call goes to
        :attr:`records` (or the call itself, when d must wait for ``first_step``)."""
        pending: list[_Pending] = []
        during_forward = self.measure_during_forward
        # The target's state before its first reference forward of this pass (the count
        # of noise draws): a pass that fails is rolled back to it, so that the next step draws
        # what it would have drawn had the failed one never run.
        rollback: list[dict[str, Any]] = []

        def target_logits(args: Any, kwargs: Any, replay: _Replay) -> Tensor:
            if not rollback:
                rollback.append(self.target.state_dict())
            return self.target_logits(args, kwargs, replay)

        def records_this_call(module: nn.Module) -> bool:
            return (
                module.training
                and torch.is_grad_enabled()
                and not self.in_reference
                and not in_auxiliary_forward()
                and not _recomputed_after_recording()
            )

        def before_forward(module: nn.Module, args: Any, kwargs: Any) -> None:
            if not records_this_call(module):
                return
            cpu_rng, cuda_rng = capture_rng(module)
            entry = _Pending(_Replay(cpu_rng, cuda_rng, _AutocastState.current(module)))
            if during_forward and self.replay_dropout:
                # Before the forward, while its activations do not exist yet: the target's
                # logits are then the only logits-sized tensor TRAM holds, and only until d is
                # measured at the end of this forward.
                entry.target_logits = target_logits(args, kwargs, entry.replay)
            pending.append(entry)

        def after_forward(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if not records_this_call(module) or not pending:
                return
            entry = pending.pop()
            logits = extract_logits(output, self.logits_fn).detach()
            if not during_forward:
                self.records.append(_Deferred(tuple(args), dict(kwargs), logits, entry.replay))
                return
            target, entry.target_logits = entry.target_logits, None
            if target is None:
                # replay_dropout=False: fresh masks from the training stream after this forward,
                # where the reference forward drew them when it ran in first_step.
                target = target_logits(args, kwargs, entry.replay)
            self.records.append(self.divergence_of(target, logits, self.named_inputs(args, kwargs)))

        handles = [
            self.module.register_forward_pre_hook(before_forward, with_kwargs=True),
            self.module.register_forward_hook(after_forward, with_kwargs=True),
        ]
        try:
            yield
        except BaseException:
            # A failed first pass is never measured: its records must not leak into the next.
            self.records.clear()
            if rollback:
                self.target.load_state_dict(rollback[0])
            raise
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def measure(self, *, synchronise: bool) -> float:
        """d over the recorded calls: the mean over all the examples (or tokens) they measured,
        over every rank's calls if ``synchronise``."""
        values = [
            self.divergence_of(
                self.target_logits(record.args, record.kwargs, record.replay),
                record.logits,
                self.named_inputs(record.args, record.kwargs),
            )
            if isinstance(record, _Deferred)
            else record
            for record in self.records
        ]
        if any(isinstance(record, _Deferred) for record in self.records):
            _reshard_fsdp2(self.module)
        measured = torch.stack(values)
        distributed = dist.is_available() and dist.is_initialized()
        synchronised = synchronise and distributed and dist.get_world_size() > 1
        if len(values) == 1 and not synchronised:
            # The one call's d as it is: (d · n) / n would not always give back its bits.
            return _non_negative(float(measured[0, 0].item()))
        # Weighted by the examples (or tokens) each call measured d over: a window of
        # micro-batches, or the ranks' shards, give the d of the whole batch.
        totals = torch.stack([(measured[:, 0] * measured[:, 1]).sum(), measured[:, 1].sum()])
        if synchronised:
            _require_every_rank(totals.device)
            dist.all_reduce(totals)
        return _non_negative(float((totals[0] / totals[1].clamp_min(1.0)).item()))

    def named_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """A recorded call's inputs by parameter name, positional ones included: the padding
        mask of ``model(input_ids, attention_mask)`` is found as that of the keyword call."""
        if not args:
            return kwargs
        try:
            signature = inspect.signature(self.module.forward)
            bound = signature.bind_partial(*args, **kwargs)
        except (TypeError, ValueError):  # no signature, or one that does not take the call
            return kwargs
        named = dict(bound.arguments)
        for name, parameter in signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in named:
                named.update(named.pop(name))
        return named

    @torch.no_grad()
    def divergence_of(self, target: Tensor, logits: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """d of one recorded call and what it is a mean over: ``[d, count]`` in float32, the
        divergence of its ``logits`` from the ``target``'s and the number of examples (or
        counted tokens) it averages."""
        if target.shape != logits.shape:
            raise ValueError(
                "the reference logits and the recorded logits must have the same shape, but got "
                f"{tuple(target.shape)} and {tuple(logits.shape)}"
            )
        mask = logits_mask(kwargs, logits)
        rows = logits.shape[:-1].numel()
        count = (
            torch.tensor(float(rows), device=logits.device) if mask is None else mask.sum().float()
        )
        if self.divergence_name == "mmd":  # set-level: cannot be split over positions
            value = self.divergence(target, logits, mask=mask).float()
        else:
            value = chunked_mean_divergence(
                self.divergence,
                target,
                logits,
                mask,
                forward_kl=self.divergence_name == "forward_kl",
            )
        return torch.stack([value, count.to(value.device)])

    @torch.no_grad()
    def target_logits(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], replay: _Replay
    ) -> Tensor:
        """The target's logits on a recorded call's inputs.

        The reference forward runs like the recorded forward (train mode, the same autocast
        state, the same dropout masks unless ``replay_dropout=False``) except that BatchNorm
        running statistics are not updated, and any other buffer it writes (a spectral norm's
        power-iteration vectors) is put back after it: the training forward that follows finds
        the model's state as without TRAM (:mod:`tram._forward_state`).
        """
        self.in_reference = True
        try:
            with contextlib.ExitStack() as stack:
                if self.replay_dropout:
                    devices = [] if replay.cuda_rng is None else [_cuda_device(self.module)]
                    stack.enter_context(torch.random.fork_rng(devices=devices))
                    torch.set_rng_state(replay.cpu_rng)
                    if replay.cuda_rng is not None:
                        torch.cuda.set_rng_state(replay.cuda_rng, devices[0])
                stack.enter_context(frozen_running_stats(self.module))
                stack.enter_context(buffers_put_back(self.module))
                stack.enter_context(replay.autocast.context())
                # The target's weights, not the training forward's cached ones, and nothing
                # cached for the training forward that follows to reuse.
                stack.enter_context(uncached())
                output = self.target.output(tuple(args), dict(kwargs))
                return extract_logits(output, self.logits_fn).detach()
        finally:
            self.in_reference = False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["records"] = []  # references to live tensors of a step in progress
        state["in_reference"] = False
        return state


_CHUNK_ELEMENTS = 1 << 16
"""Logit elements per chunk of the divergence (256 KiB in fp32), unless that makes more than
:data:`_MAX_CHUNKS` chunks: bounds its float32 temporaries, which are several times the logits
for a language model's [B, T, vocabulary] output. d is measured at the end of the recorded
forward, where the step's activations are all alive, so its temporaries add to the step's peak
(for the forward KL two buffers of a chunk, or of a 64th of the logits when that is larger:
0.01 x the parameters of the benchmarks' 14M-parameter Llama). On a CPU the time of d does not
depend on the chunk size down to this one."""

_MAX_CHUNKS = 64
"""At most this many chunks (larger ones beyond): each costs a few kernel launches on a GPU."""


def chunked_mean_divergence(
    divergence: Callable[..., Tensor],
    target: Tensor,
    logits: Tensor,
    mask: Tensor | None,
    *,
    forward_kl: bool = False,
) -> Tensor:
    """A per-position divergence averaged over the counted positions, computed in chunks.

    Equal to ``divergence(target, logits, mask=mask)`` for divergences that are a mean over
    positions (KL, JS, L2), with temporaries bounded by :data:`_CHUNK_ELEMENTS` (or a
    :data:`_MAX_CHUNKS`-th of the logits, whichever is larger). The forward KL
    (``forward_kl=True``: ``divergence`` is TRAM's default d) without gradients goes through
    :func:`~tram.divergence.forward_kl_rows`, two in-place buffers per chunk.
    """
    classes = logits.shape[-1]
    target = target.reshape(-1, classes)
    logits = logits.reshape(-1, classes)
    counted = None if mask is None else mask.reshape(-1) != 0
    rows = max(1, _CHUNK_ELEMENTS // classes, -(-logits.shape[0] // _MAX_CHUNKS))
    in_place = forward_kl and not torch.is_grad_enabled()
    if logits.shape[0] <= rows and not in_place:
        return divergence(target, logits, mask=counted).float()
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    count = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], rows):
        chunk = slice(start, start + rows)
        chunk_mask = None if counted is None else counted[chunk]
        chunk_count = (
            float(logits[chunk].shape[0]) if chunk_mask is None else chunk_mask.sum().float()
        )
        if in_place:
            per_row = forward_kl_rows(target[chunk], logits[chunk])
            if chunk_mask is not None:
                per_row = torch.where(chunk_mask, per_row, 0.0)
            total = total + per_row.sum()
        else:
            value = divergence(target[chunk], logits[chunk], mask=chunk_mask).float()
            total = total + value * chunk_count
        count = count + chunk_count
    return total / count.clamp_min(1.0)


def _recomputed_after_recording() -> bool:
    """Whether this forward is the backward's recomputation of a checkpointed forward that was
    recorded already (``torch.utils.checkpoint`` around the whole model, ``use_reentrant=False``):
    recorded again, it would count its d twice and draw the noise target's noise twice. Under
    ``use_reentrant=True`` the first run had gradients disabled and was not recorded, so its
    recomputation is (with the same dropout masks: checkpoint restores the RNG state)."""
    return checkpoint_phase() == ("recomputation", False)


def _require_every_rank(device: torch.device) -> None:
    """Raise unless every rank of the default process group is about to all-reduce d too.

    Under ``torch.distributed.algorithms.join.Join`` (``DistributedDataParallel.join()``,
    accelerate's ``join_uneven_inputs``) a rank that has run out of inputs shadows the
    collectives of the ranks still training: the ones DDP registers for its forward and
    backward, not TRAM's all-reduce of d. That all-reduce would pair with the joined rank's own
    all-reduce of how many ranks are left (a one-element float32 tensor) and wait forever, or,
    on a backend that does not check sizes, read a wrong d. So each rank first all-reduces a
    one-element float32 1, the shape of that count: a joined rank adds 0, and the ranks still
    training see fewer than the world size and raise. Every rank of an even run calls this
    once per measured step, so the extra collective always pairs with its twin.
    """
    present = torch.ones(1, device=device)
    dist.all_reduce(present)
    ranks, world_size = round(float(present.item())), dist.get_world_size()
    if ranks != world_size:
        raise RuntimeError(
            f"TRAM's synchronised ascent all-reduces d over every rank, but {world_size - ranks} "
            f"of the {world_size} ranks stopped stepping: they ran out of inputs under "
            "torch.distributed.algorithms.join.Join (DistributedDataParallel.join(), "
            "accelerate's join_uneven_inputs), which shadows DDP's collectives but not TRAM's. "
            "Give every rank as many batches (DistributedSampler(drop_last=True), accelerate's "
            "even_batches=True), build TRAM with local_ascent=True (each rank measures d on its "
            "own shard, with no collective), or pass throw_on_early_termination=True to Join to "
            "stop every rank when one runs out"
        )


def _non_negative(radius: float) -> float:
    """A divergence is ≥ 0, but its float32 sum at the noise floor (target ≈ model) can come
    out a hair below 0, and a negative radius would turn the ascent into a descent: 0 then.
    nan stays nan (the ascent is skipped)."""
    return 0.0 if radius < 0 else radius


def _cuda_device(module: nn.Module) -> int:
    device = next(module.parameters()).device
    return device.index if device.index is not None else torch.cuda.current_device()


def capture_rng(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    cpu_state = torch.get_rng_state()
    device = next(module.parameters()).device
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return cpu_state, cuda_state
