"""Plotting: attention, confusion matrices, training history."""

from ._attention import attention
from ._confusion import confusion
from ._history import history

__all__ = ["attention", "confusion", "history"]
