"""Diagnostics of the loss surface and of representations: ε-sharpness, top Hessian eigenvalue, CKA.

These are the measurements the TRAM paper uses to argue that trust-region-aware sharpness
minimisation finds flatter minima whose representations stay close to the pre-trained model
(Sherborne et al. 2024, §5 and Table 6; App. B.7 and B.8). They are pure functions over tensors and
callables. None of them keeps state, and none of them leaves parameters, ``.grad`` or module modes
changed.

- :func:`linear_cka` compares two sets of features of the same examples.
- :func:`collect_features` runs a model over batches and returns the features to compare, for
  example the base-model output of the pre-trained and of the fine-tuned model for one domain.
- :func:`top_hessian_eigenvalue` estimates the top (largest) Hessian eigenvalue by power
  iteration on Hessian-vector products, shifted where a negative eigenvalue is larger in
  magnitude.
- :func:`epsilon_sharpness` is the ε-sharpness of Keskar et al. (2017), as used in the TRAM paper.

Example::

    feats_pre = collect_features(pretrained, val_batches, module="encoder")
    feats_ft = collect_features(finetuned, val_batches, module="encoder")
    cka = linear_cka(feats_pre, feats_ft)

    model.eval()
    phi = epsilon_sharpness(lambda: loss_fn(model(x), y), list(model.parameters()))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "collect_features",
    "epsilon_sharpness",
    "linear_cka",
    "top_hessian_eigenvalue",
]


def _centred(z: Tensor, name: str) -> Tensor:
    """Return ``z`` in float64 with centred columns; raise if every column is constant."""
    z64 = z.detach().to(torch.float64)
    zc = z64 - z64.mean(dim=0, keepdim=True)
    # Centring a constant column leaves a rounding residue of order n * eps * max|z|, not an
    # exact zero, so constancy is judged against that bound.
    bound = torch.finfo(torch.float64).eps * z.shape[0] * z64.abs().max()
    if bool(zc.abs().max() <= bound):
        raise ValueError(f"{name} is constant over the examples (zero variance); CKA is undefined")
    return zc


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    r"""Linear centred kernel alignment between two feature matrices of the same examples.

    With :math:`X` (``x``, shape ``[n, d1]``) and :math:`Y` (``y``, shape ``[n, d2]``) holding the
    features of the same ``n`` examples row by row, and their columns centred,

    .. math::

        \mathrm{CKA}(X, Y) = \frac{\lVert Y^\top X \rVert_F^2}
                                   {\lVert X^\top X \rVert_F \, \lVert Y^\top Y \rVert_F}.

    The value lies in ``[0, 1]``. It is invariant to orthogonal transforms and isotropic scaling of
    either input, and it is 1 when ``y`` is such a transform of ``x``. The computation is in
    float64; when ``n`` is smaller than the feature width the equivalent ``n x n`` Gram form
    :math:`\langle XX^\top, YY^\top\rangle_F / (\lVert XX^\top\rVert_F \lVert YY^\top\rVert_F)` is
    used, which is cheaper.

    Args:
        x: features ``[n, d1]``; any real dtype.
        y: features ``[n, d2]`` of the same ``n`` examples, in the same order.

    Returns:
        A 0-dim float64 tensor on the device of ``x``.

    Raises:
        ValueError: if an input is not 2-D, the numbers of rows differ, ``n < 2``, or an input is
            constant over the examples (all columns have zero variance), where CKA is 0/0.

    Example:
        >>> x = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))
        >>> round(linear_cka(x, 3.0 * x).item(), 6)
        1.0

    References:
        Kornblith et al., `Similarity of Neural Network Representations Revisited
        <https://arxiv.org/abs/1905.00414>`_, ICML 2019 (linear CKA).
        Sherborne et al., `TRAM <https://arxiv.org/abs/2310.03646>`_, ICLR 2024, App. B.8
        (CKA between pre-trained and fine-tuned XLM-R, Table 6b).

    .. note::
        A constant input raises instead of returning 0 or NaN: it almost always means the features
        were taken from the wrong place (a padding position, a dead layer), and a silent number
        would hide that.
    """
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(
            f"linear_cka expects 2-D inputs [n, d], but got shapes {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must have the same number of rows (examples), but got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"linear_cka needs at least 2 examples, but got n={n}")
    xc = _centred(x, "x")
    yc = _centred(y.to(x.device), "y")
    if n < max(xc.shape[1], yc.shape[1]):
        kx, ky = xc @ xc.T, yc @ yc.T
        return (kx * ky).sum() / (torch.linalg.norm(kx) * torch.linalg.norm(ky))
    cross = torch.linalg.norm(yc.T @ xc) ** 2
    return cross / (torch.linalg.norm(xc.T @ xc) * torch.linalg.norm(yc.T @ yc))


def _select_output(out: Any) -> Tensor:
    """Pick the feature tensor out of a module output (HF ModelOutput, tuple or tensor)."""
    if isinstance(out, Tensor):
        return out
    for key in ("last_hidden_state", "logits"):
        value = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot take features from a module output of type {type(out).__name__}")


def _pool(feats: Tensor, batch: Any, pool: str) -> Tensor:
    """Pool ``[B, T, H]`` features to ``[B, H]``; ``[B, H]`` passes through."""
    dtype = torch.promote_types(feats.dtype, torch.float32)
    feats = feats.to(dtype)
    if feats.dim() == 2:
        return feats
    if feats.dim() != 3:
        raise ValueError(f"expected features [B, H] or [B, T, H], but got {tuple(feats.shape)}")
    if pool == "first":
        return feats[:, 0]
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if mask is None:
        return feats.mean(dim=1)
    if tuple(mask.shape) != tuple(feats.shape[:2]):
        raise ValueError(
            f"attention_mask of shape {tuple(mask.shape)} does not match features "
            f"{tuple(feats.shape)}"
        )
    mask = mask.to(device=feats.device, dtype=dtype)
    counts = mask.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        raise ValueError("attention_mask has a row with no tokens; its mean is undefined")
    return (feats * mask.unsqueeze(-1)).sum(dim=1) / counts


def collect_features(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    module: nn.Module | str | None = None,
    pool: Literal["mean", "first"] = "mean",
) -> Tensor:
    r"""Run ``model`` over ``batches`` and return one pooled feature vector per example.

    The model runs in eval mode under :func:`torch.no_grad`. A forward hook on ``module`` captures
    its output; from it the features are taken as the output tensor itself, else its
    ``last_hidden_state``, else its ``logits``, else the first element of a tuple. Features
    ``[B, T, H]`` are pooled to ``[B, H]``:

    .. math::

        h_b = \frac{\sum_t m_{bt} \, z_{bt}}{\sum_t m_{bt}} \quad (\texttt{pool="mean"}),
        \qquad h_b = z_{b0} \quad (\texttt{pool="first"}),

    with :math:`m` the batch's ``attention_mask`` (all ones when the batch has none). The result
    feeds :func:`linear_cka`, as in the TRAM paper's comparison of the pre-trained and fine-tuned
    base-model outputs per language (App. B.8).

    Args:
        model: the model to run. Batches must already be on its device.
        batches: an iterable of batches. A mapping is passed as ``model(**batch)``, a tuple or
            list as ``model(*batch)``, anything else as ``model(batch)``.
        module: where to take the features: a submodule of ``model`` or its dotted name (as in
            ``named_modules``). ``None`` takes the output of ``model`` itself. If the module runs
            several times in one forward pass, its last output is used.
        pool: ``"mean"`` (mean over the tokens the attention mask keeps) or ``"first"`` (the
            first token, e.g. ``[CLS]``). Ignored for 2-D features.

    Returns:
        The features ``[N, H]`` of all examples in order, detached, on the device where the model
        produced them, in float32 (float64 if the features are float64).

    Raises:
        ValueError: if ``pool`` is unknown, ``batches`` is empty, the module never ran, the
            features are not 2-D or 3-D, or the attention mask does not fit them.
        TypeError: if the module output holds no tensor that can be used.

    References:
        Sherborne et al., `TRAM <https://arxiv.org/abs/2310.03646>`_, ICLR 2024, App. B.8.

    .. note::
        Every module's train/eval flag is restored to what it was, module by module, and the hook
        is removed, also when the model raises.
    """
    if pool not in ("mean", "first"):
        raise ValueError(f"Invalid pool: {pool!r}. It needs to be one of ['mean', 'first']")
    target = model if module is None else module
    if isinstance(target, str):
        target = model.get_submodule(target)
    captured: list[Any] = []

    def hook(_mod: nn.Module, _args: Any, output: Any) -> None:
        captured.append(output)

    modes = [(m, m.training) for m in model.modules()]
    handle = target.register_forward_hook(hook)
    pooled: list[Tensor] = []
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                captured.clear()
                if isinstance(batch, Mapping):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
                if not captured:
                    raise ValueError("the requested module did not run during the forward pass")
                pooled.append(_pool(_select_output(captured[-1]).detach(), batch, pool))
    finally:
        handle.remove()
        captured.clear()
        for m, training in modes:
            m.training = training
    if not pooled:
        raise ValueError("batches is empty")
    return torch.cat(pooled)


def _check_params(params: Sequence[Tensor]) -> list[Tensor]:
    params = list(params)
    if not params:
        raise ValueError("params is an empty list")
    for i, p in enumerate(params):
        if not p.requires_grad:
            raise ValueError(f"params[{i}] does not require grad")
    return params


def _scalar_loss(loss_fn: Callable[[], Tensor]) -> Tensor:
    loss = loss_fn()
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor")
    return loss.reshape(())


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """Global inner product of two tensor lists, accumulated in float64 (one host sync)."""
    parts = [(u * v).sum(dtype=torch.float64) for u, v in zip(a, b, strict=True)]
    return float(torch.stack([t.to(parts[0].device) for t in parts]).sum())


def _power_iteration(
    product: Callable[[list[Tensor]], list[Tensor]],
    start: list[Tensor],
    shift: float,
    iterations: int,
    tolerance: float,
) -> tuple[float, list[Tensor]]:
    """Power iteration on ``v -> product(v) - shift * v`` from the unit vector ``start``: the
    Rayleigh quotient of the last iterate (of the shifted operator) and that iterate."""
    v = start
    eigenvalue = 0.0
    for k in range(iterations):
        hv = product(v)
        if shift != 0.0:
            hv = [h - shift * t for h, t in zip(hv, v, strict=True)]
        estimate = _dot(v, hv)
        converged = k > 0 and abs(estimate - eigenvalue) < tolerance * abs(eigenvalue)
        eigenvalue = estimate
        hv_norm = math.sqrt(_dot(hv, hv))
        if converged or hv_norm == 0.0 or k == iterations - 1:
            break
        v = [t / hv_norm for t in hv]
    return eigenvalue, v


def top_hessian_eigenvalue(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    *,
    iterations: int = 100,
    tolerance: float = 1e-4,
    generator: torch.Generator | None = None,
) -> tuple[float, list[Tensor]]:
    r"""Top (largest) eigenvalue of the Hessian of ``loss_fn()``, by power iteration.

    With :math:`H = \nabla^2_\theta L(\theta)` (:math:`L` is ``loss_fn``, :math:`\theta` the
    concatenation of ``params``) and a random unit start :math:`v_0`, power iteration

    .. math::

        \lambda_k = v_k^\top (H - s I) v_k + s, \qquad
        v_{k+1} = \frac{(H - s I) v_k}{\lVert (H - s I) v_k \rVert},

    stops when :math:`|\lambda_k - \lambda_{k-1}| < \text{tolerance}\,|\lambda_{k-1}|` (on the
    shifted quotient). It first runs with :math:`s = 0` and converges to the eigenvalue of largest
    *magnitude*. Away from a minimum that can be a negative one (a direction of descent), which
    is not the sharpness the top eigenvalue is meant to measure, and which would read as the
    flattest value of all. So when it is negative, a second run from the same start uses that
    value as the shift :math:`s`: :math:`H - sI` has its largest-magnitude eigenvalue at
    :math:`\lambda_{\max} - s`, and the result is :math:`\lambda_{\max}`. Each :math:`Hv`
    is a double-backward Hessian-vector product through one gradient graph, built once with
    ``create_graph=True`` and reused, so ``loss_fn`` runs once.

    Args:
        loss_fn: zero-argument callable returning the scalar loss; it must not call backward.
        params: the tensors (requiring grad) the Hessian is taken over.
        iterations: maximum number of Hessian-vector products per run (two runs at most: the
            second only when the largest-magnitude eigenvalue is negative).
        tolerance: relative change of :math:`\lambda` below which the iteration stops.
        generator: random generator for the start vector (``None``: the global one).

    Returns:
        ``(eigenvalue, eigenvector)``: the Rayleigh quotient :math:`v^\top H v` of the last
        iterate (at most :math:`\lambda_{\max}`; equal to it once converged), and that iterate
        as a list of tensors shaped like ``params`` with unit global norm. If the iteration has
        not converged after ``iterations`` steps, the last estimate is returned. A Hessian that
        is exactly zero gives ``0.0`` and the random start.

    Raises:
        ValueError: if ``iterations < 1``, ``tolerance`` is not a positive finite number, or
            ``params`` is empty or holds a tensor that does not require grad.

    References:
        Pearlmutter, `Fast Exact Multiplication by the Hessian
        <https://doi.org/10.1162/neco.1994.6.1.147>`_, Neural Computation 1994 (the product).
        Golub and Van Loan, *Matrix Computations* (power iteration, shifts).

    .. note::
        Power iteration converges at rate :math:`|\lambda_2/\lambda_1|` of the (shifted)
        operator; after a shift that is :math:`(\lambda_2 - s)/(\lambda_{\max} - s)`, slower
        than without. If :math:`\lambda` and :math:`-\lambda` are both extreme eigenvalues the
        first run does not converge. ``.grad`` is never touched (``torch.autograd.grad`` is used,
        not ``backward``). Call ``model.eval()`` first if the loss has dropout.
    """
    if iterations < 1:
        raise ValueError(f"Invalid iterations: {iterations}")
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise ValueError(f"Invalid tolerance: {tolerance}")
    params = _check_params(params)
    with torch.enable_grad():
        loss = _scalar_loss(loss_fn)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        live = [(g, i) for i, g in enumerate(grads) if g is not None and g.requires_grad]

        def hvp(v: list[Tensor]) -> list[Tensor]:
            out = [torch.zeros_like(p) for p in params]
            if not live:
                return out
            terms = [(g * v[i]).sum() for g, i in live]
            dot = terms[0]
            for term in terms[1:]:  # a sum with promotion: params may mix dtypes
                dot = dot + term
            hv = torch.autograd.grad(dot, params, retain_graph=True, allow_unused=True)
            return [h.detach() if h is not None else o for h, o in zip(hv, out, strict=True)]

        # Draw on the generator's device (randn requires it), then move to each parameter's.
        start = [
            torch.randn(
                p.shape,
                generator=generator,
                dtype=p.dtype,
                device=p.device if generator is None else generator.device,
            ).to(p.device)
            for p in params
        ]
        norm = math.sqrt(_dot(start, start))
        start = [t / norm for t in start]
        eigenvalue, v = _power_iteration(hvp, start, 0.0, iterations, tolerance)
        if eigenvalue < 0.0:
            shifted, v = _power_iteration(hvp, start, eigenvalue, iterations, tolerance)
            eigenvalue = shifted + eigenvalue
    return eigenvalue, v


def epsilon_sharpness(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    *,
    epsilon: float = 1e-5,
    steps: int = 20,
    lr: float | None = None,
) -> float:
    r"""ε-sharpness of Keskar et al. (2017) with :math:`A = I`, as used in the TRAM paper.

    With :math:`x` the current ``params`` (concatenated) and :math:`L` ``loss_fn``,

    .. math::

        \phi_{x,\epsilon} = \frac{\max_{y \in C_\epsilon} L(x + y) - L(x)}{1 + L(x)} \times 100,
        \qquad C_\epsilon = \{y : |y_i| \le \epsilon(|x_i| + 1)\}.

    The inner maximum is approximated by projected ascent from :math:`y_0 = 0`. By default it is
    sign ascent with a shrinking step, the natural steepest ascent for a box:

    .. math::

        y_k = \Pi_{C_\epsilon}\!\left(y_{k-1} + \tfrac{1}{k}\,\epsilon(|x| + 1) \odot
              \operatorname{sign} \nabla L(x + y_{k-1})\right),

    whose first step lands on the corner of the box that the gradient at :math:`x` points to, and
    whose later steps refine it. With ``lr`` set, plain projected gradient ascent
    :math:`y_k = \Pi_{C_\epsilon}(y_{k-1} + \text{lr}\,\nabla L(x + y_{k-1}))` is used instead, as
    the paper did (SGD, lr 8e-5). The largest loss seen, :math:`L(x)` included, stands in for the
    maximum, so the result is a lower bound on the exact :math:`\phi` and is never negative.

    Args:
        loss_fn: zero-argument callable returning the scalar loss at the current values of
            ``params``. It must only compute the loss (no ``backward``, no ``zero_grad``). It runs
            ``steps + 1`` times, under :func:`torch.enable_grad` except for the last run.
        params: the parameters :math:`x` (tensors requiring grad). They are perturbed in place
            during the call.
        epsilon: the relative box size :math:`\epsilon`.
        steps: the number of ascent steps.
        lr: step size of plain gradient ascent; ``None`` uses sign ascent.

    Returns:
        :math:`\phi` in percent, as a float; NaN if a loss was NaN.

    Raises:
        ValueError: if ``epsilon`` is not a positive finite number, ``steps < 1``, ``lr`` is not
            positive and finite, ``params`` is empty or holds a tensor that does not require grad,
            or the loss at :math:`x` is not a finite scalar.

    References:
        Keskar et al., `On Large-Batch Training for Deep Learning: Generalization Gap and Sharp
        Minima <https://arxiv.org/abs/1609.04836>`_, ICLR 2017 (their sharpness metric; here
        :math:`A = I`).
        Sherborne et al., `TRAM <https://arxiv.org/abs/2310.03646>`_, ICLR 2024, Eq. 10-11 and
        App. B.7 (Table 6a).

    .. note::
        The default ``epsilon = 1e-5`` is the paper's value (App. B.7, XLM-R), so the default
        measures what Table 6a measures; Keskar et al. used 1e-3 and 5e-4 on small networks.
        Sign ascent reaches the box corners, a perturbation of norm about
        :math:`\epsilon\sqrt{D}` over :math:`D` parameters, so larger values quickly measure
        a different thing on large models. The paper's inner solver (mini-batch SGD with gradient
        accumulation, after Juneja et al. 2023) is not reproduced exactly: ``loss_fn`` is one
        deterministic objective, and sign ascent is used unless ``lr`` is given.

    .. note::
        The parameters are restored by copying a saved clone back, so they are bit-identical after
        the call, also when ``loss_fn`` raises. Gradients are taken with
        ``torch.autograd.grad``; each parameter's ``.grad`` attribute is put back as it was.
        Whether dropout is active is the caller's choice: call ``model.eval()`` for deterministic
        results. Perturbations below the resolution of the parameters' dtype are lost (bf16
        keeps about three significant digits).
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"Invalid epsilon value: {epsilon}")
    if steps < 1:
        raise ValueError(f"Invalid steps: {steps}")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"Invalid lr value: {lr}")
    params = _check_params(params)
    saved_grads = [p.grad for p in params]
    with torch.no_grad():
        x = [p.detach().clone() for p in params]
        width = [epsilon * (t.abs() + 1) for t in x]
    y = [torch.zeros_like(t) for t in x]
    losses: list[float] = []
    try:
        for k in range(steps + 1):
            if k > 0:
                with torch.no_grad():
                    for p, xi, yi in zip(params, x, y, strict=True):
                        p.copy_(xi + yi)
            if k == steps:
                with torch.no_grad():
                    losses.append(float(_scalar_loss(loss_fn)))
                break
            with torch.enable_grad():
                loss = _scalar_loss(loss_fn)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            losses.append(float(loss.detach()))
            if k == 0 and not math.isfinite(losses[0]):
                raise ValueError(f"the loss at the current parameters is not finite: {losses[0]}")
            with torch.no_grad():
                for i, g in enumerate(grads):
                    if g is None:
                        continue
                    step = g * lr if lr is not None else g.sign() * width[i] / (k + 1)
                    y[i] = torch.clamp(y[i] + step, -width[i], width[i])
    finally:
        with torch.no_grad():
            for p, xi in zip(params, x, strict=True):
                p.copy_(xi)
        for p, saved in zip(params, saved_grads, strict=True):
            p.grad = saved
    if any(math.isnan(v) for v in losses):
        return math.nan
    base = losses[0]
    return (max(losses) - base) / (1.0 + base) * 100.0
