from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def finish(ax: Axes, show: bool | None) -> Axes | None:
    """Show the figure as scanpy does (and return None) unless asked not to; else return the Axes."""
    import matplotlib.pyplot as plt

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
