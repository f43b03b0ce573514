r"""TRAM: Trust Region Aware Minimization (Sherborne, Saphra, Dasigi, Peng; ICLR 2024).

TRAM is ASAM whose radius is measured, at every step, in function space:

.. math::

    d = \mathbb{E}_x\, \mathrm{KL}\big(p(\cdot \mid \text{target})
        \,\Vert\, p(\cdot \mid x, \theta_t)\big),
    \qquad
    \epsilon = d \, \frac{T^2 \nabla L(\theta_t)}{\lVert T \nabla L(\theta_t) \rVert_2},
    \quad T = |\theta_t| + \eta

(paper Eq. 4, 5 and 7; Algorithm 1), then the base optimizer steps with
:math:`\nabla L(\theta+\epsilon)`.

How this implementation works, and the choices made where the paper is silent:

- **Same closure as SAM.** TRAM hooks the model's forward calls in the first pass (inside
  :meth:`TRAM.first_pass`, which ``step(closure)`` enters itself). At the start of each such call
  it runs the reference forward on the *same inputs* under ``no_grad`` and keeps the target's
  logits; at its end it measures d against the call's output logits and keeps d alone. The
  caller's batch is never modified (the paper's release overwrote it with noised embeddings).
- **No copy of the logits is held through the backward.** The target's logits exist from the
  start of the recorded forward to its end only; the model's own logits are not kept at all
  (the paper's algorithm, and this implementation before, kept them until the ascent, a
  ``B x T x vocabulary`` tensor through the whole first backward). The reference forward runs
  first, while the forward's activations do not exist yet, so the step's peak memory is that
  of SAM plus the divergence's chunk buffers. With ``replay_dropout=False`` the reference
  forward runs at the end of the recorded forward instead (its fresh masks come from the training
  stream after that forward, as they always have), so the target's logits then add to the
  activations at the peak. Models whose parameters are sharded (FSDP, DeepSpeed), whose forward
  must not be re-entered, keep their logits until ``first_step`` and run the reference forward
  there.
- **d** is the mean forward KL(target ‖ current), in float32, per example for classification
  logits and per non-padding token (``attention_mask``, by keyword or by position, else
  ``labels != -100``) for language-model logits. With several recorded forwards (gradient
  accumulation) it is the mean over all their examples or tokens, and under
  ``torch.distributed`` (synchronised ascent) over every rank's: a window of micro-batches, or
  the ranks' shards, measure the d of the whole batch (the Trainer's loss too is normalised by
  the window's token count). It is detached; it is a radius, not a loss. That all-reduce is not
  one of DDP's, which ``torch.distributed.algorithms.join.Join`` shadows for a rank out of
  inputs: once a rank has joined, the others refuse the step (``local_ascent=True`` has no
  collective of its own and trains under ``Join``).
  Optionally clipped to ``max_radius`` (the paper assumes d ≤ ρ_ASAM but does not clip). A
  non-finite d skips the ascent.
- **Dropout is not the trust region.** By default the reference forward replays the dropout masks
  of the recorded forward (the RNG state is captured before it and restored for the reference
  pass, and the training stream is put back afterwards), and the input noise comes from TRAM's
  own seeded stream. Then d = 0 exactly when the target equals the model (σ = 0, or θt−1 at the
  first step), and d measures the trust region only. Measured on all-MiniLM-L6-v2 with dropout
  0.1 and σ = 0.01, about 95% of an unreplayed d came from dropout. ``replay_dropout=False``
  gives the paper's behaviour (fresh masks for the reference pass).
- **The ascent** is Eq. 7 with the gradient (the paper's release ignored it), in the ASAM form
  with ``eta = 0`` by default (the paper's pure :math:`|\theta|`; ASAM's code uses 0.01), or the
  SAM form with ``adaptive=False``.
- **Targets** are objects (:mod:`tram.targets`) that own their reference forward, their state
  and their checkpoint: :class:`~tram.targets.NoisedInputs` (TRAM-x, ``"noise"``),
  :class:`~tram.targets.Pretrained` (TRAM-θ0, ``"pretrained"``), :class:`~tram.targets.Previous`
  (TRAM-θt−1, ``"previous"``, the snapshot taken after d is measured and before the base update)
  and :class:`~tram.targets.EMA` (``"ema"``), or a user's subclass of
  :class:`~tram.targets.Target`. The strings are shorthands with the same options.
- **TRAM-Fisher** (Algorithm 2) measures no divergence; it is its own class,
  :class:`tram.TRAMFisher`. ``TRAM(..., trust_region="fisher")`` builds one.

Cost per step: 3 forward and 2 backward passes; SAM (and TRAM-Fisher) 2 and 2.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from tram._ascent import Scaling
from tram._recording import ForwardRecorder
from tram._validation import check_non_negative, check_positive_int, check_unit_interval
from tram._wrapper import TwoPassOptimizer
from tram.noise import NoiseDistribution
from tram.targets import (
    TARGETS,
    ReferenceWeights,
    Target,
    make_target,
    unwrap_model,
)

__all__ = ["TRAM", "TRUST_REGIONS"]

TrustRegion = Literal["noise", "pretrained", "previous", "ema", "fisher"]
TRUST_REGIONS: tuple[str, ...] = ("noise", "pretrained", "previous", "ema", "fisher")


class _RadiusState:
    """TRAM's state across steps, in one object shared by copies of the optimizer's ``__dict__``
    (see :class:`tram._step_state._StepState` for why)."""

    __slots__ = ("last_radius", "last_radius_per_rank", "radius_history", "restored")

    def __init__(self) -> None:
        self.last_radius: float | None = None
        # Whether last_radius is this rank's own d: measured under local_ascent in a group of
        # several ranks, where every rank measures its own.
        self.last_radius_per_rank = False
        self.radius_history: list[float] = []
        # (parameter, backup, their versions) of the last restore(): see TRAM.restore.
        self.restored: list[tuple[Tensor, Tensor, int, int]] = []


class TRAM(TwoPassOptimizer):
    """Trust Region Aware Minimization around any optimizer (see the module docstring).

    Example::

        base = torch.optim.AdamW(model.parameters(), lr=2e-5)
        optimizer = tram.TRAM(base, model, target=tram.targets.NoisedInputs(sigma=0.1))
        # the same: tram.TRAM(base, model, trust_region="noise", sigma=0.1)

        def closure():
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            return loss

        loss = optimizer.step(closure)          # 3 forwards, 2 backwards
        print(optimizer.last_radius)            # d of this step

    Args:
        base_optimizer: the optimizer instance to wrap.
        model: the model being trained (a DDP or ``torch.compile`` wrapper is unwrapped for
            hooks and references).
        target: what d is measured against: a :class:`tram.targets.Target` (bound to ``model``
            here; one target per optimizer), or the name of one (the same as ``trust_region``).
        trust_region: the shorthand: ``"noise"`` (the default), ``"pretrained"``,
            ``"previous"``, ``"ema"``, or ``"fisher"`` (which builds a :class:`tram.TRAMFisher`).
        sigma, noise, embeddings, seed: options of ``"noise"``
            (:class:`~tram.targets.NoisedInputs`); with ``"fisher"``, of its noised pass.
        ema_decay: the decay of ``"ema"``.
        reference_dtype: storage dtype of the reference weights of ``"pretrained"``,
            ``"previous"`` and ``"ema"`` (e.g. ``torch.bfloat16``). The reference forward then
            runs in that dtype, so d carries its rounding: measured at about 1.6e-5 with the
            target equal to the model (O(1) logits), against a θt−1 d of 5e-5 to 1e-4 at
            lr 2e-5. Keep the default for TRAM-θt−1 at small learning rates.
        rho, fisher_eta: with ``"fisher"`` only: :class:`tram.TRAMFisher`'s ``rho`` and ``eta``.
        divergence: how d is measured (see :func:`tram.divergence.get_divergence`); the paper
            uses forward KL and ablates MMD and L2.
        adaptive: ASAM form (default) or SAM form of Eq. 7.
        eta: η of the ASAM operator ``T = |θ| + η`` (0 in the paper).
        max_radius: clip d to this value (no clipping by default, as in the paper).
        radius_every: measure d on every ``radius_every``-th ascent only and reuse the last d on
            the ascents in between, whose first pass is not recorded and which run no reference
            forward: they cost what an ASAM step costs. 1 (the default, the paper) measures d at
            every ascent. A departure from the paper. d is noisy from batch to batch (about a
            third from one step to the next on the repository's benchmark budgets) and a reused
            d is off the d of its own step by about as much; 8 brings the step within 1.05 x
            SAM's with no out-of-domain loss measured on those budgets, but with a hint of one in
            domain on the longer one (README, "Cost of a step"). The reused d is checkpointed;
            with ``local_ascent=True`` in a group of several ranks each rank reuses its own,
            which rank 0's checkpoint does not hold: a run resumed in a group then measures d
            afresh on every rank at its first ascent instead of reusing another rank's.
        replay_dropout: replay the recorded forward's dropout masks in the reference pass.
        logits_fn: maps the model's output to its logits when it is neither a Tensor nor has
            ``.logits``.
        ascent_every, local_ascent, foreach: see :class:`tram.TwoPassOptimizer`.

    Options of another trust region than the one chosen raise ``TypeError``; none is ignored.

    Attributes:
        target: the :class:`~tram.targets.Target`.
        last_radius: d of the last ascent (after clipping), for logging.
        radius_history: every d measured, in order.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is TRAM and "fisher" in (kwargs.get("trust_region"), kwargs.get("target")):
            from tram._tram_fisher import TRAMFisher

            return TRAMFisher.from_tram_arguments(*args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        base_optimizer: Optimizer,
        model: nn.Module,
        *,
        target: Target | str | None = None,
        trust_region: TrustRegion | None = None,
        sigma: float | None = None,
        noise: NoiseDistribution | None = None,
        embeddings: nn.Module | str | None = None,
        seed: int | None = None,
        ema_decay: float | None = None,
        reference_dtype: torch.dtype | None = None,
        rho: float | None = None,
        fisher_eta: float | None = None,
        divergence: str = "forward_kl",
        adaptive: bool = True,
        eta: float = 0.0,
        max_radius: float | None = None,
        radius_every: int = 1,
        replay_dropout: bool = True,
        logits_fn: Callable[[Any], Tensor] | None = None,
        ascent_every: int = 1,
        local_ascent: bool = False,
        foreach: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
        for name, value in (("rho", rho), ("fisher_eta", fisher_eta)):
            if value is not None:
                raise TypeError(
                    f"{name} is an option of trust_region='fisher' (tram.TRAMFisher) only"
                )
        shorthand_options = {
            "sigma": sigma,
            "noise": noise,
            "embeddings": embeddings,
            "seed": seed,
            "ema_decay": ema_decay,
            "reference_dtype": reference_dtype,
        }
        resolved = _resolve_target(target, trust_region, shorthand_options)
        if max_radius is not None:
            max_radius = check_non_negative("max_radius", max_radius)
        self.max_radius = max_radius
        self.radius_every = check_positive_int("radius_every", radius_every)
        self.adaptive = bool(adaptive)
        self.module = unwrap_model(model)
        super().__init__(
            base_optimizer,
            {"eta": eta},
            model=model,
            ascent_every=ascent_every,
            local_ascent=local_ascent,
            foreach=foreach,
        )
        resolved.bind(self.module)
        self._radius_state = _RadiusState()
        self.recorder = ForwardRecorder(
            self.module,
            model,
            resolved,
            divergence=divergence,
            replay_dropout=replay_dropout,
            logits_fn=logits_fn,
        )

    # ------------------------------------------------------------------ views
    @property
    def target(self) -> Target:
        """The :class:`~tram.targets.Target` d is measured against (fixed at construction)."""
        return self.recorder.target

    @property
    def trust_region(self) -> str:
        """The target's name (``"noise"``, ``"pretrained"``, ... or a user target's ``name``)."""
        return self.target.name

    @property
    def reference(self) -> ReferenceWeights | None:
        """The target's reference weights, for the targets that hold some."""
        reference = getattr(self.target, "reference", None)
        return reference if isinstance(reference, ReferenceWeights) else None

    @property
    def embeddings(self) -> nn.Module | None:
        """Where the target's noise goes, for the noised-input target."""
        return getattr(self.target, "embeddings", None)

    @property
    def last_radius(self) -> float | None:
        """d of the last ascent (after clipping), for logging."""
        return self._radius_state.last_radius

    @property
    def radius_history(self) -> list[float]:
        """Every d measured, in order."""
        return self._radius_state.radius_history

    @property
    def _records(self) -> list[Any]:
        return self.recorder.records

    @property
    def divergence_name(self) -> str:
        """The name of d's divergence (``divergence=``)."""
        return self.recorder.divergence_name

    @property
    def divergence(self) -> Callable[..., Tensor]:
        """d's divergence function."""
        return self.recorder.divergence

    @property
    def replay_dropout(self) -> bool:
        """Whether the reference forward replays the recorded forward's dropout masks."""
        return self.recorder.replay_dropout

    @property
    def logits_fn(self) -> Callable[[Any], Tensor] | None:
        """``logits_fn=``: maps the model's output to its logits."""
        return self.recorder.logits_fn

    # ------------------------------------------------------------------ hyperparameters
    def _validate_group(self, group: dict[str, Any]) -> None:
        check_non_negative("eta", group["eta"])
        if "rho" in group and "rho" not in self.base_optimizer.defaults:
            raise ValueError(
                f"Invalid param group: it sets rho={group['rho']!r}, but TRAM measures its radius "
                "(d) at every step and has no rho; leave a group out of the ascent by leaving "
                "it out of the optimizer, or use tram.ASAM for a fixed radius"
            )

    def _scaling(self, group: dict[str, Any], param: Tensor) -> tuple[Scaling, float]:
        if self.adaptive:
            return "adaptive", check_non_negative("eta", group["eta"])
        return "identity", 0.0

    # ------------------------------------------------------------------ the first pass
    @property
    def records_first_pass(self) -> bool:
        """True when the coming step's first pass is recorded to measure d: an ascent step on
        which ``radius_every`` measures. On other steps ``first_pass()`` records nothing."""
        return self.ascent_due and self._measurement_due()

    def _observe_first_pass(self) -> contextlib.AbstractContextManager[Any]:
        if not self.records_first_pass:
            return contextlib.nullcontext()
        return self.recorder.recording()

    def _forget_first_passes(self) -> None:
        self._records.clear()

    def _measurement_due(self) -> bool:
        """Whether this step's ascent measures d (always, unless ``radius_every > 1``)."""
        if self.last_radius is None:
            return True
        return self.steps % (self.ascent_every * self.radius_every) == 0

    # ------------------------------------------------------------------ the radius
    def _radii(self) -> list[float] | None:
        reused = self.last_radius
        if not self._measurement_due() and reused is not None:
            self._records.clear()
            return [reused] * len(self.param_groups)
        if not self._records:
            raise RuntimeError(
                "TRAM.first_step() found no recorded forward pass: run the first forward and "
                "backward inside `with optimizer.first_pass():`, or use optimizer.step(closure)"
            )
        try:
            radius = self.measure_radius()
        finally:
            self._records.clear()
        if not math.isfinite(radius):
            return None
        if self.max_radius is not None:
            radius = min(radius, self.max_radius)
        self._radius_state.last_radius = radius
        self._radius_state.last_radius_per_rank = self.local_ascent and _world_size() > 1
        self.radius_history.append(radius)
        return [radius] * len(self.param_groups)

    @torch.no_grad()
    def measure_radius(self) -> float:
        """d over the recorded forwards: the mean over their examples or tokens, over every rank's
        in synchronised mode."""
        return self.recorder.measure(synchronise=not self.local_ascent)

    # ------------------------------------------------------------------ the target over time
    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved weights θ back (see :meth:`TwoPassOptimizer.restore`).

        It also notes which backups now equal their weights bit for bit, and the version
        counters of both (every in-place write bumps them): until either changes, a backup is a
        copy of θt that the target may take instead of copying the weights again
        (:meth:`_before_base_step`).
        """
        perturbed = [
            (param, backup)
            for bucket in self._step_state.perturbed_buckets
            for param, backup in zip(bucket.params, bucket.backups, strict=True)
        ]
        super().restore()
        if perturbed:
            self._radius_state.restored = [
                (param, backup, param._version, backup._version) for param, backup in perturbed
            ]

    def _before_base_step(self) -> None:
        self._records.clear()
        restored, self._radius_state.restored = self._radius_state.restored, []
        reference = self.reference
        if reference is not None:
            reference.track_trainable()  # a parameter unfrozen this step, before its update
        if reference is None or not restored:
            self.target.before_base_step()
            return
        # θt−1's snapshot takes the backups' storage instead of copying θt (the backups are
        # scratch space, written afresh by the next ascent before they are read). A weight or
        # backup written since the restore, a step without an ascent, and a reference of
        # another dtype are copied as before.
        copies = {
            param: backup
            for param, backup, param_version, backup_version in restored
            if param._version == param_version and backup._version == backup_version
        }
        with reference.spare_copies(copies):
            self.target.before_base_step()

    def _after_base_step(self) -> None:
        self.target.after_base_step()

    # ------------------------------------------------------------------ checkpoints
    def _extra_state(self) -> dict[str, Any]:
        # The target's keys at the top level ("noise_draws", "reference"), as before targets
        # were objects: checkpoints load both ways.
        state = {"target": self._target_identity(), **self.target.state_dict()}
        if self.radius_every > 1:  # the d reused until the next measurement
            state["last_radius"] = self.last_radius
            state["last_radius_per_rank"] = self._radius_state.last_radius_per_rank
        return state

    def _target_identity(self) -> str:
        """The target's name in checkpoints; a subclass that keeps :class:`Target`'s default
        name is told apart by its class name, so that two such targets never load each
        other's state."""
        name = self.target.name
        return f"{name}:{type(self.target).__qualname__}" if name == Target.name else name

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        saved_name = state.get("target")
        if saved_name is not None and saved_name not in (self._target_identity(), Target.name):
            raise ValueError(
                f"Invalid state_dict: it was saved by TRAM with the {saved_name!r} target, and "
                f"this TRAM's target is {self._target_identity()!r}; a reference cannot be carried "
                "over to another target"
            )
        own = self.target.state_dict()
        missing = sorted(
            key for key in own if key not in state and key not in self.target.optional_state
        )
        if missing:
            raise ValueError(
                f"Invalid state_dict: the {self.target.name!r} target's state ("
                f"{', '.join(missing)}) is missing from its 'tram' entry, so its reference "
                "would silently stay the one built at construction. Load a state dict saved "
                "by TRAM with this target, or load the base optimizer's state alone with "
                "optimizer.base_optimizer.load_state_dict(...)"
            )
        last_radius = self.last_radius
        per_rank = self._radius_state.last_radius_per_rank
        if "last_radius" in state:
            value = state["last_radius"]
            last_radius = None if value is None else float(value)
            per_rank = _flag("last_radius_per_rank", state.get("last_radius_per_rank", False))
            if per_rank and _world_size() > 1:
                # The saving rank's own d (rank 0's, in the usual checkpoint): no other rank's
                # to reuse. Every rank measures afresh, which also keeps their noise draws in
                # step.
                last_radius, per_rank = None, False
        if own:
            self.target.load_state_dict({key: state[key] for key in own if key in state})
        self._radius_state.last_radius = last_radius
        self._radius_state.last_radius_per_rank = per_rank

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        recording = _RadiusState()
        recording.last_radius = self.last_radius
        recording.last_radius_per_rank = self._radius_state.last_radius_per_rank
        recording.radius_history = list(self.radius_history)
        state["_radius_state"] = recording
        return state


def _world_size() -> int:
    """The number of ranks in the default process group; 1 without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _flag(key: str, value: Any) -> bool:
    """A checkpointed boolean (a one-element tensor from torch.distributed.checkpoint too)."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, bool):
        raise ValueError(f"Invalid state_dict: '{key}' must be True or False, but got {value!r}")
    return value


def _resolve_target(
    target: Target | str | None, trust_region: str | None, options: dict[str, Any]
) -> Target:
    """The target object from ``target=`` or the ``trust_region=`` shorthand and its options."""
    given = {key: value for key, value in options.items() if value is not None}
    if isinstance(target, Target):
        if trust_region is not None or given:
            extra = ["trust_region"] if trust_region is not None else []
            raise TypeError(
                f"target= is a {type(target).__name__} object; configure it there, not with "
                f"{', '.join(extra + sorted(given))}"
            )
        return target
    if target is not None and not isinstance(target, str):
        raise TypeError(
            f"target must be a tram.targets.Target or a name, but got {type(target).__name__}"
        )
    if target is not None and trust_region is not None and target != trust_region:
        raise ValueError(f"target={target!r} and trust_region={trust_region!r} disagree")
    name = target or trust_region or "noise"
    if name not in TARGETS:
        expected = ", ".join(repr(region) for region in TRUST_REGIONS)
        raise ValueError(f"Invalid trust_region: {name!r}. Expected one of: {expected}")
    if "ema_decay" in given:
        check_unit_interval("ema_decay", given["ema_decay"])
    return make_target(name, aliases=_OPTION_ALIASES, **given)


_OPTION_ALIASES = {"ema_decay": "decay", "reference_dtype": "dtype"}
"""TRAM's names of target options that the target objects spell otherwise."""
