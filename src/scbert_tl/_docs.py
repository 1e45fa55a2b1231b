"""Shared parameter documentation, filled into docstrings by :func:`doc_params`.

A fragment is written at the indentation of a numpydoc parameter entry inside a function's
docstring (four spaces), its first line without indentation, so that a ``{name}`` placeholder
placed where the entry would start renders as the entry itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

_F = TypeVar("_F", bound=Callable)

doc_ax_show = """\
ax
        Axes to draw into (default: a new figure).
    show
        Show the figure (default: scanpy's ``settings.autoshow``)."""


def doc_params(**fragments: str) -> Callable[[_F], _F]:
    """Fill the ``{name}`` placeholders of a function's docstring with the given fragments."""

    def decorate(function: _F) -> _F:
        function.__doc__ = function.__doc__.format_map(fragments)
        return function

    return decorate
