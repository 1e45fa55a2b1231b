"""Classification scores with scikit-learn's definitions: the epoch a fine-tuning run keeps and every reported figure."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence


def macro_f1(truth: Sequence[Any], prediction: Sequence[Any], labels: Sequence[Any] | None = None) -> float:
    """Macro-averaged F1 over ``labels``; ``None``: over the labels present in ``truth`` or ``prediction``."""
    from sklearn.metrics import f1_score

    return float(f1_score(truth, prediction, labels=labels, average="macro", zero_division=0))


def balanced_probability(truth: np.ndarray, probabilities: np.ndarray) -> float:
    """The probability given to the true class, averaged over each class's cells, then over the classes in ``truth``.

    ``truth`` holds class indices (columns of ``probabilities``). A smooth, class-balanced accuracy:
    every class counts the same, and every cell's probability counts.
    """
    truth = np.asarray(truth)
    p_true = np.asarray(probabilities)[np.arange(truth.size), truth]
    return float(np.mean([p_true[truth == c].mean() for c in np.unique(truth)]))


def scores(truth: Sequence[str], prediction: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro F1, per-class F1 and the confusion matrix (scikit-learn's definitions).

    Macro F1 averages over ``classes`` (the types of the training data), so a type never predicted
    counts as F1 0.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    truth, prediction = np.asarray(truth, dtype=str), np.asarray(prediction, dtype=str)
    labels = list(classes)
    per_class = f1_score(truth, prediction, labels=labels, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(truth, prediction)),
        "macro_f1": macro_f1(truth, prediction, labels),
        "per_class_f1": dict(zip(labels, map(float, per_class), strict=True)),
        "confusion": confusion_matrix(truth, prediction, labels=labels),
    }
