r"""Representation-space noise: a scoped forward hook that adds :math:`z` to the input embeddings.

TRAM-x, R3F/R4F and TRAM-Fisher all compare the model on its inputs :math:`x` with the same model
on noised inputs :math:`x + z`, :math:`z \sim \mathcal{N}(0, \sigma^2)` (paper Eq. 5; R3F also uses
:math:`z \sim \mathcal{U}(-\sigma, \sigma)`). For a language model "the inputs" are the token
embeddings, so :func:`representation_noise` registers a forward hook on the input-embedding module
that returns ``output + z`` for every forward run inside a ``with`` block, and removes the hook when
the block exits, also when it raises::

    with tram.noise.representation_noise(model, sigma=0.1, generator=gen) as handle:
        noised_logits = model(**batch).logits  # the batch itself is never modified
    assert handle.calls == 1

**Where the noise goes.** On the output of the *token* embedding (``word_embeddings`` in BERT,
``wte`` in GPT-2), as in R3F, NEFTune and the released TRAM code. In BERT this is before the
position and token-type embeddings are added and before the embedding LayerNorm, which rescales the
noise; so :math:`\sigma` is part of the definition of the hook point, and a :math:`\sigma` tuned
for one hook point (or one architecture) is not comparable with another.

**Which module.** :func:`resolve_module` picks the hook point: an explicit ``module=`` (an
``nn.Module`` inside the model, or its dotted name); otherwise :func:`find_input_embeddings`, which

1. unwraps ``model.module`` while it is an ``nn.Module`` (DistributedDataParallel, DataParallel,
   accelerate wrappers);
2. calls ``get_input_embeddings()`` when the model has it and it returns a module (Hugging Face
   and PEFT models);
3. falls back to the single ``nn.Embedding`` among ``model.modules()``;
4. raises ``ValueError`` otherwise (asking for ``module=``).

**Why a hook rather than** ``inputs_embeds``. A hook works for any ``nn.Module``, not only models
whose ``forward`` takes ``inputs_embeds``; it needs no per-architecture embedding lookup; and it
never rewrites the caller's batch. The paper's released code popped ``input_ids`` from the caller's
dict and wrote noised, detached ``inputs_embeds`` into it, so the next pass silently ran on noised
inputs. Numerically the two are identical (``tests/test_noise.py`` checks it on BERT).

**Randomness.** Noise is drawn from ``generator`` when one is given, and never touches the global
RNG then. That matters for TRAM, which replays the dropout masks of the model's first forward by
restoring the global RNG state: noise drawn from the global stream would shift those masks. A
:class:`NoiseStream` seeds one generator per hooked forward from its seed, the rank and the
forward's number (``tram/_noise_stream.py``); TRAM-x, TRAM-Fisher and R3F with a seed draw so.
With ``generator=None`` the global RNG of the output's device is used (and advanced).

**Activation checkpointing.** The hooked module must run outside activation-checkpointed blocks
(``torch.utils.checkpoint``): the backward recomputes such a block, with no noise once the ``with``
block has exited, or with a fresh draw while it is open, so the gradient would not be that of the
noised forward. A hooked forward inside a checkpointed block, in a block entered with gradients
enabled, raises ``RuntimeError`` (``sigma == 0`` adds nothing and passes); without gradients (a
reference forward) nothing is recomputed and it runs. The embeddings of Hugging Face models sit
outside their checkpointed layers, so the default hook point is fine there.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from tram._auxiliary import in_auxiliary_forward
from tram._checkpointing import checkpoint_phase
from tram._model_io import compiled_in_place, uncompiled_forward, unwrap_model
from tram._noise_stream import NoiseStream

__all__ = [
    "NoiseDistribution",
    "NoiseHandle",
    "NoiseStream",
    "eager_forward",
    "find_input_embeddings",
    "representation_noise",
    "resolve_module",
]

NoiseDistribution = Literal["gaussian", "uniform"]
_DISTRIBUTIONS: tuple[str, ...] = ("gaussian", "uniform")


@dataclass
class NoiseHandle:
    r"""What a :func:`representation_noise` block yields: its settings and a live record.

    Attributes:
        module: The module whose output is noised.
        sigma: The noise scale: the standard deviation for ``"gaussian"``, the half-width of
            the interval for ``"uniform"``.
        distribution: ``"gaussian"`` (:math:`\mathcal{N}(0, \sigma^2)`) or ``"uniform"``
            (:math:`\mathcal{U}(-\sigma, \sigma)`).
        calls: How many forwards of ``module`` ran inside the block (counted also when
            ``sigma == 0``, where the output is passed through unchanged).
        active: ``True`` while the hook is registered, i.e. inside the ``with`` block.
        training_forwards_only: Leave the forwards that a regularizer runs (inside
            :func:`tram._auxiliary.auxiliary_forwards`) alone, uncounted. TRAM-Fisher sets it:
            its noise belongs to the step's training forward.
        builds_graph: Whether the block was entered with gradients enabled: its forwards may
            then be recomputed by a backward (activation checkpointing, see the module
            docstring).
    """

    module: nn.Module
    sigma: float
    distribution: NoiseDistribution
    calls: int = 0
    active: bool = False
    training_forwards_only: bool = False
    builds_graph: bool = False


def find_input_embeddings(model: nn.Module) -> nn.Module:
    """Find the token-embedding module of ``model``.

    Unwraps distribution and compilation wrappers (:func:`tram.targets.unwrap_model`), then
    uses ``get_input_embeddings()`` when the model has it and it returns a module (Hugging Face,
    PEFT), else the single ``nn.Embedding`` among the model's modules.

    Args:
        model: The model, possibly wrapped.

    Returns:
        The input-embedding module.

    Raises:
        ValueError: If ``get_input_embeddings()`` gives no module and the model does not hold
            exactly one ``nn.Embedding``.

    Example:
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
        >>> find_input_embeddings(net) is net[0]
        True
    """
    model = unwrap_model(model)
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            found = getter()
        except NotImplementedError:
            # transformers' base implementation raises when a class cannot locate its embeddings.
            found = None
        if isinstance(found, nn.Module):
            return found
        reason = "its get_input_embeddings() returned no module"
    else:
        reason = "it has no get_input_embeddings()"
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if len(embeddings) == 1:
        return embeddings[0]
    raise ValueError(
        f"Cannot find the input embeddings of {type(model).__name__}: {reason} and "
        f"{len(embeddings)} nn.Embedding modules (expected exactly one); pass module= explicitly"
    )


def resolve_module(model: nn.Module, module: nn.Module | str | None) -> nn.Module:
    """Resolve the hook point for :func:`representation_noise`.

    Args:
        model: The model, possibly wrapped (DDP, DataParallel, accelerate).
        module: ``None`` for :func:`find_input_embeddings`; a dotted name, looked up on the
            unwrapped model first and then on ``model`` itself (so names from the wrapper's
            ``named_modules()``, such as ``"module.embed"``, work too); or a module, which must be
            one of ``model.modules()``.

    Returns:
        The module to hook.

    Raises:
        ValueError: If the name is not a submodule, or the module is not part of ``model``, or no
            input embeddings are found.
        TypeError: If ``module`` is of another type.
    """
    if module is None:
        return find_input_embeddings(model)
    if isinstance(module, str):
        for root in (unwrap_model(model), model):
            try:
                return root.get_submodule(module)
            except AttributeError:
                continue
        inner = type(unwrap_model(model)).__name__
        raise ValueError(f"Invalid module name: {module!r} is not a submodule of {inner}")
    if isinstance(module, nn.Module):
        if any(m is module for m in model.modules()):
            return module
        raise ValueError(
            f"Invalid module: the given {type(module).__name__} is not a submodule of "
            f"{type(model).__name__}"
        )
    raise TypeError(f"module must be an nn.Module, a str or None, but got {type(module).__name__}")


def _draw(
    like: Tensor, sigma: float, distribution: str, generator: torch.Generator | None
) -> Tensor:
    # A generator on another device (a CPU generator for a CUDA model) draws where it lives, so
    # the noise is the same whichever device the model is on.
    device = like.device if generator is None else generator.device
    if distribution == "gaussian":
        z = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
        z = z.mul_(sigma)
    else:
        z = torch.rand(like.shape, generator=generator, device=device, dtype=like.dtype)
        z = z.mul_(2.0).sub_(1.0).mul_(sigma)
    return z.to(like.device)


def _check_tensor(value: object, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(
            f"representation_noise needs a tensor {what}, but got {type(value).__name__}; "
            "hook a module that returns a tensor or a tuple/list starting with one"
        )
    if not value.is_floating_point():
        raise TypeError(
            f"representation_noise needs a floating-point {what}, but got dtype {value.dtype}"
        )
    return value


def _make_hook(handle: NoiseHandle, source: torch.Generator | NoiseStream | None) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if handle.training_forwards_only and in_auxiliary_forward():
            return None
        handle.calls += 1
        if isinstance(output, (tuple, list)):
            if len(output) == 0:
                raise TypeError(f"representation_noise got an empty {type(output).__name__}")
            first = _check_tensor(output[0], f"first element of the {type(output).__name__}")
        else:
            first = _check_tensor(output, "output")
        if handle.sigma == 0.0:
            # Returning None keeps the output: bit-identical, and the generator does not advance.
            return None
        if handle.builds_graph:
            _refuse_checkpointed(module)
        generator = (
            source.next_generator(first.device) if isinstance(source, NoiseStream) else source
        )
        # Out of place: the module's output (and anything aliasing it) is never modified.
        noised = first + _draw(first, handle.sigma, handle.distribution, generator)
        if isinstance(output, Tensor):
            return noised
        rest = list(output[1:])
        if isinstance(output, list):
            return [noised, *rest]
        if hasattr(output, "_fields"):  # a namedtuple keeps its type
            return type(output)(noised, *rest)
        return (noised, *rest)

    return hook


def _refuse_checkpointed(module: nn.Module) -> None:
    phase = checkpoint_phase()
    if phase is None:
        return
    when, reentrant = phase
    raise RuntimeError(
        f"representation_noise: the hooked {type(module).__name__} ran inside an "
        f"activation-checkpointed block (torch.utils.checkpoint with use_reentrant={reentrant}, "
        f"in its {when}). The backward recomputes that block without this noise, or with "
        "another draw, so the gradient would not be the noised forward's. Hook a module that "
        "runs before the checkpointed blocks (module=, or embeddings= of R3F, TRAM and "
        "TRAM-Fisher; Hugging Face models checkpoint their layers, not their input "
        "embeddings), or leave the embeddings out of the checkpointed block"
    )


@contextlib.contextmanager
def _scope(
    handle: NoiseHandle, source: torch.Generator | NoiseStream | None
) -> Iterator[NoiseHandle]:
    handle.builds_graph = torch.is_grad_enabled()
    hook = handle.module.register_forward_hook(_make_hook(handle, source))
    handle.active = True
    try:
        yield handle
    finally:
        hook.remove()
        handle.active = False
    if handle.calls == 0 and not handle.training_forwards_only:
        # TRAM-Fisher (training forwards only) says it in its own words, at its ascent.
        raise RuntimeError(
            f"representation_noise: no forward of the hooked {type(handle.module).__name__} ran "
            "inside the block, so nothing was noised. A torch.compile'd model runs the graph it "
            "compiled and ignores hooks added later: call its uncompiled module (model._orig_mod) "
            "inside the block, or run the call inside tram.noise.eager_forward(model). Inputs "
            "given as embeddings (inputs_embeds=) skip the token embeddings: pass input_ids. "
            "Otherwise pass module= the layer the forward calls"
        )


def representation_noise(
    model: nn.Module,
    *,
    sigma: float,
    distribution: NoiseDistribution = "gaussian",
    module: nn.Module | str | None = None,
    generator: torch.Generator | NoiseStream | None = None,
) -> contextlib.AbstractContextManager[NoiseHandle]:
    r"""Add noise :math:`z` to the input embeddings of every forward inside a ``with`` block.

    The hook returns ``output + z``, with :math:`z \sim \mathcal{N}(0, \sigma^2)` for
    ``"gaussian"`` and :math:`z \sim \mathcal{U}(-\sigma, \sigma)` for ``"uniform"``, drawn afresh
    for every forward, in the output's dtype and on its device. Gradients flow through it to the
    embedding weights (:math:`z` itself is a constant). For a tuple or list output only the first
    element is noised. The hook is removed when the block exits, also on an exception.

    Args:
        model: The model (possibly wrapped in DDP, DataParallel or accelerate).
        sigma: The noise scale :math:`\sigma`: standard deviation (gaussian) or half-width
            (uniform). ``sigma == 0`` passes the output through unchanged, bit for bit, and draws
            nothing, so ``generator`` does not advance.
        distribution: ``"gaussian"`` or ``"uniform"``.
        module: The hook point, see :func:`resolve_module`; by default the token embeddings found
            by :func:`find_input_embeddings`.
        generator: Source of the noise. With a generator the global RNG is never touched (TRAM
            replays dropout from the global RNG). A generator on another device than the output
            draws on its own device and the noise is then copied over. A
            :class:`NoiseStream` seeds a generator for every hooked forward from its seed, the
            rank and the forward's number, and counts it: each data-parallel rank draws its
            own noise, and its ``state_dict`` resumes the stream on every rank. ``None`` uses
            (and advances) the global RNG of the output's device.

    Returns:
        A single-use context manager; entering it registers the hook and yields a
        :class:`NoiseHandle` whose ``calls`` counts the hooked forwards. A block that ends
        without an exception and without a hooked forward raises ``RuntimeError``: nothing was
        noised (a ``torch.compile``'d model ignores the hook).

    Raises:
        ValueError: If ``sigma`` is negative or not finite, ``distribution`` is unknown, or the
            module cannot be resolved (see :func:`resolve_module`).
        TypeError: At forward time, if the hooked module returns something other than a
            floating-point tensor or a tuple/list that starts with one.

    Example:
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
        >>> x = torch.tensor([[1, 2, 3]])
        >>> with representation_noise(net, sigma=0.1, generator=torch.Generator().manual_seed(0)):
        ...     noised = net(x)
        >>> bool((noised != net(x)).any())
        True

    References:
        Sherborne et al., "TRAM: Bridging Trust Regions and Sharpness Aware Minimization",
        ICLR 2024, Eq. 5 (d_x); Aghajanyan et al., "Better Fine-Tuning by Reducing
        Representational Collapse" (R3F), ICLR 2021.
    """
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"Invalid sigma: {sigma}")
    if distribution not in _DISTRIBUTIONS:
        raise ValueError(
            f"Invalid distribution: {distribution!r}. Expected 'gaussian' or 'uniform'"
        )
    if generator is not None and not isinstance(generator, (torch.Generator, NoiseStream)):
        raise TypeError(
            "generator must be a torch.Generator, a tram.noise.NoiseStream or None, but got "
            f"{type(generator).__name__}"
        )
    handle = NoiseHandle(
        module=resolve_module(model, module), sigma=float(sigma), distribution=distribution
    )
    return _scope(handle, generator)


@contextlib.contextmanager
def eager_forward(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, ``model`` and its submodules run eagerly, hooks added after
    compilation included.

    ``torch.compile(model)`` leaves an ``OptimizedModule`` whose ``_orig_mod`` can be called
    instead; the in-place forms leave nothing to unwrap: ``Module.compile()`` sets the module's
    ``_compiled_call_impl`` (what ``Module.__call__`` runs when set), and
    ``module.forward = torch.compile(module.forward)`` keeps the eager forward as the compiled
    function's ``_torchdynamo_orig_callable``. Both are set aside here and put back on exit.
    Their graphs do not guard on module hooks (dynamo's ``skip_nnmodule_hook_guards``), so a
    hook added later, such as :func:`representation_noise`'s, would not run in them."""
    set_aside: list[tuple[nn.Module, str, Any]] = []
    try:
        for module in model.modules():
            compiled_call = compiled_in_place(module)
            if compiled_call is not None:
                set_aside.append((module, "_compiled_call_impl", compiled_call))
                module._compiled_call_impl = None
            original = uncompiled_forward(module)
            if original is not None:
                set_aside.append((module, "forward", vars(module)["forward"]))
                module.forward = original
        yield model
    finally:
        for module, name, value in reversed(set_aside):
            setattr(module, name, value)
