"""``scbert.pl.confusion``: predicted against true cell types."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..data import UNKNOWN, class_order
from ._utils import finish, new_axes, plot_doc

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes


def _order(column: pd.Series, present: set[str]) -> list[str]:
    """The types of an obs column that occur, in its category order (else in :func:`class_order`'s)."""
    names = [str(c) for c in column.cat.categories] if hasattr(column, "cat") else class_order(list(present))
    return [n for n in dict.fromkeys(names) if n in present]


def confusion_table(adata: AnnData, *, truth: str, prediction: str = "scbert") -> pd.DataFrame:
    """Cell counts of true (rows) against predicted (columns) types, every type kept, on the diagonal.

    Rows are the true types that occur; the columns start with the same types in the same order
    (a true type never predicted keeps its empty column, so the diagonal stays the diagonal), then
    the predicted types that are no true type (such as ``"unknown"``).
    """
    for key in (truth, prediction):
        if key not in adata.obs:
            raise KeyError(f"{key!r} is not a column of adata.obs.")
    t = adata.obs[truth].astype(str)
    p = adata.obs[prediction].astype(str)
    rows = _order(adata.obs[truth], set(t))
    extra = [c for c in _order(adata.obs[prediction], set(p)) if c not in set(rows)]
    cols = rows + sorted(extra, key=lambda c: c == UNKNOWN)  # "unknown" last
    return pd.crosstab(t, p).reindex(index=rows, columns=cols, fill_value=0)


@plot_doc()
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

    Every true type has a row and the column at the same position, so correct calls lie on the
    diagonal even for a type that is never predicted; predicted types that are no true type (such as
    ``"unknown"``) are extra columns on the right. Row labels carry each true type's number of cells,
    and every non-empty cell shows its count. The counts themselves are
    :func:`~scbert_tl.pl.confusion_table`.

    Parameters
    ----------
    adata
        Annotated cells.
    truth
        ``adata.obs`` column with the true types.
    prediction
        ``adata.obs`` column with the predictions (e.g. written by :func:`scbert_tl.tl.annotate`).
    normalize
        Colour and label each cell by the fraction of its true type (rows sum to 1), with the cell
        count beneath; ``False``: by the count alone.
    cmap
        Colour map.
    {ax_show}

    {returns_axes}
    """
    table = confusion_table(adata, truth=truth, prediction=prediction)
    rows, cols = list(table.index), list(table.columns)
    counts = table.to_numpy()
    totals = counts.sum(axis=1)
    values = counts / np.maximum(totals[:, None], 1) if normalize else counts.astype(float)
    ax = new_axes(ax, (0.55 * len(cols) + 3.5, 0.5 * len(rows) + 2))
    image = ax.imshow(values, cmap=cmap, vmin=0, vmax=1 if normalize else None, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=90)
    ax.set_yticks(range(len(rows)), [f"{r} ({n})" for r, n in zip(rows, totals, strict=True)])
    ax.set_xlabel(f"predicted ({prediction})")
    ax.set_ylabel(f"true ({truth}), cells")
    top = values.max() if values.size else 1
    for i in range(len(rows)):
        for j in range(len(cols)):
            if counts[i, j]:
                text = f"{values[i, j]:.2f}\n{counts[i, j]}" if normalize else str(counts[i, j])
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=7,
                    linespacing=0.9,
                    color="white" if values[i, j] > 0.6 * top else "black",
                )
    ax.figure.colorbar(image, ax=ax, label="fraction of true type" if normalize else "cells")
    return finish(ax, show)
