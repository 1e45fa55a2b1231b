from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from .._docs import doc_ax_show, doc_params

if TYPE_CHECKING:
    from matplotlib.axes import Axes

_F = TypeVar("_F", bound=Callable)


def plot_doc(after: str | None = None) -> Callable[[_F], _F]:
    """Fill a plot's docstring: ``{ax_show}``, ``{returns_axes}`` and, with ``after``, ``{adata_key}``.

    ``{ax_show}`` is the ``ax`` and ``show`` entries, ``{returns_axes}`` the Returns section of a plot
    that returns its Axes, ``{adata_key}`` the ``adata`` and ``key`` entries of a plot of the results of
    ``scbert.tl.<after>``.
    """
    fragments = {"ax_show": doc_ax_show, "returns_axes": "Returns\n    -------\n    The Axes, when not shown."}
    if after is not None:
        fragments["adata_key"] = (
            f"adata\n        Cells after :func:`scbert_tl.tl.{after}`.\n    key\n        Its ``key_added``."
        )
    return doc_params(**fragments)


def finish(ax: Axes, show: bool | None) -> Axes | None:
    """Turn the grid off; show the figure as scanpy does (and return None) unless asked not to, else return the Axes."""
    import matplotlib.pyplot as plt

    ax.grid(False)
    if show is None:
        from scanpy import settings as sc_settings

        show = sc_settings.autoshow
    if show:
        plt.show()
        return None
    return ax


def new_axes(ax: Axes | None, size: tuple[float, float] | None = None) -> Axes:
    """``ax``, or the Axes of a new figure (matplotlib's rcParams, which scanpy's settings set, apply)."""
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax
    _, ax = plt.subplots(figsize=size)
    return ax
