r"""The ascent step of the SAM family, as pure in-place tensor functions.

Every method in this library perturbs the weights by

.. math::

    \epsilon = \rho \, \frac{T^2 \nabla L}{\lVert T \nabla L \rVert_2 + 10^{-12}}

and differs only in the diagonal operator :math:`T` (and in where :math:`\rho` comes from):

- ``"identity"``: :math:`T = I`, SAM (Foret et al. 2021, Eq. 2).
- ``"adaptive"``: :math:`T = |\theta| + \eta`, ASAM (Kwon et al. 2021, Eq. 11) and TRAM's default
  (Sherborne et al. 2024, Eq. 7, where :math:`\eta = 0`).
- ``"fisher"``: :math:`T = (1 + \eta g^2)^{-1/2}`, so :math:`T^2 g = g / (1 + \eta g^2)`, Fisher SAM
  (Kim et al. 2022) with the diagonal Fisher :math:`g^2` regularised as :math:`1 + \eta g^2`.

The functions work in place on lists of tensors, in two phases, so that the step allocates no
parameter-sized temporaries: :func:`scaled_squared_norm` writes :math:`T g` into the backup
buffers and leaves parameters and gradients untouched (so a non-finite norm can still be
skipped with the gradient intact), then :func:`apply_ascent_` overwrites the gradients with
:math:`T^2 g = T (T g)`, reusing the :math:`T g` the first phase left, copies the parameters
into the backups and moves the parameters. Reusing it saves three of the thirteen elementwise
passes over the weights that an ASAM-form ascent made (TRAM's default), and gives the same bits:
:math:`T (T g)` and :math:`(g T) T` are the same products. With :math:`\eta = 0` (TRAM's
default) the adaptive operator works with :math:`\theta` in place of :math:`|\theta|`
(:func:`_signed_adaptive`): the same norm and the same :math:`T^2 g` bit for bit, without the
passes that take the absolute value. Each function has a loop implementation (the readable
reference; it writes products with ``out=`` where a pass can be saved) and a
``torch._foreach_*`` one; the tests check they agree.

``inverse_scale`` is ``1 / s`` for gradients multiplied by a loss scale ``s`` (fp16 with a
``GradScaler``). The identity and adaptive directions are invariant to ``s``; the Fisher
operator is not, so it is evaluated on the unscaled gradient ``g / s``.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "Scaling",
    "apply_ascent_",
    "foreach_copy_",
    "is_dtensor",
    "restore_",
    "scaled_squared_norm",
]

Scaling = Literal["identity", "adaptive", "fisher"]

NORM_EPSILON = 1e-12
"""Added to the norm before dividing, as in the SAM reference code; keeps a zero gradient finite."""


def scaled_squared_norm(
    params: list[Tensor],
    grads: list[Tensor],
    scratch: list[Tensor],
    *,
    scaling: Scaling,
    eta: float,
    inverse_scale: float = 1.0,
    foreach: bool = False,
) -> Tensor:
    r"""Return :math:`\sum_i \lVert T_i g_i \rVert^2`; leave :math:`T_i g_i` in ``scratch``.

    ``params`` and ``grads`` are not modified. ``scratch`` (same shapes as ``params``) is
    overwritten: with :math:`T g` for the adaptive and Fisher operators, which
    :func:`apply_ascent_` then reuses; not at all for the identity. The result is a 0-dim
    tensor on the device of the first parameter, in float32 (float64 for float64 gradients,
    complex ones included).
    """
    if not params:
        raise ValueError("scaled_squared_norm() needs at least one tensor")
    # At least float32; float64 stays float64 (a norm may not narrow its input's dtype). Over
    # the real dtypes: a complex gradient's norm is real, and its own dtype is taken per tensor.
    dtype = functools.reduce(torch.promote_types, (g.dtype.to_real() for g in grads), torch.float32)
    if scaling == "identity":
        norms = _norms(grads, dtype=dtype, foreach=foreach)
    else:
        signed = _signed_adaptive(scaling, eta, params)
        if not signed:
            _write_operator_(
                params,
                grads,
                scratch,
                scaling=scaling,
                eta=eta,
                inverse_scale=inverse_scale,
                foreach=foreach,
            )
        # With η = 0, T g = |θ| g is held as θ g: the same magnitudes, so the same norm.
        if foreach:
            if signed:
                foreach_copy_(scratch, params)
            torch._foreach_mul_(scratch, grads)
            norms = _norms(scratch, dtype=dtype, foreach=True)
        else:
            norms = []
            for work, p, g in zip(scratch, params, grads, strict=True):
                if signed:
                    torch.mul(p, g, out=work)
                else:
                    work.mul_(g)
                norms.append(torch.linalg.vector_norm(work, dtype=_norm_dtype(work, dtype)))
    device = norms[0].device
    stacked = torch.stack([n.to(device) for n in norms])
    return (stacked * stacked).sum()


def is_dtensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (FSDP2's parameters and gradients), told by its
    class name so that torch.distributed is not imported."""
    return type(tensor).__name__ == "DTensor"


def _any_dtensor(tensors: list[Tensor]) -> bool:
    return any(is_dtensor(t) for t in tensors)


def _norm_dtype(tensor: Tensor, dtype: torch.dtype) -> torch.dtype:
    """The ``dtype`` argument of ``vector_norm`` for a norm in the real ``dtype``: its complex
    counterpart for a complex tensor (torch requires a complex one there and returns a real
    norm)."""
    return dtype.to_complex() if tensor.is_complex() else dtype


def _norms(tensors: list[Tensor], *, dtype: torch.dtype, foreach: bool) -> list[Tensor]:
    """Each tensor's 2-norm in the real ``dtype`` (at least its own precision).

    The fused norm is given ``dtype`` only where some tensor differs from it: with ``dtype``,
    torch 2.14's sharding rule for ``_foreach_norm`` on ``DTensor`` (FSDP2's parameters and
    gradients) takes the dtype for a dimension and raises ``TypeError: '>=' not supported
    between instances of 'torch.dtype' and 'int'``; without it, the kernel and its result are
    the same. Narrower ``DTensor`` values (bf16 under FSDP2) take the per-tensor norm, which
    accepts ``dtype`` there, as do complex tensors beside real ones (one fused norm takes one
    ``dtype``, and a real tensor refuses a complex one).
    """
    dtypes = [_norm_dtype(t, dtype) for t in tensors]
    if foreach and all(t.dtype == d for t, d in zip(tensors, dtypes, strict=True)):
        return list(torch._foreach_norm(tensors, 2))
    if foreach and not _any_dtensor(tensors) and not any(t.is_complex() for t in tensors):
        return list(torch._foreach_norm(tensors, 2, dtype=dtype))
    return [torch.linalg.vector_norm(t, dtype=d) for t, d in zip(tensors, dtypes, strict=True)]


def apply_ascent_(
    params: list[Tensor],
    grads: list[Tensor],
    backups: list[Tensor],
    *,
    scaling: Scaling,
    eta: float,
    coefficient: float,
    inverse_scale: float = 1.0,
    foreach: bool = False,
) -> None:
    r"""Save ``params`` into ``backups``, then move them by ``coefficient * T^2 g``; if this
    raises, ``params`` are as they were.

    ``coefficient`` is :math:`\rho / (\lVert T g \rVert + 10^{-12})`. For the adaptive and
    Fisher operators ``backups`` must hold :math:`T g` as :func:`scaled_squared_norm` left it
    (called with them as ``scratch``, on the same ``params``, ``grads`` and ``inverse_scale``).
    The gradients are overwritten with :math:`T^2 g` and are meaningless afterwards; the
    caller clears them.
    """
    if _signed_adaptive(scaling, eta, params):
        # T^2 g = |θ| (|θ| g) = θ (θ g), bit for bit (the product's sign is g's either way):
        # no pass for |θ|, and on the loop path θ (θ g) is written straight over g.
        if foreach:
            torch._foreach_mul_(grads, params)
            torch._foreach_mul_(grads, params)
        else:
            for g, p, scaled in zip(grads, params, backups, strict=True):
                torch.mul(p, scaled, out=g)
    elif scaling != "identity":
        # T is a function of the parameters and the gradients alone, so it can be written over
        # the gradients; times the T g held in the backups, that is T^2 g.
        _write_operator_(
            params,
            grads,
            grads,
            scaling=scaling,
            eta=eta,
            inverse_scale=inverse_scale,
            foreach=foreach,
        )
        if foreach:
            torch._foreach_mul_(grads, backups)
        else:
            for g, scaled in zip(grads, backups, strict=True):
                g.mul_(scaled)
    if foreach:
        foreach_copy_(backups, params)
        torch._foreach_add_(params, grads, alpha=coefficient)
        return
    for p, backup in zip(params, backups, strict=True):
        backup.copy_(p)
    # Every backup holds θ from here on, so a loop stopped part way (KeyboardInterrupt) can put
    # the weights it had moved back: the bucket is at θ whenever this function raises. (The
    # foreach path moves every weight in one call.)
    try:
        for p, g in zip(params, grads, strict=True):
            p.add_(g, alpha=coefficient)
    except BaseException:
        for p, backup in zip(params, backups, strict=True):
            p.copy_(backup)
        raise


def _signed_adaptive(scaling: Scaling, eta: float, params: list[Tensor]) -> bool:
    r"""Whether the adaptive operator can work with θ in place of :math:`T = |θ|` (η = 0).

    With η = 0, :math:`T g = |θ| g` and :math:`θ g` differ in sign only, so their norms are
    the same bits, and :math:`T^2 g = |θ| (|θ| g) = θ (θ g)` exactly (rounding to nearest is
    symmetric in sign, and both products carry the sign of g, zeros included). That saves the
    passes that take :math:`|θ|`: TRAM's default (Sherborne et al. 2024, Eq. 7 has η = 0).
    Not for complex parameters: there :math:`θ^2 g` is :math:`|θ|^2 g` rotated by twice θ's
    phase (a bucket holds one dtype, so its first parameter speaks for all).
    """
    return scaling == "adaptive" and eta == 0 and not params[0].is_complex()


def restore_(params: list[Tensor], backups: list[Tensor], *, foreach: bool = False) -> None:
    """Copy ``backups`` back into ``params``: exact in every dtype, unlike subtracting epsilon."""
    if foreach:
        foreach_copy_(params, backups)
    else:
        for p, backup in zip(params, backups, strict=True):
            p.copy_(backup)


def _write_operator_(
    params: list[Tensor],
    grads: list[Tensor],
    out: list[Tensor],
    *,
    scaling: Scaling,
    eta: float,
    inverse_scale: float,
    foreach: bool,
) -> None:
    """Write the diagonal operator T into ``out`` without allocating parameter-sized tensors.

    ``out`` may be ``grads`` itself: T is then computed in place over the gradients.
    """
    if scaling == "adaptive":
        # Every elementwise pass over all the weights costs about as much as SAM's whole ascent,
        # so: abs written straight into ``out``, and no pass adding eta = 0 (TRAM's default).
        # torch has no in-place abs of complex tensors: those take the loop.
        if foreach and not params[0].is_complex():
            foreach_copy_(out, params)
            torch._foreach_abs_(out)
            if eta != 0:
                torch._foreach_add_(out, eta)
        else:
            for o, p in zip(out, params, strict=True):
                torch.abs(p, out=o)
                if eta != 0:
                    o.add_(eta)
    elif scaling == "fisher":
        # T = (1 + eta * |g / s|^2) ** -1/2
        factor = eta * inverse_scale * inverse_scale
        if grads[0].is_complex():
            # |g|^2 = g conj(g), not g^2 (a bucket holds one dtype). Rare: no fused path.
            for o, g in zip(out, grads, strict=True):
                o.copy_(g.abs().square()).mul_(factor).add_(1.0).rsqrt_()
        elif grads[0].dtype == torch.float16:
            # g^2 overflows float16 above |g| = 256 (65504), and T = 0 there where it is small
            # but not 0 (T g ~ 1/√η): T is computed in float32, one tensor at a time, and
            # rounded once. bfloat16 has float32's range.
            for o, g in zip(out, grads, strict=True):
                o.copy_(g.float().square_().mul_(factor).add_(1.0).rsqrt_())
        elif foreach:
            if out is grads:
                torch._foreach_mul_(out, grads)
            else:
                foreach_copy_(out, grads)
                torch._foreach_mul_(out, grads)
            torch._foreach_mul_(out, factor)
            torch._foreach_add_(out, 1.0)
            if _any_dtensor(out):
                # torch 2.12 has no sharding rule for _foreach_rsqrt_ on DTensor (FSDP2); the
                # per-tensor rsqrt computes the same values.
                for o in out:
                    o.rsqrt_()
            else:
                torch._foreach_rsqrt_(out)
        else:
            for o, g in zip(out, grads, strict=True):
                (o.mul_(g) if o is g else o.copy_(g).mul_(g)).mul_(factor).add_(1.0).rsqrt_()
    else:
        raise ValueError(
            f"Invalid scaling: {scaling!r}. Expected 'identity', 'adaptive' or 'fisher'"
        )


def foreach_copy_(destinations: list[Tensor], sources: list[Tensor]) -> None:
    """``torch._foreach_copy_``, except for tensor subclasses, which are copied one by one.

    ``DTensor`` (the parameters and gradients of FSDP2) has a sharding rule for every other
    foreach op used here but none for ``aten._foreach_copy_`` (torch 2.13: NotImplementedError),
    and ``foreach`` is chosen automatically for CUDA parameters, so FSDP2 on GPU would fail.
    ``Tensor.copy_`` goes through the subclass's own dispatch.
    """
    if all(type(t) in (Tensor, torch.nn.Parameter) for t in (*destinations, *sources)):
        torch._foreach_copy_(destinations, sources)
    else:
        for destination, source in zip(destinations, sources, strict=True):
            destination.copy_(source)
