r"""Divergences between output distributions: the trust-region distances of TRAM.

Every function here is pure maths on two logit tensors of the same shape: ``target_logits``
(the trust-region target: a reference model, or the model on noised inputs) and ``logits``
(the current model). The last dimension holds the classes (or the vocabulary); every leading
dimension indexes a *position*: an example for classification logits ``[B, C]``, a token for
language-model logits ``[B, T, V]``. Each function returns a scalar tensor.

With :math:`p = \mathrm{softmax}(\text{target\_logits})` and
:math:`q = \mathrm{softmax}(\text{logits})` at a position, the per-position divergences are

.. math::

    \mathrm{KL}(p \,\|\, q) &= \textstyle\sum_c p_c (\log p_c - \log q_c)
        && \text{direction="forward" (TRAM's default)} \\
    \mathrm{KL}(q \,\|\, p) & && \text{direction="reverse"} \\
    \mathrm{KL}_S(p, q) &= \mathrm{KL}(p \,\|\, q) + \mathrm{KL}(q \,\|\, p)
        && \text{direction="symmetric"} \\
    \mathrm{JS}(p, q) &= \tfrac12 \mathrm{KL}(p \,\|\, m) + \tfrac12 \mathrm{KL}(q \,\|\, m),
        \quad m = \tfrac12 (p + q) \\
    \mathrm{L2}(p, q) &= \lVert p - q \rVert_2

and each is averaged over the counted positions. :func:`mmd` is different in kind: it compares
the *set* of target distributions with the *set* of current distributions (see its docstring).

References:
    Sherborne, Saphra, Dasigi, Peng, `TRAM: Bridging Trust Regions and Sharpness Aware
    Minimization <https://arxiv.org/abs/2310.03646>`_, ICLR 2024: Eq. 4 (parameter trust region,
    :math:`\mathbb{E}_x \mathrm{KL}(p(\cdot|x,\theta_{t-1}) \| p(\cdot|x,\theta_t))`), Eq. 5 (noise
    trust region, :math:`\mathbb{E}_z \mathrm{KL}(p(\cdot|x+z,\theta) \| p(\cdot|x,\theta))`), both
    forward KL with the target first; App. C.5 and Table 14 (reverse / symmetric KL, MMD with an
    inverse multiquadratic kernel, L2).

    Aghajanyan et al., `Better Fine-Tuning by Reducing Representational Collapse
    <https://openreview.net/forum?id=OQ08SN70M1V>`_, ICLR 2021: the symmetric
    :math:`\mathrm{KL}_S` of R3F/R4F.

Choices made where the paper is silent (and departures from its released code):

* **Reduction.** The paper writes :math:`d = \mathbb{E}_x[\cdot]`. Here that is the mean over
  positions of the divergence *summed over classes*: per example for classification, per counted
  (non-padding) token for language models, so that d does not depend on the batch size, the
  sequence length or the vocabulary size. The released code instead used ``F.kl_div(...,
  reduction="mean")`` (a mean over every element, classes included) and divided by the batch
  size again, which puts d on a much smaller, size-dependent scale.
* **Masks.** ``mask`` has shape ``logits.shape[:-1]``; positions where it is False (or 0) are left
  out of the mean. Their logits are replaced by zeros before any arithmetic, so padding may hold
  anything, NaN included, without changing the value or the gradient. A mask that selects nothing
  gives a zero scalar, not NaN: an empty batch is no evidence of divergence. Build masks from
  labels and attention masks with :func:`token_mask`.
* **Precision.** Logits are cast to float32 before ``log_softmax`` and every step runs with
  autocast disabled, whatever the input dtype (bf16, fp16, and also float64): the distance is a
  step size, and half-precision log-probabilities of a large vocabulary are too coarse for it.
* **Log-probabilities** are clamped below at the smallest float32, so ``-inf`` logits (a
  hard-masked vocabulary entry) contribute 0 instead of NaN; probabilities that underflow to 0
  contribute 0 as well. Values are not clamped at zero: a divergence of nearly identical
  distributions may come out a rounding error below 0.
* **L2** is measured between probability vectors, not logits (the released code used logits):
  probabilities are bounded (the distance lies in :math:`[0, \sqrt2]`), invariant to the free
  additive constant of logits, and on a scale comparable to the other divergences.
* **MMD** is the biased (V-statistic) estimate of the squared MMD over the counted positions, with
  the kernel summed over a fixed set of bandwidths; see :func:`mmd`.

Gradients flow to both arguments; callers that need a radius (TRAM) detach the result themselves.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Literal, Protocol

import torch
from torch import Tensor

__all__ = [
    "DIVERGENCES",
    "Divergence",
    "get_divergence",
    "js_divergence",
    "kl_divergence",
    "l2_distance",
    "mmd",
    "token_mask",
]

Direction = Literal["forward", "reverse", "symmetric"]
Kernel = Literal["imq", "rbf"]

DIVERGENCES: tuple[str, ...] = (
    "forward_kl",
    "reverse_kl",
    "symmetric_kl",
    "js",
    "l2",
    "mmd",
)
"""Names accepted by :func:`get_divergence`."""

_DEFAULT_BANDWIDTHS: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
# Smallest float32: log-probabilities are clamped here so that -inf logits stay finite.
_LOG_FLOOR = torch.finfo(torch.float32).min


class Divergence(Protocol):
    """A divergence as :func:`get_divergence` returns it."""

    def __call__(
        self, target_logits: Tensor, logits: Tensor, *, mask: Tensor | None = None
    ) -> Tensor:
        """Return the scalar divergence of ``logits`` from ``target_logits``."""
        ...


# --------------------------------------------------------------------------- helpers


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_classes(logits: Tensor) -> None:
    """Every divergence here compares softmax distributions, and the softmax of a single logit is
    1 whatever its value: on a one-output head (a reward model, a regression head) d would be 0
    for any weights, and TRAM's trust region (or R3F's penalty) would silently vanish."""
    if logits.shape[-1] < 2:
        raise ValueError(
            "divergences need logits over at least 2 classes (last dimension), but got shape "
            f"{_shape(logits)}: the softmax of a single logit is 1 for any weights, so the "
            "divergence would be 0 (a reward or regression head); use a method that measures no "
            "divergence: SAM, ASAM, Fisher SAM, or TRAM with trust_region='fisher'"
        )


@contextlib.contextmanager
def _fp32(device: torch.device) -> Iterator[None]:
    """Disable autocast (which would run matmuls in half precision) on ``device``."""
    if torch.amp.is_autocast_available(device.type):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


def _flatten(
    target_logits: Tensor, logits: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Validate, cast to float32, and flatten to ``[N, C]`` rows (plus a ``[N]`` bool mask).

    Rows that the mask leaves out are replaced by zeros, so that garbage in padding (even NaN)
    reaches neither the value nor the gradient.
    """
    if target_logits.shape != logits.shape:
        raise ValueError(
            "target_logits and logits must have the same shape, "
            f"but got {_shape(target_logits)} and {_shape(logits)}"
        )
    if logits.dim() < 2:
        raise ValueError(
            "logits must have at least 2 dimensions (positions..., classes), "
            f"but got shape {_shape(logits)}"
        )
    _check_classes(logits)
    num_classes = logits.shape[-1]
    target = target_logits.to(torch.float32).reshape(-1, num_classes)
    current = logits.to(torch.float32).reshape(-1, num_classes)
    if mask is None:
        return target, current, None
    if mask.shape != logits.shape[:-1]:
        raise ValueError(
            f"mask must have shape logits.shape[:-1] = {_shape(logits)[:-1]}, "
            f"but got {_shape(mask)}"
        )
    keep = mask.reshape(-1).to(device=logits.device, dtype=torch.bool)
    target = torch.where(keep.unsqueeze(-1), target, 0.0)
    current = torch.where(keep.unsqueeze(-1), current, 0.0)
    return target, current, keep


def _masked_mean(values: Tensor, keep: Tensor | None) -> Tensor:
    """Mean of per-position ``values`` over the kept positions; 0 when none is kept."""
    if keep is None:
        return values.sum() / max(values.numel(), 1)
    total = torch.where(keep, values, 0.0).sum()
    return total / keep.sum().clamp_min(1)


def _log_probs(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits, dim=-1).clamp_min(_LOG_FLOOR)


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row KL(p || q) from log-probabilities, summed over the last dimension."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


@torch.no_grad()
def forward_kl_rows(target_logits: Tensor, logits: Tensor) -> Tensor:
    r"""Per-row :math:`\mathrm{KL}(p \| q)` of ``[N, C]`` logits in float32, without autograd.

    The same numbers as the rows of :func:`kl_divergence` (forward), from two float32 ``[N, C]``
    buffers worked in place instead of about seven temporaries: TRAM measures d this way, where
    no gradient is needed and the logits of a language model are large.
    """
    _check_classes(logits)
    with _fp32(logits.device):
        log_p = torch.log_softmax(target_logits, dim=-1, dtype=torch.float32).clamp_min_(_LOG_FLOOR)
        log_q = torch.log_softmax(logits, dim=-1, dtype=torch.float32).clamp_min_(_LOG_FLOOR)
        difference = log_q.neg_().add_(log_p)
        return difference.mul_(log_p.exp_()).sum(dim=-1)


# --------------------------------------------------------------------------- divergences


def kl_divergence(
    target_logits: Tensor,
    logits: Tensor,
    *,
    direction: Direction = "forward",
    mask: Tensor | None = None,
) -> Tensor:
    r"""Kullback-Leibler divergence between the softmax distributions, averaged over positions.

    With :math:`p` the target and :math:`q` the current distribution at a position:
    ``"forward"`` is :math:`\mathrm{KL}(p \| q)` (TRAM's d, paper Eq. 4/5), ``"reverse"`` is
    :math:`\mathrm{KL}(q \| p)`, and ``"symmetric"`` is their sum :math:`\mathrm{KL}_S` (R3F).

    Args:
        target_logits: Logits of the trust-region target, ``[..., C]``.
        logits: Logits of the current model, same shape.
        direction: ``"forward"``, ``"reverse"`` or ``"symmetric"``.
        mask: Positions that count, shape ``logits.shape[:-1]``; all of them when None.

    Returns:
        A float32 scalar: the mean over counted positions of the KL summed over classes
        (0 when the mask selects nothing).

    Raises:
        ValueError: On an unknown ``direction``, inconsistent shapes, or a single class (every
            divergence of a one-logit softmax is 0).

    Example:
        >>> target = torch.tensor([[2.0, 0.0, -1.0]])
        >>> kl_divergence(target, target).item()
        0.0
    """
    if direction not in ("forward", "reverse", "symmetric"):
        raise ValueError(
            f"Invalid direction: {direction!r}. Expected 'forward', 'reverse' or 'symmetric'"
        )
    with _fp32(logits.device):
        target, current, keep = _flatten(target_logits, logits, mask)
        log_p, log_q = _log_probs(target), _log_probs(current)
        if direction == "forward":
            per_position = _kl_rows(log_p, log_q)
        elif direction == "reverse":
            per_position = _kl_rows(log_q, log_p)
        else:
            per_position = _kl_rows(log_p, log_q) + _kl_rows(log_q, log_p)
        return _masked_mean(per_position, keep)


def js_divergence(target_logits: Tensor, logits: Tensor, *, mask: Tensor | None = None) -> Tensor:
    r"""Jensen-Shannon divergence between the softmax distributions, averaged over positions.

    :math:`\mathrm{JS}(p, q) = \tfrac12 \mathrm{KL}(p \| m) + \tfrac12 \mathrm{KL}(q \| m)` with
    :math:`m = \tfrac12(p + q)`, in nats, so each position lies in :math:`[0, \log 2]`.
    :math:`\log m` is computed as ``logaddexp(log p, log q) - log 2``, never as the log of a sum
    of probabilities, so it stays finite when probabilities underflow to 0.

    Args:
        target_logits: Logits of the trust-region target, ``[..., C]``.
        logits: Logits of the current model, same shape.
        mask: Positions that count, shape ``logits.shape[:-1]``; all of them when None.

    Returns:
        A float32 scalar: the mean JS over counted positions (0 when the mask selects nothing).
    """
    with _fp32(logits.device):
        target, current, keep = _flatten(target_logits, logits, mask)
        log_p, log_q = _log_probs(target), _log_probs(current)
        log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
        per_position = 0.5 * (_kl_rows(log_p, log_m) + _kl_rows(log_q, log_m))
        return _masked_mean(per_position, keep)


def l2_distance(target_logits: Tensor, logits: Tensor, *, mask: Tensor | None = None) -> Tensor:
    r"""Euclidean distance between the probability vectors, averaged over positions.

    :math:`\lVert \mathrm{softmax}(\text{target\_logits}) - \mathrm{softmax}(\text{logits})
    \rVert_2` per position.

    .. note::
        This is a deliberate departure from the paper's released code, which measured the L2
        distance between *logits*. Logits carry a free additive constant per position and an
        unbounded scale, so their distance says little about how far the predictions moved and
        is not comparable to the KL radius. Probabilities are bounded (the distance lies in
        :math:`[0, \sqrt2]`) and shift-invariant.

    Args:
        target_logits: Logits of the trust-region target, ``[..., C]``.
        logits: Logits of the current model, same shape.
        mask: Positions that count, shape ``logits.shape[:-1]``; all of them when None.

    Returns:
        A float32 scalar: the mean distance over counted positions (0 when the mask selects
        nothing).
    """
    with _fp32(logits.device):
        target, current, keep = _flatten(target_logits, logits, mask)
        diff = torch.softmax(target, dim=-1) - torch.softmax(current, dim=-1)
        per_position = torch.linalg.vector_norm(diff, dim=-1)
        return _masked_mean(per_position, keep)


def _squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """``[n, m]`` matrix of squared Euclidean distances, without an ``[n, m, C]`` intermediate."""
    sq = x.pow(2).sum(-1, keepdim=True) + y.pow(2).sum(-1).unsqueeze(0) - 2.0 * (x @ y.T)
    return sq.clamp_min(0.0)


def _kernel(sq_dist: Tensor, kernel: Kernel, c: float) -> Tensor:
    """The kernel of bandwidth ``c`` at each squared distance."""
    return c / (c + sq_dist) if kernel == "imq" else torch.exp(-sq_dist / (2.0 * c))


def mmd(
    target_logits: Tensor,
    logits: Tensor,
    *,
    mask: Tensor | None = None,
    kernel: Kernel = "imq",
    bandwidths: Sequence[float] = _DEFAULT_BANDWIDTHS,
) -> Tensor:
    r"""Squared maximum mean discrepancy between the target and the current distributions.

    Unlike the other divergences this is a *set-level* statistic, not a mean of per-position
    values: the counted positions give two samples of ``n`` probability vectors each,
    :math:`X = \{p_i\}` (target) and :math:`Y = \{q_i\}` (current), and the biased
    V-statistic estimate of the squared MMD is

    .. math::

        \widehat{\mathrm{MMD}}^2 = \frac{1}{n^2} \sum_{i,j} \big[ k(p_i, p_j) + k(q_i, q_j)
            - 2\, k(p_i, q_j) \big],
        \qquad k = \sum_{c \in \text{bandwidths}} k_c,

    with :math:`k_c(x, y) = c / (c + \lVert x - y \rVert^2)` (``"imq"``, inverse
    multiquadratic) or :math:`k_c(x, y) = \exp(-\lVert x - y \rVert^2 / 2c)` (``"rbf"``).
    The V-statistic is the squared RKHS distance between the two empirical mean embeddings, so
    it is non-negative (up to rounding) and exactly 0 for identical sets; it is *not* an
    average over positions, and it changes when positions are regrouped across batches.

    Choices (the paper names the imq kernel and, in its released code, these bandwidths; it
    gives no formula): the samples are probability vectors, the bandwidths ``c`` are used as
    given (no scaling by the dimension: squared distances between probability vectors lie in
    :math:`[0, 2]`, which this range of ``c`` brackets), the kernel values are summed over the
    bandwidths, and the squared MMD is returned (no square root, whose gradient is infinite at 0).

    Cost: time :math:`O(n^2 C)` and memory :math:`O(n^2)` in the number ``n`` of counted
    positions; for language models with long sequences, prefer a KL.

    Args:
        target_logits: Logits of the trust-region target, ``[..., C]``.
        logits: Logits of the current model, same shape.
        mask: Positions that count, shape ``logits.shape[:-1]``; all of them when None.
        kernel: ``"imq"`` or ``"rbf"``.
        bandwidths: Positive kernel bandwidths ``c``, summed over.

    Returns:
        A float32 scalar (0 when the mask selects nothing).

    Raises:
        ValueError: On an unknown ``kernel``, empty or non-positive ``bandwidths``,
            inconsistent shapes, or a single class.
    """
    if kernel not in ("imq", "rbf"):
        raise ValueError(f"Invalid kernel: {kernel!r}. Expected 'imq' or 'rbf'")
    if len(bandwidths) == 0 or any(not c > 0 for c in bandwidths):
        raise ValueError(f"Invalid bandwidths: {tuple(bandwidths)}. Expected positive values")
    with _fp32(logits.device):
        target, current, keep = _flatten(target_logits, logits, mask)
        if keep is not None:
            target, current = target[keep], current[keep]
        if target.shape[0] == 0:
            return target.sum() + current.sum()  # a zero that keeps the autograd graph
        x, y = torch.softmax(target, dim=-1), torch.softmax(current, dim=-1)
        within_x, within_y = _squared_distances(x, x), _squared_distances(y, y)
        across = _squared_distances(x, y)
        # The three kernel means are each near the number of bandwidths and their difference
        # is small: combining them pair by pair before averaging keeps float32's rounding of
        # each mean out of the result (about ten times less error than mean - mean).
        total = across.new_zeros(())
        for c in bandwidths:
            k_across = _kernel(across, kernel, c)
            pairs = _kernel(within_x, kernel, c) + _kernel(within_y, kernel, c)
            total = total + (pairs - k_across - k_across.T).mean()
        return total


# --------------------------------------------------------------------------- masks


def token_mask(
    *,
    labels: Tensor | None = None,
    attention_mask: Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = False,
) -> Tensor | None:
    """Boolean mask of the positions that count, from labels and/or an attention mask.

    A position counts when ``attention_mask != 0`` and ``labels != ignore_index`` (each test only
    when that tensor is given). The mask has the shape of the inputs, ``[B, T]`` for token
    inputs or ``[B]`` for per-example labels, and indexes the leading dimensions of the logits.

    Causal language models in Hugging Face take ``labels`` aligned with ``input_ids`` and shift
    them internally: the logits at position ``t`` predict the token at ``t + 1``
    (``logits[:, :-1]`` against ``labels[:, 1:]``). Which alignment applies is the caller's
    decision; pass ``shift=True`` for that causal case. The mask then still has shape ``[B, T]``
    and applies to the *unshifted* logits ``[B, T, V]`` as the model returns them: position ``t``
    counts when the token it predicts is counted (``labels[:, t + 1] != ignore_index``,
    ``attention_mask[:, t + 1] != 0``) *and* the prediction is made from a real token
    (``attention_mask[:, t] != 0``, which matters only for left padding, where a pad position
    would otherwise "predict" the first real token). The last position predicts nothing and never
    counts. Using this mask on ``logits`` is the same as using ``mask[:, :-1]`` on
    ``logits[:, :-1]``. The shift is along the last dimension.

    Args:
        labels: Label ids; ``ignore_index`` marks positions that do not count.
        attention_mask: 1 (or True) for real tokens, 0 for padding.
        ignore_index: The label value that marks ignored positions.
        shift: Align the mask with next-token predictions (causal LM, labels not yet shifted).

    Returns:
        A bool tensor, or None when both ``labels`` and ``attention_mask`` are None.

    Raises:
        ValueError: If ``labels`` and ``attention_mask`` have different shapes, or ``shift=True``
            is given a 0-dimensional tensor.

    Example:
        >>> token_mask(labels=torch.tensor([[5, 6, -100]]), shift=True)
        tensor([[ True, False, False]])
    """
    if labels is not None and attention_mask is not None and labels.shape != attention_mask.shape:
        raise ValueError(
            "labels and attention_mask must have the same shape, "
            f"but got {_shape(labels)} and {_shape(attention_mask)}"
        )
    reference = labels if labels is not None else attention_mask
    if reference is None:
        return None
    if shift and reference.dim() == 0:
        raise ValueError("shift=True needs a sequence dimension, but got a 0-dimensional tensor")
    counted = torch.ones_like(reference, dtype=torch.bool)
    if labels is not None:
        counted &= labels != ignore_index
    if attention_mask is not None:
        counted &= attention_mask != 0
    if not shift:
        return counted
    # Position t predicts token t + 1: it counts when token t + 1 is counted and t is real.
    predicts_counted = torch.zeros_like(counted)
    predicts_counted[..., :-1] = counted[..., 1:]
    if attention_mask is not None:
        predicts_counted &= attention_mask != 0
    return predicts_counted


# --------------------------------------------------------------------------- registry


def _forward_kl(target_logits: Tensor, logits: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """:func:`kl_divergence` with ``direction="forward"``: KL(target || current)."""
    return kl_divergence(target_logits, logits, direction="forward", mask=mask)


def _reverse_kl(target_logits: Tensor, logits: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """:func:`kl_divergence` with ``direction="reverse"``: KL(current || target)."""
    return kl_divergence(target_logits, logits, direction="reverse", mask=mask)


def _symmetric_kl(target_logits: Tensor, logits: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """:func:`kl_divergence` with ``direction="symmetric"``: the sum of both directions."""
    return kl_divergence(target_logits, logits, direction="symmetric", mask=mask)


_REGISTRY: dict[str, Divergence] = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "symmetric_kl": _symmetric_kl,
    "js": js_divergence,
    "l2": l2_distance,
    "mmd": mmd,
}


def get_divergence(name: str) -> Divergence:
    """Look up a divergence by name.

    Args:
        name: One of :data:`DIVERGENCES`: ``"forward_kl"``, ``"reverse_kl"``, ``"symmetric_kl"``,
            ``"js"``, ``"l2"``, ``"mmd"`` (the last with its default kernel and bandwidths).

    Returns:
        A callable ``fn(target_logits, logits, *, mask=None) -> Tensor``.

    Raises:
        ValueError: If ``name`` is not a known divergence.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        expected = ", ".join(repr(n) for n in DIVERGENCES)
        raise ValueError(f"Unknown divergence: {name!r}. Expected one of: {expected}") from None
