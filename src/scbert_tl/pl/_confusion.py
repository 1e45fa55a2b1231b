"""``scbert.pl.confusion``: predicted against true cell types."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._utils import finish, new_axes

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes


def confusion(
    adata: AnnData,
    *,
    truth: str,
    prediction: str = "scbert",
    normalize: bool = True,
    cmap: str = "Blues",
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes | None:
    """Heatmap of true (rows) against predicted (columns) cell types.

    Parameters
    ----------
    adata
        Annotated cells.
    truth
        ``adata.obs`` column with the true types.
    prediction
        ``adata.obs`` column with the predictions (e.g. written by :func:`scbert_tl.tl.annotate`).
    normalize
        Show the fraction of each true type (rows sum to 1) instead of cell counts.
    cmap
        Colour map.
    ax
        Axes to draw into (default: a new figure).
    show
        Show the figure (default: scanpy's ``settings.autoshow``).

    Returns
    -------
    The Axes, when not shown.
    """
    for key in (truth, prediction):
        if key not in adata.obs:
            raise KeyError(f"{key!r} is not a column of adata.obs.")
    t = adata.obs[truth].astype(str)
    p = adata.obs[prediction].astype(str)
    rows = list(adata.obs[truth].cat.categories) if hasattr(adata.obs[truth], "cat") else sorted(set(t))
    rows = [r for r in map(str, rows) if r in set(t)]
    cols = list(dict.fromkeys([*[r for r in rows if r in set(p)], *sorted(set(p) - set(rows))]))
    table = pd.crosstab(t, p).reindex(index=rows, columns=cols, fill_value=0)
    values = table.to_numpy().astype(float)
    if normalize:
        values = values / np.maximum(values.sum(axis=1, keepdims=True), 1)
    ax = new_axes(ax, (0.5 * len(cols) + 3, 0.45 * len(rows) + 2))
    image = ax.imshow(values, cmap=cmap, vmin=0, vmax=1 if normalize else None, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=90)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(f"predicted ({prediction})")
    ax.set_ylabel(f"true ({truth})")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if table.iat[i, j]:
                text = f"{values[i, j]:.2f}" if normalize else str(int(values[i, j]))
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if values[i, j] > 0.6 * values.max() else "black",
                )
    ax.figure.colorbar(image, ax=ax, label="fraction of true type" if normalize else "cells")
    ax.grid(False)
    return finish(ax, show)
