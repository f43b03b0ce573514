"""Classification metrics computed from a run's saved per-example predictions.

The runner (:mod:`tram.experiments.run`) writes every evaluated split's class probabilities and
labels to ``predictions.npz``; these functions turn them into any metric, so a benchmark can change
or add a metric without retraining:

- ``accuracy``: the fraction of argmax predictions that equal the label.
- ``macro_f1``: the unweighted mean over classes of F1 = 2·TP / (2·TP + FP + FN), over the classes
  that occur in the labels or the predictions (a class absent from both has no F1).
- ``auroc``: for two classes, the area under the ROC curve of the positive-class probability,
  i.e. the Mann-Whitney U statistic over (positives × negatives), ties counted one half; it does
  not depend on where the decision threshold falls. For more classes, the unweighted mean of the
  one-vs-rest areas over the classes present in the labels.

All values are fractions in [0, 1]; reports show them in percent.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "METRICS",
    "PREDICTIONS_FILE",
    "accuracy",
    "auroc",
    "compute",
    "load_predictions",
    "macro_f1",
    "save_predictions",
]

PREDICTIONS_FILE = "predictions.npz"


def _check(probabilities: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64, copy=False)
    if probabilities.ndim != 2 or labels.ndim != 1 or len(probabilities) != len(labels):
        raise ValueError(
            "expected probabilities of shape (examples, classes) and labels of shape "
            f"(examples,), got {tuple(probabilities.shape)} and {tuple(labels.shape)}"
        )
    if len(labels) == 0:
        raise ValueError("no examples: a metric needs at least one prediction")
    if labels.min() < 0 or labels.max() >= probabilities.shape[1]:
        raise ValueError(
            f"labels must lie in [0, {probabilities.shape[1]}), got values from "
            f"{labels.min()} to {labels.max()}"
        )
    return probabilities, labels


def accuracy(probabilities: Any, labels: Any) -> float:
    """Fraction of examples whose most probable class is the label."""
    probabilities, labels = _check(probabilities, labels)
    return float((probabilities.argmax(axis=1) == labels).mean())


def macro_f1(probabilities: Any, labels: Any) -> float:
    """Unweighted mean F1 over the classes present in the labels or the predictions."""
    probabilities, labels = _check(probabilities, labels)
    predicted = probabilities.argmax(axis=1)
    scores = []
    for k in np.union1d(labels, predicted):
        tp = int(np.sum((predicted == k) & (labels == k)))
        fp = int(np.sum((predicted == k) & (labels != k)))
        fn = int(np.sum((predicted != k) & (labels == k)))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def _binary_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney U / (n+ · n−) with average ranks for ties."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # Average rank (1-based) of each run of equal scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(scores)]))
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auroc(probabilities: Any, labels: Any) -> float:
    """Area under the ROC curve (binary: of class 1; more classes: mean one-vs-rest).

    NaN when only one class occurs in the labels (the area is undefined)."""
    probabilities, labels = _check(probabilities, labels)
    if probabilities.shape[1] == 2:
        return _binary_auroc(probabilities[:, 1], labels == 1)
    present = np.unique(labels)
    if len(present) < 2:
        return float("nan")
    return float(np.mean([_binary_auroc(probabilities[:, k], labels == k) for k in present]))


METRICS = {"accuracy": accuracy, "macro_f1": macro_f1, "auroc": auroc}
"""Every metric by name, each ``f(probabilities, labels) -> float`` in [0, 1]."""


def compute(name: str, probabilities: Any, labels: Any) -> float:
    """The metric ``name`` (a key of :data:`METRICS`)."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
    return METRICS[name](probabilities, labels)


def save_predictions(path: str | Path, splits: Mapping[str, tuple[Any, Any]]) -> Path:
    """Write ``{split: (probabilities, labels)}`` to a compressed ``.npz`` file.

    Probabilities are stored as float32 and labels as int16 (``<split>/probabilities``,
    ``<split>/labels``)."""
    arrays: dict[str, np.ndarray] = {}
    for split, (probabilities, labels) in splits.items():
        probabilities, labels = _check(probabilities, labels)
        arrays[f"{split}/probabilities"] = probabilities.astype(np.float32)
        arrays[f"{split}/labels"] = labels.astype(np.int16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save: Any = np.savez_compressed  # numpy's stub types **kwds as its allow_pickle flag
    with path.open("wb") as handle:
        save(handle, **arrays)
    return path


def load_predictions(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The inverse of :func:`save_predictions`: ``{split: (probabilities, labels)}``."""
    with np.load(Path(path)) as data:
        splits = sorted({key.rsplit("/", 1)[0] for key in data.files})
        return {s: (data[f"{s}/probabilities"], data[f"{s}/labels"]) for s in splits}
