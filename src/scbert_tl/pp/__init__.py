"""Preprocessing: align genes to a model panel and bin expression into tokens."""

from ._bin import bin

__all__ = ["bin"]
