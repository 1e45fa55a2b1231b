"""``scbert.tl.reference_size_curve``: accuracy against the number of labelled training cells."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..._docs import doc_params
from .._docs import FRAGMENTS
from ._comparison import comparison, score_row, store, summarise
from ._folds import folds_param, iter_folds, stratified_subsample

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from anndata import AnnData

    from ..._scbert import ScBERT

logger = logging.getLogger(__name__)

FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)


@doc_params(**FRAGMENTS)
def reference_size_curve(
    adata: AnnData,
    label_key: str,
    *,
    fractions: Sequence[float] = FRACTIONS,
    model: str | os.PathLike | ScBERT = "compact",
    n_splits: int = 5,
    folds: Sequence[int] | None = (0,),
    baselines: Sequence[str] = ("l1_logistic",),
    validation: float = 0.1,
    finetune_kwargs: dict[str, Any] | None = None,
    rng: int = 0,
    key_added: str = "scbert_size",
) -> pd.DataFrame:
    """Scores against reference size: train on growing stratified shares of the training folds, test on the test fold.

    The folds are those of :func:`~scbert_tl.tl.cross_validate` (same ``n_splits`` and ``rng``). In
    each fold, the training cells are put in one random order per type, and the share ``f`` is the
    first ``round(f * n)`` cells of every type (at least one): each type keeps its proportion and
    the subsets of growing fractions are nested. scBERT (with its validation cells drawn from the
    subset) and the baselines train on the same subset and are scored on the whole test fold.

    Parameters
    ----------
    {doc_labelled}
    fractions
        Shares of the training folds, each in (0, 1].
    {doc_folds}
    {doc_baselines}
    validation
        Fraction of each training subset held out for model selection.
    {doc_finetune_kwargs}
    rng
        Seed of the folds, of the subsets and of the training.
    {doc_key_added}

    Returns
    -------
    A tidy frame, one row per method, fold and fraction: ``fraction``, ``n_train``, ``n_test``,
    ``accuracy``, ``macro_f1``, ``f1:<type>``, seconds. Also written to ``adata.uns[key_added]`` with
    ``"results"``, ``"summary"`` (mean and sd per method and fraction), ``"subsets"`` (per fold and
    fraction, the obs names of the training cells used) and ``"params"``.
    """
    fractions = sorted({float(f) for f in fractions})
    if not fractions or fractions[0] <= 0 or fractions[-1] > 1:
        raise ValueError(f"fractions must be in (0, 1], got {fractions}.")
    data = comparison(adata, label_key, model, validation, rng, baselines, finetune_kwargs)
    rows: list[dict[str, Any]] = []
    subsets: dict[str, dict[str, np.ndarray]] = {}
    for _, fold, train, test, _ in iter_folds(data.labels, n_splits, 1, rng, folds):
        order = np.random.default_rng([rng, fold]).permutation(train.size)
        fold_subsets = {}
        for fraction in fractions:
            sub = train[stratified_subsample(data.labels[train], order, fraction)]
            fold_subsets[f"{fraction:g}"] = np.asarray(adata.obs_names[sub], dtype=str)
            logger.info("reference_size_curve: fold %d, fraction %.2f: %d training cells", fold, fraction, sub.size)
            for method in data.methods:
                pred = data.run(method, sub, test)
                row = score_row(
                    pred,
                    data.labels[test],
                    data.classes,
                    method=method,
                    fold=fold,
                    fraction=fraction,
                    n_train=int(sub.size),
                    n_test=int(test.size),
                )
                rows.append(row)
                logger.info("  %s: accuracy %.3f, macro F1 %.3f", method, row["accuracy"], row["macro_f1"])
        subsets[str(fold)] = fold_subsets
    frame = pd.DataFrame(rows)
    params = data.params("reference_size_curve", fractions=fractions, n_splits=n_splits, folds=folds_param(folds))
    store(adata, key_added, frame, params, summary=summarise(frame, ["method", "fraction"]), subsets=subsets)
    return frame
