"""``scbert.pl.cross_validation``, ``scbert.pl.reference_size_curve``, ``scbert.pl.novel_type_detection``: evaluation results."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._utils import finish, new_axes, plot_doc

if TYPE_CHECKING:
    from collections.abc import Sequence

    import pandas as pd
    from anndata import AnnData
    from matplotlib.axes import Axes


def _results(adata: AnnData, key: str, tool: str, columns: Sequence[str]) -> pd.DataFrame:
    if key not in adata.uns or "results" not in adata.uns[key]:
        raise KeyError(f"adata.uns[{key!r}] has no results; run scbert.tl.{tool}(adata, ...) first.")
    frame = adata.uns[key]["results"]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KeyError(f"The results in adata.uns[{key!r}] have no columns {missing}; they have {list(frame.columns)}.")
    return frame


def _methods(frame: pd.DataFrame, methods: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(frame["method"]))
    if methods is None:
        return present
    methods = [methods] if isinstance(methods, str) else list(methods)
    missing = [m for m in methods if m not in present]
    if missing:
        raise KeyError(f"Methods {missing} are not in the results; they have {present}.")
    return methods


@plot_doc()
def cross_validation(
    adata: AnnData,
    *,
    key: str = "scbert_cv",
    metrics: Sequence[str] = ("accuracy", "macro_f1"),
    methods: Sequence[str] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes | None:
    """Scores per method: a bar at the mean over folds and a point per fold, for each metric.

    Works for every protocol with one row per method and fold: :func:`scbert_tl.tl.cross_validate`,
    :func:`scbert_tl.tl.class_imbalance` (e.g. ``metrics=["f1:B"]`` for a rare type) and
    :func:`scbert_tl.tl.dataset_transfer` (a point per held-out dataset).

    Parameters
    ----------
    adata
        Cells after one of those tools.
    key
        Its ``key_added``.
    metrics
        Columns of the results to show (``"accuracy"``, ``"macro_f1"``, ``"f1:<type>"``).
    methods
        Methods to show, in this order (default: all).
    {ax_show}

    {returns_axes}
    """
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    frame = _results(adata, key, "cross_validate", ["method", *metrics])
    methods = _methods(frame, methods)
    ax = new_axes(ax, (1.2 + 0.55 * len(metrics) * len(methods), 3.5))
    width = 0.8 / len(methods)
    jitter = np.random.default_rng(0)
    for j, method in enumerate(methods):
        part = frame[frame["method"] == method]
        x = np.arange(len(metrics)) - 0.4 + width * (j + 0.5)
        means = [part[m].mean() for m in metrics]
        ax.bar(x, means, width=width * 0.9, color=f"C{j}", alpha=0.45, label=method)
        for i, m in enumerate(metrics):
            values = part[m].to_numpy(dtype=float)
            ax.scatter(x[i] + jitter.uniform(-0.15, 0.15, values.size) * width, values, s=12, color=f"C{j}", zorder=3)
    ax.set_xticks(np.arange(len(metrics)), [m.replace("_", " ") for m in metrics])
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("score (bar: mean; points: folds)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return finish(ax, show)


@plot_doc(after="reference_size_curve")
def reference_size_curve(
    adata: AnnData,
    *,
    key: str = "scbert_size",
    metric: str = "macro_f1",
    methods: Sequence[str] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes | None:
    """A score against the number of training cells, a line per method (mean over folds; points: folds).

    Parameters
    ----------
    {adata_key}
    metric
        Column of the results to show (``"accuracy"``, ``"macro_f1"``, ``"f1:<type>"``).
    methods
        Methods to show (default: all).
    {ax_show}

    {returns_axes}
    """
    frame = _results(adata, key, "reference_size_curve", ["method", "n_train", "fraction", metric])
    methods = _methods(frame, methods)
    ax = new_axes(ax, (5, 3.5))
    for j, method in enumerate(methods):
        part = frame[frame["method"] == method]
        mean = part.groupby("fraction")[["n_train", metric]].mean()
        ax.plot(mean["n_train"], mean[metric], "-o", color=f"C{j}", label=method, markersize=4)
        ax.scatter(part["n_train"], part[metric], s=8, color=f"C{j}", alpha=0.5)
    ax.set_xlabel("training cells")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize="small", loc="lower right")
    return finish(ax, show)


@plot_doc(after="novel_type_detection")
def novel_type_detection(
    adata: AnnData,
    *,
    key: str = "scbert_novel",
    methods: Sequence[str] | None = None,
    left_out: Sequence[str] | None = None,
    mark: float = 0.5,
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes | None:
    """Novel-type recall against known-type accuracy as the ``"unknown"`` threshold moves.

    One line per left-out type (colour) and method (line style; with a single left-out type, colour),
    each point a probability threshold (mean over folds); the threshold ``mark`` is drawn larger. A
    star marks each method's threshold chosen on the validation cells (scBERT: its energy score, as
    :func:`~scbert_tl.tl.annotate` by default; the baselines: their probability). Up and to the right
    is better.

    Parameters
    ----------
    {adata_key}
    methods
        Methods to show (default: all).
    left_out
        Left-out types to show (default: all).
    mark
        Threshold to highlight (default: 0.5, the default of :func:`scbert_tl.tl.annotate`).
    {ax_show}

    {returns_axes}
    """
    frame = _results(
        adata, key, "novel_type_detection", ["method", "left_out", "threshold", "novel_recall", "known_accuracy"]
    )
    methods = _methods(frame, methods)
    types = list(dict.fromkeys(frame["left_out"]))
    if left_out is not None:
        left_out = [left_out] if isinstance(left_out, str) else list(left_out)
        missing = [t for t in left_out if t not in types]
        if missing:
            raise KeyError(f"Left-out types {missing} are not in the results; they have {types}.")
        types = left_out
    chosen = adata.uns[key].get("chosen")
    ax = new_axes(ax, (5.5, 4))
    styles = ["-", "--", ":", "-."]
    by_method = len(types) == 1  # one type: a colour per method; else a colour per type, a style per method
    for j, method in enumerate(methods):
        for i, novel in enumerate(types):
            part = frame[(frame["method"] == method) & (frame["left_out"] == novel)]
            mean = part.groupby("threshold")[["known_accuracy", "novel_recall"]].mean()
            colour = f"C{j}" if by_method else f"C{i}"
            label = f"{novel} ({method})" if len(methods) > 1 else novel
            style = "-" if by_method else styles[j % len(styles)]
            ax.plot(
                mean["known_accuracy"], mean["novel_recall"], style, marker="o", markersize=3, color=colour, label=label
            )
            if mark in mean.index:
                ax.scatter(mean.loc[mark, "known_accuracy"], mean.loc[mark, "novel_recall"], s=45, color=colour)
            point = _chosen_point(chosen, method, novel)
            if point is not None:
                ax.scatter(*point, s=120, marker="*", color=colour, edgecolor="black", linewidth=0.5, zorder=4)
    ax.set_xlabel("known-type accuracy ('unknown' counts as wrong)")
    ax.set_ylabel("novel type called 'unknown'")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    stars = "; stars: chosen on validation cells" if chosen is not None and len(chosen) else ""
    ax.set_title(f"large dots: threshold {mark:g}{stars}", fontsize="small")
    ax.legend(fontsize="x-small", loc="best", title="left out")
    return finish(ax, show)


def _chosen_point(chosen: pd.DataFrame | None, method: str, left_out: str) -> tuple[float, float] | None:
    """(known accuracy, novel recall) at the validation-chosen threshold of the default score, mean over folds."""
    if chosen is None or not len(chosen):
        return None
    rows = chosen[(chosen["method"] == method) & (chosen["left_out"] == left_out)]
    scores = set(rows["score"])
    rows = rows[rows["score"] == ("energy" if "energy" in scores else "probability")]
    if not len(rows):
        return None
    return float(rows["known_accuracy"].mean()), float(rows["novel_recall"].mean())
