"""``scbert.tl.novel_type_detection``: leave a type out of training and see whether it is called ``"unknown"``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ._evaluate import base_params, iter_folds, labelled, store
from ._finetune import UNKNOWN

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from anndata import AnnData

    from .._scbert import ScBERT

logger = logging.getLogger(__name__)

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def novel_type_detection(
    adata: AnnData,
    label_key: str,
    *,
    leave_out: str | Sequence[str] | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
    model: str | os.PathLike | ScBERT = "compact",
    n_splits: int = 5,
    folds: Sequence[int] | None = (0,),
    baselines: Sequence[str] = ("l1_logistic",),
    validation: float = 0.1,
    finetune_kwargs: dict[str, Any] | None = None,
    rng: int = 0,
    key_added: str = "scbert_novel",
) -> pd.DataFrame:
    """Leave each type out of training in turn and sweep the ``"unknown"`` threshold.

    For every left-out type and fold (the folds of :func:`~scbert_tl.tl.cross_validate`), each method
    is trained on the training folds without any cell of that type, then predicts the test fold's
    cells of the other (known) types and every cell of the left-out (novel) type. A cell is called
    ``"unknown"`` when the method's confidence in its most likely type is below the threshold (as
    :func:`~scbert_tl.tl.annotate` does with ``unknown_threshold``): scBERT's and L1 logistic
    regression's highest class probability, CellTypist's own probability of its best match.

    Parameters
    ----------
    adata
        Labelled cells (raw counts or log-normalised), at least three types.
    label_key
        Column of ``adata.obs`` with the cell types.
    leave_out
        The type or types to leave out, each in its own run (default: every type in turn).
    thresholds
        Confidence thresholds to sweep, each in [0, 1].
    model
        Starting point of :func:`~scbert_tl.tl.finetune` (default: a new compact model).
    n_splits
        Folds of the split into training and test cells.
    folds
        The folds to run (default: the first only; ``None``: all).
    baselines
        ``"l1_logistic"`` and/or ``"celltypist"``, as in :func:`~scbert_tl.tl.cross_validate`.
    validation
        Fraction of the training cells held out for model selection.
    finetune_kwargs
        Further arguments of :func:`~scbert_tl.tl.finetune`.
    rng
        Seed of the folds and of the training.
    key_added
        Key in ``adata.uns`` for the results.

    Returns
    -------
    A tidy frame, one row per method, left-out type, fold and threshold: ``novel_recall`` (fraction of
    the novel cells called ``"unknown"``), ``known_accuracy`` (fraction of known test cells given
    their true type; an ``"unknown"`` call counts as an error), ``known_unknown`` (fraction of known
    cells called ``"unknown"``), ``known_accuracy_forced`` (accuracy without ``"unknown"`` calls),
    ``n_train``, ``n_known``, ``n_novel``, seconds. Also written to ``adata.uns[key_added]`` with
    ``"results"``, ``"novel_as"`` (what the novel cells were predicted as without a threshold: method,
    left_out, fold, predicted, n) and ``"params"``.
    """
    thresholds = sorted({float(t) for t in thresholds})
    if not thresholds or thresholds[0] < 0 or thresholds[-1] > 1:
        raise ValueError(f"thresholds must be in [0, 1], got {thresholds}.")
    data = labelled(adata, label_key, baselines=baselines, finetune_kwargs=finetune_kwargs)
    if len(data.classes) < 3:
        raise ValueError(f"Novel-type detection needs at least three types (two stay known); got {data.classes}.")
    if leave_out is None:
        leave_out = list(data.classes)
    leave_out = [leave_out] if isinstance(leave_out, str) else [str(t) for t in leave_out]
    missing = [t for t in leave_out if t not in data.classes]
    if missing:
        raise KeyError(f"leave_out types {missing} are not in adata.obs[{label_key!r}]; it has {data.classes}.")
    rows: list[dict[str, Any]] = []
    novel_as: list[dict[str, Any]] = []
    runs = list(iter_folds(data.labels, n_splits, 1, rng, folds))
    for novel_type in leave_out:
        is_novel = data.labels == novel_type
        for _, fold, train, test, _ in runs:
            train = train[~is_novel[train]]
            test = np.union1d(test[~is_novel[test]], np.flatnonzero(is_novel))
            novel = is_novel[test]
            truth = data.labels[test]
            logger.info(
                "novel_type_detection: %r left out, fold %d: %d training, %d known and %d novel test cells",
                novel_type,
                fold,
                train.size,
                (~novel).sum(),
                novel.sum(),
            )
            for method in data.methods:
                pred = data.run(method, train, test, model=model, validation=validation, seed=rng)
                forced = float((pred.labels[~novel] == truth[~novel]).mean()) if (~novel).any() else np.nan
                for t in thresholds:
                    called = np.where(pred.confidence < t, UNKNOWN, pred.labels)
                    rows.append(
                        {
                            "method": method,
                            "left_out": novel_type,
                            "fold": fold,
                            "threshold": t,
                            "novel_recall": float((called[novel] == UNKNOWN).mean()),
                            "known_accuracy": float((called[~novel] == truth[~novel]).mean())
                            if (~novel).any()
                            else np.nan,
                            "known_unknown": float((called[~novel] == UNKNOWN).mean()) if (~novel).any() else np.nan,
                            "known_accuracy_forced": forced,
                            "n_train": int(train.size),
                            "n_known": int((~novel).sum()),
                            "n_novel": int(novel.sum()),
                            "seconds": pred.seconds,
                        }
                    )
                predicted, n = np.unique(pred.labels[novel], return_counts=True)
                novel_as += [
                    {"method": method, "left_out": novel_type, "fold": fold, "predicted": str(p), "n": int(k)}
                    for p, k in zip(predicted, n, strict=True)
                ]
                at_half = (
                    rows[-len(thresholds) + int(np.searchsorted(thresholds, 0.5))] if 0.5 in thresholds else rows[-1]
                )
                logger.info(
                    "  %s: at threshold %.2f, novel recall %.3f, known accuracy %.3f",
                    method,
                    at_half["threshold"],
                    at_half["novel_recall"],
                    at_half["known_accuracy"],
                )
    frame = pd.DataFrame(rows)
    params = base_params(
        data,
        model,
        rng,
        validation,
        protocol="novel_type_detection",
        leave_out=leave_out,
        thresholds=thresholds,
        n_splits=n_splits,
        folds="all" if folds is None else sorted(int(f) for f in folds),
    )
    store(adata, key_added, frame, params, novel_as=pd.DataFrame(novel_as))
    return frame
