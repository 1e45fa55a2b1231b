"""Plotting: attention, confusion matrices, training history, evaluation results."""

from ._attention import attention
from ._confusion import confusion, confusion_table
from ._evaluation import cross_validation, novel_type_detection, reference_size_curve
from ._history import history

__all__ = [
    "attention",
    "confusion",
    "confusion_table",
    "cross_validation",
    "history",
    "novel_type_detection",
    "reference_size_curve",
]
