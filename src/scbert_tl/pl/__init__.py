"""Plotting: attention, confusion matrices, training history."""

__all__: list[str] = []
