"""``scbert.pl.attention``: the genes that receive the most attention, per group."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import numpy as np

from ._utils import finish, new_axes, plot_doc

if TYPE_CHECKING:
    from collections.abc import Sequence

    import pandas as pd
    from anndata import AnnData
    from matplotlib.axes import Axes

logger = logging.getLogger(__name__)


def _scaled(values: np.ndarray, standard_scale: str | None) -> np.ndarray:
    """Each gene's (row's) values min-max scaled across groups, or the values themselves."""
    if standard_scale is None:
        return values
    low = values.min(axis=1, keepdims=True)
    span = values.max(axis=1, keepdims=True) - low
    return np.divide(values - low, span, out=np.zeros_like(values), where=span > 0)


def _table(
    adata: AnnData, key: str, n_genes: int, groups: Sequence[str] | None
) -> tuple[pd.DataFrame, list[str], list[int]]:
    """The mean attention of the plotted genes (rows) in the plotted groups (columns), and where each group's block starts."""
    if key not in adata.uns:
        raise KeyError(f"adata.uns[{key!r}] is missing; run scbert.tl.attention(adata, model) first.")
    record = adata.uns[key]
    mean, top = record["mean"], record["top_genes"]
    names = [str(c) for c in mean.columns]
    if groups is None:
        groups = names
    else:
        groups = [groups] if isinstance(groups, str) else [str(g) for g in groups]
        missing = [g for g in groups if g not in names]
        if missing:
            raise KeyError(f"Groups {missing} are not in adata.uns[{key!r}]; it has {names}.")
    if n_genes > len(top):
        logger.info("pl.attention: %d genes per group were ranked; showing those", len(top))
    genes: list[str] = []
    starts: list[int] = []
    for g in groups:
        starts.append(len(genes))
        genes += [str(x) for x in top[g].iloc[:n_genes] if str(x) not in genes]
    return mean.loc[genes, groups].astype(float), genes, starts


@plot_doc(after="attention")
def attention(
    adata: AnnData,
    *,
    key: str = "scbert_attention",
    n_genes: int = 10,
    groups: str | Sequence[str] | None = None,
    kind: Literal["heatmap", "dotplot"] = "heatmap",
    standard_scale: Literal["gene"] | None = "gene",
    cmap: str = "Reds",
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes | None:
    """The genes that receive the most attention in each group, as a heatmap or a dot plot.

    Rows are genes: the top ``n_genes`` of each group in turn (as ranked by
    :func:`scbert_tl.tl.attention`; a gene already shown for an earlier group is not repeated), columns
    are groups.

    Parameters
    ----------
    {adata_key}
    n_genes
        Top genes per group.
    groups
        Groups to show, in this order (default: all).
    kind
        ``"heatmap"``: colour = attention. ``"dotplot"``: colour as the heatmap, and dot area growing
        linearly with the mean attention itself, from the smallest to the largest value shown, so a
        gene strong everywhere shows large dots of even colour.
    standard_scale
        ``"gene"`` (default): each gene's mean attention is min-max scaled across the groups shown
        (0 = the group where it receives least, 1 = most), as scanpy's ``standard_scale="var"``;
        this shows where a gene matters most, not how much. ``None``: the mean attention itself (1 =
        what an average gene receives). With a single group, ``None`` is used.
    cmap
        Colour map.
    {ax_show}

    {returns_axes}
    """
    if kind not in ("heatmap", "dotplot"):
        raise ValueError(f"kind must be 'heatmap' or 'dotplot', got {kind!r}.")
    if standard_scale not in ("gene", None):
        raise ValueError(f"standard_scale must be 'gene' or None, got {standard_scale!r}.")
    if isinstance(n_genes, bool) or not isinstance(n_genes, int | np.integer) or n_genes < 1:
        raise ValueError(f"n_genes must be a positive integer, got {n_genes!r}.")
    table, genes, starts = _table(adata, key, n_genes, groups)
    raw = table.to_numpy()
    scale = standard_scale if raw.shape[1] > 1 else None
    colour = _scaled(raw, scale)
    label = "attention, scaled per gene" if scale == "gene" else "mean attention received"
    n_rows, n_cols = raw.shape
    ax = new_axes(ax, (0.45 * n_cols + 3.2, 0.22 * n_rows + 1.6))
    if kind == "heatmap":
        image = ax.imshow(colour, cmap=cmap, aspect="auto", interpolation="nearest")
    else:
        yy, xx = np.mgrid[0:n_rows, 0:n_cols]
        low, high = float(raw.min()), float(raw.max())

        def area(v):
            return 15 + 235 * (np.asarray(v) - low) / (high - low) if high > low else np.full(np.shape(v), 120.0)

        image = ax.scatter(xx.ravel(), yy.ravel(), s=area(raw.ravel()), c=colour.ravel(), cmap=cmap, edgecolors="0.6")
        ax.set_xlim(-0.5, n_cols - 0.5)
        ax.set_ylim(n_rows - 0.5, -0.5)
        for value in np.unique(np.round(np.linspace(low, high, 3), 2)):
            ax.scatter([], [], s=area(value), c="0.6", label=f"{value:g}")
        ax.legend(
            title="mean attention", loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, frameon=False, fontsize=7
        )
    ax.set_xticks(range(n_cols), table.columns, rotation=90)
    ax.set_yticks(range(n_rows), genes)
    for start in starts[1:]:
        if 0 < start < n_rows:
            ax.axhline(start - 0.5, color="0.5", linewidth=0.6)
    ax.set_xlabel(adata.uns[key].get("params", {}).get("groupby") or "group")
    ax.set_ylabel("genes (top per group)")
    ax.figure.colorbar(image, ax=ax, label=label)
    return finish(ax, show)
