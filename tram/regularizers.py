r"""Loss-side trust regions: penalties added to the task loss, for any optimizer.

Each regularizer is a callable ``penalty = regularizer(model, inputs, logits)`` that returns the
*weighted* scalar to add to the loss, where ``inputs`` is the batch as the model was called on it
(a mapping of keyword arguments, a tuple of positional arguments, or a single tensor) and
``logits`` the logits of that forward pass. ``last_value`` holds the unweighted divergence of the
last call, for logging. ``after_step(model)`` must be called after every optimizer step (TRPO
and MESA update their references there; they see the steps of any ``torch.optim.Optimizer``, so
an extra call for the same step changes nothing and a forgotten one raises at the next
penalty); ``state_dict()``/``load_state_dict()`` checkpoint them.
They combine with any optimizer, the SAM family included (paper §C.3: "ASAM+R3F" and so on).

Defaults follow the TRAM paper's baselines (App. B.2: σ = 0.1, λ = 0.1, EMA decay 0.999); the
original papers' defaults are given beside them. The paper does not state R3F's noise
distribution or symmetry, nor MESA's temperature: here R3F uses the symmetric KL and Gaussian
noise, MESA τ = 1; both are options.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from tram._auxiliary import auxiliary_forwards
from tram._forward_state import buffers_put_back
from tram._model_io import uncompiled
from tram._step_watch import OptimizerStepWatch
from tram._validation import check_non_negative, check_unit_interval
from tram.batchnorm import frozen_running_stats
from tram.divergence import get_divergence
from tram.noise import (
    NoiseDistribution,
    NoiseStream,
    eager_forward,
    representation_noise,
    resolve_module,
)
from tram.targets import ReferenceWeights, call_model, extract_logits, logits_mask, unwrap_model

__all__ = ["MESA", "R3F", "R4F", "TRPO", "Regularizer", "spectral_normalize"]


class Regularizer:
    """Base class: weight, naming, logging and the (empty) step/checkpoint hooks."""

    name = "regularizer"

    def __init__(self, *, weight: float, divergence: str) -> None:
        self.weight = check_non_negative("weight", weight)
        self.divergence_name = divergence
        self.divergence = get_divergence(divergence)
        self.last_value: float | None = None

    def __call__(self, model: nn.Module, inputs: Any, logits: Tensor) -> Tensor:
        """The weighted penalty. Its forwards are auxiliary: inside a TRAM first pass they are
        neither recorded for d nor noised by TRAM-Fisher."""
        with auxiliary_forwards():
            value = self.penalty(model, inputs, logits)
        self.last_value = float(value.detach())
        return self.weight * value

    def penalty(self, model: nn.Module, inputs: Any, logits: Tensor) -> Tensor:
        """The unweighted divergence."""
        raise NotImplementedError

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (weights-only loadable)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load what :meth:`state_dict` saved."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight}, divergence={self.divergence_name!r})"


def _mask_for(inputs: Any, logits: Tensor) -> Tensor | None:
    return logits_mask(inputs, logits) if isinstance(inputs, Mapping) else None


class R3F(Regularizer):
    r"""R3F: a divergence between the outputs on clean and on noised input embeddings.

    .. math::

        \mathcal{L} = L(\theta) + \lambda\, \mathrm{KL}_S\big(f(x) \,\Vert\, f(x + z)\big),
        \quad z \sim \mathcal{N}(0, \sigma^2 I)\ \text{or}\ \mathcal{U}(-\sigma, \sigma)

    The noised forward runs the model again, with gradients, through the representation noise
    hook on the token embeddings; gradients flow through both logits, as in the original. It
    normalises with its own batch statistics but leaves BatchNorm running statistics alone
    (:func:`tram.frozen_running_stats`): they are updated once per step, by the clean forward,
    as with every auxiliary forward in tram. Any other buffer it writes is put back after it
    (``tram/_forward_state.py``): R4F's spectral norm iterates its vectors once per step, in the
    clean forward, where the original's, called in training mode twice, iterates twice (a
    deliberate departure: the noised forward measures the penalty, and leaves no state). The
    original's transformers have no BatchNorm.
    Defaults are the TRAM paper's baseline (σ = 0.1, λ = 0.1); the original's fairseq code uses
    σ = 1e-5, λ = 1.0 and uniform noise for classification.

    Args:
        sigma: noise scale σ (standard deviation, or half-width for uniform noise).
        weight: λ, the weight of the penalty in the loss.
        noise: ``"gaussian"`` or ``"uniform"``.
        embeddings: where the noise goes: a module or module name; by default the token
            embeddings (:func:`tram.noise.find_input_embeddings`).
        divergence: the divergence between clean and noised outputs (symmetric KL in R3F).
        seed: seed of the regularizer's own noise stream (its count of draws is checkpointed;
            each penalty is a draw, independent across data-parallel ranks, see
            :class:`tram.targets.NoisedInputs`); None draws from torch's global generator.

    References:
        Aghajanyan et al. Better Fine-Tuning by Reducing Representational Collapse. ICLR 2021.
    """

    name = "r3f"

    def __init__(
        self,
        *,
        sigma: float = 0.1,
        weight: float = 0.1,
        noise: NoiseDistribution = "gaussian",
        embeddings: nn.Module | str | None = None,
        divergence: str = "symmetric_kl",
        seed: int | None = None,
    ) -> None:
        super().__init__(weight=weight, divergence=divergence)
        self.sigma = check_non_negative("sigma", sigma)
        self.noise: NoiseDistribution = noise
        self.embeddings = embeddings
        self.stream = None if seed is None else NoiseStream(seed)

    @property
    def seed(self) -> int | None:
        """The seed of the noise stream; None: torch's global generator."""
        return None if self.stream is None else self.stream.seed

    def penalty(self, model: nn.Module, inputs: Any, logits: Tensor) -> Tensor:
        # Eagerly: a compiled graph would not run the noise hook.
        with (
            representation_noise(
                model,
                sigma=self.sigma,
                distribution=self.noise,
                module=self.embeddings,
                generator=self.stream,
            ),
            eager_forward(uncompiled(model)) as eager,
            frozen_running_stats(model),
            buffers_put_back(model),
        ):
            noised = extract_logits(call_model(eager, inputs))
        return self.divergence(logits, noised, mask=_mask_for(inputs, logits))

    def state_dict(self) -> dict[str, Any]:
        return {} if self.stream is None else self.stream.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.stream is not None and state:
            self.stream.load_state_dict(state)


def spectral_normalize(module: nn.Module) -> nn.Module:
    """Apply spectral normalisation (W / σ_max(W)) to every ``nn.Linear`` weight in ``module``."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(module).__name__} has no nn.Linear to spectrally normalise")
    for linear in linears:
        if not nn.utils.parametrize.is_parametrized(linear, "weight"):
            nn.utils.parametrizations.spectral_norm(linear)
    return module


class R4F(R3F):
    """R4F: R3F with a spectrally normalised classification head (Lip{g} ≤ 1).

    Construction applies ``torch.nn.utils.parametrizations.spectral_norm`` to every linear layer
    of ``head`` (in place, before the optimizer is built). ``head`` is a module or a submodule
    name; by default the model's ``classifier`` or ``score`` attribute. Not applicable to
    generation, whose output layer is tied to the embeddings (as the R3F paper notes).

    Args:
        model: the model whose head is normalised (unwrapped from DDP first).
        head: the head, a module or a submodule name; by default ``classifier`` or ``score``.
        kwargs: R3F's arguments.
    """

    name = "r4f"

    def __init__(self, model: nn.Module, *, head: nn.Module | str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        inner = unwrap_model(model)
        if head is None:
            head = next(
                (getattr(inner, n) for n in ("classifier", "score") if hasattr(inner, n)), None
            )
            if head is None:
                raise ValueError(
                    f"cannot find the classification head of {type(inner).__name__} "
                    "(no .classifier or .score); pass head="
                )
        self.head = resolve_module(inner, head)
        spectral_normalize(self.head)


class _ReferenceRegularizer(Regularizer):
    """A divergence from a reference model's outputs, run in eval mode without gradients.

    The reference forward runs in eval mode (no dropout): a deterministic target, as MESA's EMA
    teacher does. The current forward is the caller's, in whatever mode it ran.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        weight: float,
        divergence: str,
        temperature: float = 1.0,
        reference_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(weight=weight, divergence=divergence)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"Invalid temperature: {temperature}")
        self.temperature = temperature
        self.reference = ReferenceWeights(model, dtype=reference_dtype)
        self._steps = OptimizerStepWatch(self.reference.model)

    def after_step(self, model: nn.Module) -> None:
        """Advance the reference, once per optimizer step.

        A call with no optimizer step of the model's weights since the last one (a second call
        for the same step, a call per micro-batch, a step a ``GradScaler`` skipped) changes
        nothing. When the weights' optimizer is not a ``torch.optim.Optimizer`` (or they are
        updated by hand), steps cannot be seen and every call advances."""
        if self._steps.observed and not self._steps.stepped:
            return
        self._steps.reset()
        self._advance()

    def _advance(self) -> None:
        """Move the reference on by one step."""
        raise NotImplementedError

    def _check_reference_is_current(self) -> None:
        self.reference.check_live(type(self).__name__)
        if self._steps.stepped:
            raise RuntimeError(
                f"{type(self).__name__}: an optimizer stepped the model's weights since the last "
                f"{type(self).__name__}.after_step(model), so this penalty would compare with a "
                "stale reference. Call after_step(model) after every optimizer step (TramTrainer "
                "calls it; in a Lightning module, from on_train_batch_end or after "
                "optimizer.step() in manual optimization)"
            )

    def _before_reference_forward(self) -> None:
        """Called by :meth:`penalty` after its checks, before the reference forward."""

    def penalty(self, model: nn.Module, inputs: Any, logits: Tensor) -> Tensor:
        self._check_reference_is_current()
        self._before_reference_forward()
        module = self.reference.model
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                target = extract_logits(self.reference.forward(inputs))
        finally:
            module.train(was_training)
        tau = self.temperature
        value = self.divergence(target / tau, logits / tau, mask=_mask_for(inputs, logits))
        return value * tau * tau

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reference.load_state_dict(state["reference"])
        self._steps.reset()  # the checkpoint's reference is the one of the step to come


class TRPO(_ReferenceRegularizer):
    r"""TRPO-style trust region: KL to the previous step's model (paper Eq. 3-4, penalised).

    .. math::

        \mathcal{L} = L(\theta_t) + \lambda\, \mathbb{E}_x\,
        \mathrm{KL}\big(p(\cdot\mid x, \theta_{t-1}) \,\Vert\, p(\cdot\mid x, \theta_t)\big)

    θt−1 is the weights before the last optimizer step. Two copies of the trainable weights are
    kept: the target θt−1 and θt captured at the first call of a step (with gradient accumulation
    every micro-batch of the step compares against the same θt−1). At the first step θt−1 = θ0.

    Args:
        model: the model being trained (its trainable weights are copied).
        weight: λ, the weight of the penalty in the loss.
        divergence: the divergence from the reference's outputs (forward KL).
        reference_dtype: storage dtype of the copies (e.g. ``torch.bfloat16``).

    References:
        Schulman et al. Trust Region Policy Optimization. ICML 2015; TRAM paper App. B.2 (λ = 0.1).
    """

    name = "trpo"

    def __init__(
        self,
        model: nn.Module,
        *,
        weight: float = 0.1,
        divergence: str = "forward_kl",
        reference_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            model, weight=weight, divergence=divergence, reference_dtype=reference_dtype
        )
        self._current = ReferenceWeights(model, dtype=reference_dtype)
        self._captured = False

    def _before_reference_forward(self) -> None:
        if not self._captured:
            self._current.copy_from_model()
            self._captured = True

    def _advance(self) -> None:
        if self._captured:
            self.reference.tensors, self._current.tensors = (
                self._current.tensors,
                self.reference.tensors,
            )
            self._captured = False


class MESA(_ReferenceRegularizer):
    r"""MESA: KL to an exponential moving average of the weights, with a temperature.

    .. math::

        \mathcal{L} = L(\theta) + \lambda\, \tau^2\,
        \mathrm{KL}\big(p_{\bar\theta}^{\tau} \,\Vert\, p_{\theta}^{\tau}\big), \qquad
        \bar\theta \leftarrow d\,\bar\theta + (1 - d)\,\theta \text{ after every step}

    Defaults: the TRAM paper's λ = 0.1 and decay 0.999, τ = 1 (not stated there); the original
    code uses τ = 5, λ = 0.3-0.8 and decay 0.9998, starting after 5 epochs.

    Args:
        model: the model being trained (its trainable weights start the average).
        weight: λ, the weight of the penalty in the loss.
        decay: d, the decay of the moving average.
        temperature: τ, applied to both distributions (the penalty is scaled by τ²).
        divergence: the divergence from the average's outputs (forward KL).
        reference_dtype: storage dtype of the average (e.g. ``torch.bfloat16``).

    References:
        Du et al. Sharpness-Aware Training for Free. NeurIPS 2022.
    """

    name = "mesa"

    def __init__(
        self,
        model: nn.Module,
        *,
        weight: float = 0.1,
        decay: float = 0.999,
        temperature: float = 1.0,
        divergence: str = "forward_kl",
        reference_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            model,
            weight=weight,
            divergence=divergence,
            temperature=temperature,
            reference_dtype=reference_dtype,
        )
        self.decay = check_unit_interval("decay", decay)

    def _advance(self) -> None:
        self.reference.update_ema(self.decay)
