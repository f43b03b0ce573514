"""Diagnostics the runner can report after training (config group ``diagnostics``).

- ``cka``: linear CKA between the pre-trained and the fine-tuned model's base-model output
  (mean over tokens) on each domain's test examples, as in the TRAM paper's per-language
  comparison (App. B.8). The pre-trained features are collected before training, so no second
  copy of the model is kept.
- ``sharpness``: ε-sharpness (Keskar et al. 2017; paper Eq. 10-11) of the training loss on
  in-domain validation examples, in eval mode.
- ``hessian``: the top Hessian eigenvalue of the same loss by power iteration.

Both take the trainable parameters only: a frozen part (the multilingual model's word
embeddings in the cross-lingual preset) is not in the box of the ε-sharpness or in the Hessian,
where the paper's :math:`A = I` covers the whole model it fine-tunes.

All three use a fixed, evenly spaced subset of the examples (``examples`` per domain), so every
optimizer and seed is measured on the same inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from tram.diagnostics import collect_features, epsilon_sharpness, linear_cka, top_hessian_eigenvalue
from tram.experiments.tasks import ExperimentError

__all__ = ["Probe"]


def _subset(dataset: Any, count: int) -> list[Any]:
    """``count`` rows spread evenly over ``dataset`` (the evaluation sets are sorted by length)."""
    size = len(dataset)
    if size <= count:
        return [dataset[i] for i in range(size)]
    return [dataset[(i * size) // count] for i in range(count)]


class Probe:
    """Measures a model before and after fine-tuning.

    Args:
        model: the model that will be fine-tuned (features are taken from ``model.base_model``).
        task, data: the runner's :class:`~tram.experiments.tasks.TaskData` and
            :class:`~tram.experiments.tasks.EncodedTask`.
        cka, sharpness, hessian: which diagnostics to compute.
        examples: examples per domain (CKA) and for the loss (sharpness, Hessian).
        batch_size: examples per forward pass.
        epsilon: ε of the ε-sharpness (the paper's 1e-5 by default).
        sharpness_steps: ascent steps of the ε-sharpness.
        hessian_iterations: power-iteration steps (Hessian-vector products).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Any,
        data: Any,
        *,
        cka: bool = False,
        sharpness: bool = False,
        hessian: bool = False,
        examples: int = 256,
        batch_size: int = 32,
        epsilon: float = 1e-5,
        sharpness_steps: int = 10,
        hessian_iterations: int = 20,
    ) -> None:
        for name, value in (("examples", examples), ("batch_size", batch_size)):
            if int(value) < 1:
                raise ExperimentError(f"diagnostics.{name} must be a positive integer, got {value}")
        self.cka, self.sharpness, self.hessian = bool(cka), bool(sharpness), bool(hessian)
        self.batch_size = int(batch_size)
        self.epsilon = float(epsilon)
        self.sharpness_steps = int(sharpness_steps)
        self.hessian_iterations = int(hessian_iterations)
        self.collator = data.collator
        self.domains = {d: _subset(data.test[d], int(examples)) for d in task.domains}
        self.loss_rows = _subset(data.validation, int(examples))
        if (self.sharpness or self.hessian) and not self.loss_rows:
            raise ExperimentError("diagnostics: sharpness and hessian need validation examples")
        self.before: dict[str, Tensor] = {}
        if self.cka:
            self.before = {d: self._features(model, rows) for d, rows in self.domains.items()}

    def _batches(self, model: nn.Module, rows: Sequence[Any], *, labels: bool) -> list[Any]:
        device = next(model.parameters()).device
        batches = []
        for start in range(0, len(rows), self.batch_size):
            batch = dict(self.collator(list(rows[start : start + self.batch_size])))
            if not labels:
                batch.pop("labels", None)
            batches.append({k: v.to(device) for k, v in batch.items()})
        return batches

    def _features(self, model: nn.Module, rows: Sequence[Any]) -> Tensor:
        batches = self._batches(model, rows, labels=False)
        base = model.base_model
        if not isinstance(base, nn.Module):
            raise ExperimentError("diagnostics.cka needs a transformers model (base_model)")
        return collect_features(model, batches, module=base, pool="mean").cpu()

    def measure(self, model: nn.Module) -> dict[str, Any]:
        """The diagnostics of the fine-tuned ``model`` (its parameters are left unchanged)."""
        out: dict[str, Any] = {}
        if self.cka:
            out["cka"] = {
                d: float(linear_cka(self.before[d], self._features(model, rows)))
                for d, rows in self.domains.items()
            }
        if self.sharpness or self.hessian:
            out.update(self._loss_surface(model))
        return out

    def _loss_surface(self, model: nn.Module) -> dict[str, float]:
        batches = self._batches(model, self.loss_rows, labels=True)
        sizes = [len(next(iter(b.values()))) for b in batches]
        total = sum(sizes)
        params = [p for p in model.parameters() if p.requires_grad]

        def loss_fn() -> Tensor:
            # Example-weighted mean over the batches: one deterministic objective.
            losses = [model(**b).loss * (n / total) for b, n in zip(batches, sizes, strict=True)]
            return torch.stack(losses).sum()

        modes = [(m, m.training) for m in model.modules()]
        out: dict[str, float] = {}
        try:
            model.eval()
            if self.sharpness:
                out["epsilon_sharpness"] = epsilon_sharpness(
                    loss_fn, params, epsilon=self.epsilon, steps=self.sharpness_steps
                )
            if self.hessian:
                generator = torch.Generator(device=params[0].device).manual_seed(0)
                # Hessian-vector products differentiate twice; the fused attention kernels have
                # no double backward, the composite (math) one has.
                with sdpa_kernel(SDPBackend.MATH):
                    value, _ = top_hessian_eigenvalue(
                        loss_fn, params, iterations=self.hessian_iterations, generator=generator
                    )
                out["top_hessian_eigenvalue"] = value
        finally:
            for m, training in modes:
                m.training = training
        return {k: (v if math.isfinite(v) else float("nan")) for k, v in out.items()}
