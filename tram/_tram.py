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

- **Same closure as SAM.** TRAM records the model's forward calls in the first pass (inside
  :meth:`TRAM.first_pass`, which ``step(closure)`` enters itself): their inputs, their output
  logits (detached) and the RNG state before each. In :meth:`first_step` it runs the reference
  forward on the *same inputs* under ``no_grad`` and measures d. The caller's batch is never
  modified (the paper's release overwrote it with noised embeddings).
- **d** is the mean forward KL(target ‖ current), in float32, per example for classification
  logits and per non-padding token (``attention_mask``, else ``labels != -100``) for
  language-model logits; with several recorded forwards (gradient accumulation) it is their mean,
  and under ``torch.distributed`` (synchronised ascent) the mean over ranks. It is detached; it
  is a radius, not a loss. Optionally clipped to ``max_radius`` (the paper assumes d ≤ ρ_ASAM but
  does not clip). A non-finite d skips the ascent.
- **Dropout is not the trust region.** By default the reference forward replays the dropout masks
  of the recorded forward (the RNG state is captured before it and restored for the reference
  pass, and the training stream is put back afterwards), and the input noise comes from TRAM's
  own generator. Then d = 0 exactly when the target equals the model (σ = 0, or θt−1 at the first
  step), and d measures the trust region only. Measured on all-MiniLM-L6-v2 with dropout 0.1 and
  σ = 0.01, about 95% of an unreplayed d came from dropout. ``replay_dropout=False`` gives the
  paper's behaviour (fresh masks for the reference pass).
- **The ascent** is Eq. 7 with the gradient (the paper's release ignored it), in the ASAM form
  with ``eta = 0`` by default (the paper's pure :math:`|\theta|`; ASAM's code uses 0.01), or the
  SAM form with ``adaptive=False``.
- **Targets**:

  - ``"noise"`` (TRAM-x): the current model on input embeddings noised by
    :math:`z \sim \mathcal{N}(0, \sigma^2)` (or uniform), through the representation noise hook
    on the token-embedding output. The paper gives no σ; the default 0.1 is its R3F value.
  - ``"pretrained"`` (TRAM-θ0): the weights at construction, frozen.
  - ``"previous"`` (TRAM-θt−1): a snapshot of θt taken after d is measured and before the base
    update (so step t compares θt with θt−1); at the first step it is θ0 and d = 0.
  - ``"ema"``: an exponential moving average of the weights, updated after each base step.
  - ``"fisher"`` (TRAM-Fisher, Algorithm 2): no reference forward. The first pass itself runs on
    noised embeddings x+z, and its gradient g̃ gives both the direction and the diagonal Fisher
    g̃², with the Fisher SAM ascent ε = ρ (g̃/(1+ηg̃²)) / √(Σ g̃²/(1+ηg̃²)), ρ = 0.1, η = 0.1
    (the FSAM values). This is the reading of the paper's ambiguous Algorithm 2 that keeps its
    stated cost of 2 forward and 2 backward passes; the loss it returns is the noised one.

  Reference weights cover the trainable parameters only (frozen ones and buffers are shared with
  the live model) and run through ``torch.func.functional_call``; ``reference_dtype=torch.bfloat16``
  halves their memory (the reference forward then runs under autocast).

Cost per step: 3 forward and 2 backward passes (TRAM-Fisher: 2 and 2); SAM is 2 and 2.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from tram._ascent import Scaling
from tram._wrapper import TwoPassOptimizer, check_non_negative
from tram.batchnorm import frozen_running_stats
from tram.divergence import forward_kl_rows, get_divergence
from tram.noise import NoiseDistribution, representation_noise, resolve_module
from tram.targets import ReferenceWeights, extract_logits, logits_mask, unwrap_model

__all__ = ["TRAM", "TRUST_REGIONS"]

TrustRegion = Literal["noise", "pretrained", "previous", "ema", "fisher"]
TRUST_REGIONS: tuple[str, ...] = ("noise", "pretrained", "previous", "ema", "fisher")


@dataclass
class _Record:
    """One recorded forward call of the first pass."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    logits: Tensor
    cpu_rng: Tensor
    cuda_rng: Tensor | None
    autocast: _AutocastState


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


class _RecordingState:
    """TRAM's per-step state, in one object shared by copies of the optimizer's ``__dict__``
    (see :class:`tram._wrapper._StepState` for why)."""

    __slots__ = ("in_reference", "last_radius", "radius_history", "records")

    def __init__(self) -> None:
        self.records: list[_Record] = []
        self.in_reference = False
        self.last_radius: float | None = None
        self.radius_history: list[float] = []


class TRAM(TwoPassOptimizer):
    """Trust Region Aware Minimization around any optimizer (see the module docstring).

    Example::

        base = torch.optim.AdamW(model.parameters(), lr=2e-5)
        optimizer = tram.TRAM(base, model, trust_region="noise", sigma=0.1)

        def closure():
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            return loss

        loss = optimizer.step(closure)          # 3 forwards, 2 backwards
        print(optimizer.last_radius)            # d of this step

    Args:
        base_optimizer: the optimizer instance to wrap.
        model: the model being trained (a DDP wrapper is unwrapped for hooks and references).
        trust_region: ``"noise"``, ``"pretrained"``, ``"previous"``, ``"ema"`` or ``"fisher"``.
        sigma: noise scale σ for ``"noise"`` and ``"fisher"`` (standard deviation, or half-width
            for uniform noise).
        noise: ``"gaussian"`` or ``"uniform"``.
        embeddings: where the noise goes: a module or module name; by default the token
            embeddings (``get_input_embeddings()`` or the single ``nn.Embedding``).
        divergence: how d is measured (see :func:`tram.divergence.get_divergence`); the paper
            uses forward KL and ablates MMD and L2.
        adaptive: ASAM form (default) or SAM form of Eq. 7.
        eta: η of the ASAM operator ``T = |θ| + η`` (0 in the paper).
        max_radius: clip d to this value (no clipping by default, as in the paper).
        rho: the radius of ``"fisher"`` (FSAM's γ); unused by the other targets.
        fisher_eta: η of the Fisher operator for ``"fisher"``.
        ema_decay: decay of ``"ema"``.
        reference_dtype: storage dtype of reference weights (e.g. ``torch.bfloat16``).
        replay_dropout: replay the recorded forward's dropout masks in the reference pass.
        logits_fn: maps the model's output to its logits when it is neither a Tensor nor has
            ``.logits``.
        seed: seed of TRAM's own noise generator (its state is checkpointed).
        ascent_every, local_ascent, foreach: see :class:`tram.TwoPassOptimizer`.

    Attributes:
        last_radius: d of the last ascent (after clipping), for logging.
        radius_history: every d measured, in order.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        model: nn.Module,
        *,
        trust_region: TrustRegion = "noise",
        sigma: float = 0.1,
        noise: NoiseDistribution = "gaussian",
        embeddings: nn.Module | str | None = None,
        divergence: str = "forward_kl",
        adaptive: bool = True,
        eta: float = 0.0,
        max_radius: float | None = None,
        rho: float = 0.1,
        fisher_eta: float = 0.1,
        ema_decay: float = 0.999,
        reference_dtype: torch.dtype | None = None,
        replay_dropout: bool = True,
        logits_fn: Callable[[Any], Tensor] | None = None,
        seed: int = 0,
        ascent_every: int = 1,
        local_ascent: bool = False,
        foreach: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
        if trust_region not in TRUST_REGIONS:
            expected = ", ".join(repr(name) for name in TRUST_REGIONS)
            raise ValueError(f"Invalid trust_region: {trust_region!r}. Expected one of: {expected}")
        self.trust_region = trust_region
        self.sigma = check_non_negative("sigma", sigma)
        self.noise: NoiseDistribution = noise
        if noise not in ("gaussian", "uniform"):
            raise ValueError(f"Invalid noise: {noise!r}. Expected 'gaussian' or 'uniform'")
        if max_radius is not None:
            max_radius = check_non_negative("max_radius", max_radius)
        self.max_radius = max_radius
        self.ema_decay = ema_decay
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"Invalid ema_decay: {ema_decay}")
        self.divergence_name = divergence
        self.divergence = get_divergence(divergence)
        self.adaptive = bool(adaptive)
        self.replay_dropout = bool(replay_dropout)
        self.logits_fn = logits_fn
        self.module = unwrap_model(model)
        needs_noise = trust_region in ("noise", "fisher")
        self.embeddings = resolve_module(self.module, embeddings) if needs_noise else None
        super().__init__(
            base_optimizer,
            {"eta": eta, "rho": rho, "fisher_eta": fisher_eta},
            model=model,
            ascent_every=ascent_every,
            local_ascent=local_ascent,
            foreach=foreach,
        )
        device = next(self.module.parameters()).device
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed)
        self.reference: ReferenceWeights | None = None
        if trust_region in ("pretrained", "previous", "ema"):
            self.reference = ReferenceWeights(self.module, dtype=reference_dtype)
        self._recording_state = _RecordingState()

    @property
    def last_radius(self) -> float | None:
        """d of the last ascent (after clipping), for logging."""
        return self._recording_state.last_radius

    @property
    def radius_history(self) -> list[float]:
        """Every d measured, in order."""
        return self._recording_state.radius_history

    @property
    def _records(self) -> list[_Record]:
        return self._recording_state.records

    # ------------------------------------------------------------------ hyperparameters
    def _validate_group(self, group: dict[str, Any]) -> None:
        check_non_negative("eta", group["eta"])
        check_non_negative("rho", group["rho"])
        check_non_negative("fisher_eta", group["fisher_eta"])

    def _scaling(self, group: dict[str, Any], param: Tensor) -> tuple[Scaling, float]:
        if self.trust_region == "fisher":
            return "fisher", float(group["fisher_eta"])
        if self.adaptive:
            return "adaptive", float(group["eta"])
        return "identity", 0.0

    # ------------------------------------------------------------------ the first pass
    def _observe_first_pass(self) -> contextlib.AbstractContextManager[Any]:
        if not self._ascent_due():
            return contextlib.nullcontext()
        if self.trust_region == "fisher":
            return self._noised_first_pass()
        return self._recording()

    @contextlib.contextmanager
    def _noised_first_pass(self) -> Iterator[None]:
        with representation_noise(
            self.module,
            sigma=self.sigma,
            distribution=self.noise,
            module=self.embeddings,
            generator=self._generator,
        ):
            yield

    @contextlib.contextmanager
    def _recording(self) -> Iterator[None]:
        pending: list[tuple[Tensor, Tensor | None]] = []

        def records_this_call(module: nn.Module) -> bool:
            return (
                module.training
                and torch.is_grad_enabled()
                and not self._recording_state.in_reference
            )

        def before_forward(module: nn.Module, args: Any, kwargs: Any) -> None:
            if records_this_call(module):
                pending.append(_capture_rng(module))

        def after_forward(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if not records_this_call(module) or not pending:
                return
            cpu_rng, cuda_rng = pending.pop()
            logits = extract_logits(output, self.logits_fn).detach()
            autocast = _AutocastState.current(module)
            self._records.append(
                _Record(tuple(args), dict(kwargs), logits, cpu_rng, cuda_rng, autocast)
            )

        handles = [
            self.module.register_forward_pre_hook(before_forward, with_kwargs=True),
            self.module.register_forward_hook(after_forward, with_kwargs=True),
        ]
        try:
            yield
        except BaseException:
            # A failed first pass is never measured: its records must not leak into the next.
            self._records.clear()
            raise
        finally:
            for handle in handles:
                handle.remove()

    # ------------------------------------------------------------------ the radius
    def _radii(self) -> list[float] | None:
        if self.trust_region == "fisher":
            return [float(group["rho"]) for group in self.param_groups]
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
        self._recording_state.last_radius = radius
        self.radius_history.append(radius)
        return [radius] * len(self.param_groups)

    @torch.no_grad()
    def measure_radius(self) -> float:
        """d over the recorded forwards: their mean, averaged over ranks in synchronised mode."""
        values = [self._divergence_of(record) for record in self._records]
        radius = torch.stack(values).mean()
        distributed = dist.is_available() and dist.is_initialized()
        if not self.local_ascent and distributed and dist.get_world_size() > 1:
            dist.all_reduce(radius)
            radius = radius / dist.get_world_size()
        return float(radius.item())

    def _divergence_of(self, record: _Record) -> Tensor:
        target = extract_logits(self._reference_output(record), self.logits_fn).detach()
        if target.shape != record.logits.shape:
            raise ValueError(
                "the reference logits and the recorded logits must have the same shape, but got "
                f"{tuple(target.shape)} and {tuple(record.logits.shape)}"
            )
        mask = logits_mask(record.kwargs, record.logits)
        if self.divergence_name == "mmd":  # set-level: cannot be split over positions
            return self.divergence(target, record.logits, mask=mask).float()
        return _chunked_mean_divergence(
            self.divergence,
            target,
            record.logits,
            mask,
            forward_kl=self.divergence_name == "forward_kl",
        )

    def _reference_output(self, record: _Record) -> Any:
        """The target's output on the recorded inputs.

        It runs like the recorded forward (train mode, the same autocast state, the same dropout
        masks unless ``replay_dropout=False``) except that BatchNorm running statistics are not
        updated: they come from the first pass only, as for every two-pass step.
        """
        state = self._recording_state
        state.in_reference = True
        try:
            with contextlib.ExitStack() as stack:
                if self.replay_dropout:
                    devices = [] if record.cuda_rng is None else [_cuda_device(self.module)]
                    stack.enter_context(torch.random.fork_rng(devices=devices))
                    torch.set_rng_state(record.cpu_rng)
                    if record.cuda_rng is not None:
                        torch.cuda.set_rng_state(record.cuda_rng, devices[0])
                stack.enter_context(frozen_running_stats(self.module))
                stack.enter_context(record.autocast.context())
                if self.reference is not None:
                    return self.reference.call(record.args, record.kwargs)
                stack.enter_context(
                    representation_noise(
                        self.module,
                        sigma=self.sigma,
                        distribution=self.noise,
                        module=self.embeddings,
                        generator=self._generator,
                    )
                )
                return self.module(*record.args, **record.kwargs)
        finally:
            state.in_reference = False

    # ------------------------------------------------------------------ references over time
    def _before_base_step(self) -> None:
        self._records.clear()
        if self.trust_region == "previous":
            assert self.reference is not None
            self.reference.copy_from_model()

    def _after_base_step(self) -> None:
        if self.trust_region == "ema":
            assert self.reference is not None
            self.reference.update_ema(self.ema_decay)

    # ------------------------------------------------------------------ checkpoints
    def _extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"generator": self._generator.get_state()}
        if self.reference is not None:
            state["reference"] = self.reference.state_dict()
        return state

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self._generator.set_state(state["generator"])
        if self.reference is not None and "reference" in state:
            self.reference.load_state_dict(state["reference"])

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        recording = _RecordingState()
        recording.last_radius = self.last_radius
        recording.radius_history = list(self.radius_history)
        state["_recording_state"] = recording
        state["_generator_state"] = self._generator.get_state()
        del state["_generator"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator_state = state.pop("_generator_state")
        super().__setstate__(state)
        self._generator = torch.Generator(device=next(self.module.parameters()).device)
        self._generator.set_state(generator_state)


_CHUNK_ELEMENTS = 1 << 20
"""Logit elements per chunk of the divergence (4 MiB in fp32): bounds its float32 temporaries,
which are several times the logits for a language model's [B, T, vocabulary] output."""


def _chunked_mean_divergence(
    divergence: Callable[..., Tensor],
    target: Tensor,
    logits: Tensor,
    mask: Tensor | None,
    *,
    forward_kl: bool = False,
) -> Tensor:
    """A per-position divergence averaged over the counted positions, computed in chunks.

    Equal to ``divergence(target, logits, mask=mask)`` for divergences that are a mean over
    positions (KL, JS, L2), with temporaries bounded by :data:`_CHUNK_ELEMENTS`. The forward KL
    (``forward_kl=True``: ``divergence`` is TRAM's default d) without gradients goes through
    :func:`~tram.divergence.forward_kl_rows`, two in-place buffers per chunk.
    """
    classes = logits.shape[-1]
    target = target.reshape(-1, classes)
    logits = logits.reshape(-1, classes)
    counted = None if mask is None else mask.reshape(-1) != 0
    rows = max(1, _CHUNK_ELEMENTS // classes)
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


def _cuda_device(module: nn.Module) -> int:
    device = next(module.parameters()).device
    return device.index if device.index is not None else torch.cuda.current_device()


def _capture_rng(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    cpu_state = torch.get_rng_state()
    device = next(module.parameters()).device
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return cpu_state, cuda_state
