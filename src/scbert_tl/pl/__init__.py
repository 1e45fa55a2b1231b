"""Plotting: attention, confusion matrices, training history."""

from ._confusion import confusion
from ._history import history

__all__ = ["confusion", "history"]
